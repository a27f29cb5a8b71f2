"""Holm's correction for the ablation reports written before ``ddpm.report`` applied it (issue 33, item 5).

Those sweeps' run directories were not kept, so ``ddpm.report`` cannot be rerun on them; but Holm's correction needs
only the p-values, and each report.md prints every test it made (each finding and the grid's best cell against its
runner-up) with its p to three significant digits. This reads them back, applies ``ddpm.evaluation.stats.holm`` over
all of a page's tests, and writes the section ``ddpm.report`` now writes itself (``report.holm_lines``) at the end of
the page, replacing an earlier one. It prints each page's table too.

    python docs/ablations/holm_recheck.py docs/ablations/{prediction_targets,loss_weighting,schedules,guidance_variants,samplers,ema_length,guidance_methods}/report.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

from ddpm.report import holm_lines

TEST = re.compile(r"\((paired t-test|Welch's t-test), n = [^)]*?p = ([0-9.e+-]+)\)")
SECTION = "\n## Holm's correction over this page\n"


def tests_of(page: str) -> list[tuple[str, SimpleNamespace]]:
    """(label, comparison) for every test the page prints: a finding's label is its text up to the first colon after
    the metric (e.g. ``fd_digits at w=1 (sampler.steps=10)``) and the two settings it compares; the grid's is its own."""
    found = []
    for line in page.split(SECTION)[0].splitlines():
        match = TEST.search(line)
        if not match:
            continue
        if line.startswith("Best cell:"):
            best = line[len("Best cell: "):].split(": ")[0]
            runner_up = re.search(r"the runner-up, (.*?), [-0-9.e+]+ ± ", line).group(1)
            label = f"grid, best cell vs runner-up: {best} vs {runner_up}"
        else:
            head, rest = line[2:].split(": ", 1)
            settings = re.findall(r"([\w./]+=(?:\[[^\]]*\]|[^ (]+)) (?:is better )?\(", rest)[:2]
            label = f"{head}: {' vs '.join(settings)}"
        found.append((label, SimpleNamespace(test=match.group(1), p=float(match.group(2)))))
    return found


def recheck(path: Path) -> str:
    page = path.read_text()
    lines = holm_lines(tests_of(page))
    note = ("", "(Recomputed by docs/ablations/holm_recheck.py from the p-values printed above, three significant "
            "digits; the sweep's run directories were not kept.)")
    body = page.split(SECTION)[0].rstrip("\n")
    path.write_text(body + "\n" + "\n".join([*lines, *note]) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"# {name}\n{recheck(Path(name))}\n")

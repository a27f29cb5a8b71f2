"""`python -m ddpm.report DIR`: the runs of a multirun directory as tables and plots.

Reads each job's overrides (``N/.hydra/overrides.yaml``), its loss curve (``N/csv/version_*/metrics.csv``) and its
quality numbers (``N/metrics.json``, from training's ``evaluate_at_end`` or from ``ddpm.evaluate``), then writes into
DIR: ``report.md`` (printed too), ``runs.csv`` (one row per run), ``guidance.csv`` (one row per run and guidance scale),
``loss_curves.png`` and ``quality_vs_guidance.png``. Runs that differ only in ``seed`` are averaged (mean ± std).
A file it cannot read is named in one line (exit status 2); what it writes is written atomically, never through a
symlink, and CSV cells a spreadsheet would evaluate are escaped.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from ddpm.evaluation.stats import LEVEL, compare, holm, mean_interval
from ddpm.evaluation.records import evaluations
from ddpm.evaluation.registry import QUALITY, lower_is_better, metric
from ddpm.files import WriteError, atomic_write, spreadsheet_safe



def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_run(job_dir: Path) -> dict | None:
    """One job: its overrides, loss curve, final loss and evaluations (one per guidance scale). ReportError, one line
    naming the file, for one that ddpm did not write (not UTF-8, not YAML or JSON of the expected shape, a Python tag)."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return None
    overrides, checkpoint = {}, None
    items = _read(overrides_file, yaml.safe_load)
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ReportError(f"{overrides_file}: not a list of overrides as Hydra writes it")
    for item in items:
        key, _, value = item.partition("=")
        if key.lstrip("+") == "ckpt_path":
            checkpoint = value  # the model measured: the replicate of an evaluation sweep, not a setting
        elif not key.startswith(("hydra.", "~")) and key.lstrip("+") != "paths.cache_dir":
            overrides[key.lstrip("+")] = _parse_value(value)
    curve: dict[int, float] = {}
    versions = [p for p in job_dir.glob("csv/version_*/metrics.csv") if p.parent.name.split("_", 1)[1].isdigit()]
    for metrics_csv in sorted(versions, key=lambda p: int(p.parent.name.split("_")[1])):  # version_abc: not Lightning's
        for row in _read(metrics_csv, lambda text: list(csv.DictReader(io.StringIO(text)))):
            if row.get("train/loss"):
                try:
                    curve[int(row["step"])] = float(row["train/loss"])  # a resumed run's later version wins
                except (TypeError, ValueError):
                    raise ReportError(f"{metrics_csv}: step {row.get('step')!r}, train/loss {row['train/loss']!r} are not "
                                      "numbers") from None
    steps = sorted(curve)
    tail = [curve[s] for s in steps[-max(1, len(steps) // 10):]]
    run = {"dir": job_dir.name, "overrides": overrides, "checkpoint": checkpoint, "curve": [(s, curve[s]) for s in steps],
           "final_loss": statistics.fmean(tail) if tail else None, "evaluations": []}
    metrics_file = job_dir / "metrics.json"
    if metrics_file.is_file():
        record = _read(metrics_file, json.loads)
        try:
            run["evaluations"] = evaluations(record)  # training's final evaluation or ddpm.evaluate's
            if run["final_loss"] is None:
                run["final_loss"] = record.get("final_loss")
            numbers = [run["final_loss"], *(w for w, _ in run["evaluations"]),
                       *(v for _, m in run["evaluations"] for v in (m or {}).values())]
        except (KeyError, TypeError, AttributeError) as error:
            raise ReportError(f"{metrics_file}: not a metrics.json written by ddpm ({type(error).__name__}: {error}); "
                              "fix or remove it (python -m ddpm.evaluate writes a new one)") from None
        bad = next((v for v in numbers if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                                            or (isinstance(v, int) and abs(v) > 2**53))), None)
        if bad is not None:
            raise ReportError(f"{metrics_file}: holds {str(bad)[:40]!r} where a number belongs; fix or remove it "
                              "(python -m ddpm.evaluate writes a new one)")
    return run


class ReportError(ValueError):
    """A sweep directory the report cannot read or write: one line naming the file."""


# The largest file of each kind a run writes, with a wide margin: a bigger one was not written by ddpm, and reading it
# whole would only cost memory (a metrics.csv of a million logged steps is about 50 MB).
MAX_BYTES = {".yaml": 1_000_000, ".json": 10_000_000, ".csv": 500_000_000}


def _read(path: Path, parse):
    """``parse`` of a file's UTF-8 text; ReportError naming the file when it is not a regular file (a FIFO would hang the
    report), too large, not UTF-8 or does not parse."""
    from ddpm.files import open_regular

    limit = MAX_BYTES.get(path.suffix, 10_000_000)
    try:
        with open_regular(path) as f:
            data = f.read(limit + 1)
    except OSError as error:
        raise ReportError(f"{path}: cannot be read ({error.strerror or error})") from None
    if len(data) > limit:
        raise ReportError(f"{path}: larger than {limit} bytes, more than ddpm writes there; fix or remove it")
    try:
        return parse(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ReportError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); was it written by ddpm?") from None
    except (yaml.YAMLError, ValueError, csv.Error, RecursionError) as error:  # a !!python tag: yaml's ConstructorError
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ReportError(f"{path}: cannot be parsed ({type(error).__name__}: {first}); fix or remove it") from None


def write_bytes(path: Path, data: bytes) -> None:
    """A report file, written atomically (a temporary renamed over it: a symlink there is replaced, never followed)."""
    atomic_write(path, lambda f: f.write(data), what="report file")


def write_csv(path: Path, rows: list[list]) -> None:
    """Rows as CSV, each cell that a spreadsheet would evaluate as a formula escaped (``ddpm.files.spreadsheet_safe``)."""
    text = io.StringIO()
    csv.writer(text).writerows([[spreadsheet_safe(cell) for cell in row] for row in rows])
    write_bytes(path, text.getvalue().encode())


def save_figure(fig, path: Path) -> None:
    data = io.BytesIO()
    fig.savefig(data, format="png", dpi=120)
    write_bytes(path, data.getvalue())


def load_runs(sweep_dir: Path) -> list[dict]:
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else p.name))
    return [run for run in map(load_run, jobs) if run is not None]


def swept_keys(runs: list[dict]) -> list[str]:
    """Keys whose value differs between runs, in the order they were given."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run["overrides"] if k not in keys]
    return [k for k in keys if len({json.dumps(r["overrides"].get(k)) for r in runs}) > 1]


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def _fmt(mean: float, std: float | None = None, n: int = 1) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    digits = 4 if abs(mean) < 1 else 2
    return f"{mean:.{digits}f}" if std is None or n < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# Not quality: what an evaluation cost (recorded beside the metrics, not tabled as one).
COSTS = ("nfe", "sampling_seconds", "images_per_second")


def _metric_names(runs: list[dict]) -> list[str]:
    """The metrics the runs hold: the registered ones in their order (``ddpm.evaluation.registry``), then any other
    (a Fréchet distance in another feature space, a metric this project does not know), never dropped."""
    present = {k for r in runs for _, m in r["evaluations"] if m for k in m} - set(COSTS)
    return [k for k in QUALITY if k in present] + sorted(present - set(QUALITY))


def build_report(sweep_dir: Path) -> str:
    runs = load_runs(sweep_dir)
    if not runs:
        raise ReportError(f"{sweep_dir} holds no runs (no */.hydra/overrides.yaml): pass a multirun directory")
    keys = swept_keys(runs)
    group_keys = [k for k in keys if k not in ("seed", "guidance.scale")]  # a sampling-time w is the w column
    metrics = _metric_names(runs)
    scales = sorted({w for r in runs for w, _ in r["evaluations"]})
    first = lambda r: next(((w, m) for w, m in r["evaluations"] if m), (None, None))  # noqa: E731

    # 1. One row per run, with the guidance scale its numbers were measured at (its first evaluation).
    header = ["run", *keys, "final loss", *(["w"] if scales else []), *metrics]
    rows = []
    for r in runs:
        w, m = first(r)
        rows.append([r["dir"], *(r["overrides"].get(k) for k in keys), _fmt(r["final_loss"]),
                     *([f"{w:g}" if w is not None else "n/a"] if scales else []), *(_fmt((m or {}).get(name)) for name in metrics)])
    write_csv(sweep_dir / "runs.csv", [["run", *keys, "final_loss", *metrics],
                                       *([r["dir"], *(r["overrides"].get(k) for k in keys), r["final_loss"],
                                          *((first(r)[1] or {}).get(n) for n in metrics)] for r in runs)])
    out = [f"# Report: {sweep_dir}", "", f"{len(runs)} runs; swept: {', '.join(keys) or 'nothing'}.", "", "## Runs", "",
           _table(header, rows)]

    # 2. Mean ± std over seeds, per group, at each guidance scale.
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[tuple(json.dumps(r["overrides"].get(k)) for k in group_keys)].append(r)
    summary_rows, long_rows = [], []
    for gkey, members in groups.items():
        labels = [json.loads(v) for v in gkey]
        loss = _mean_std([m["final_loss"] for m in members])
        for w in sorted({w for r in members for w, _ in r["evaluations"]}) or [None]:
            stats, raw = {}, {"final_loss": _by_seed(members, lambda r: r["final_loss"])}
            for name in metrics:
                value = lambda r, name=name: (dict(r["evaluations"]).get(w) or {}).get(name)  # noqa: E731
                stats[name] = _mean_std([value(r) for r in members])
                raw[name] = _by_seed(members, value)
            n = sum(1 for r in members if w is None or w in dict(r["evaluations"]))
            summary_rows.append([*labels, f"{w:g}" if w is not None else "", n, _fmt(*loss), *(_fmt(*stats[name]) for name in metrics)])
            long_rows.append({"group": labels, "w": w, "n": n, "final_loss": loss, **stats, "raw": raw})
    out += ["", "## Mean ± std over seeds", "",
            _table([*group_keys, "w", "seeds", "final loss", *metrics], summary_rows)]
    write_csv(sweep_dir / "guidance.csv",
              [[*group_keys, "w", "seeds", "final_loss_mean", "final_loss_std", *(f"{n}_{s}" for n in metrics for s in ("mean", "std"))],
               *([*row["group"], row["w"], row["n"], *row["final_loss"][:2], *(v for n in metrics for v in row[n][:2])]
                 for row in long_rows)])

    tests: list = []  # every comparison the page makes, for one Holm correction over all of them
    out += ["", "## Findings", "", *findings(long_rows, group_keys, metrics, scales, tests)]
    plot(runs, long_rows, group_keys, metrics, sweep_dir)
    out += grid(long_rows, group_keys, metrics, scales, sweep_dir, tests)
    out += holm_lines(tests)
    if any(r["curve"] for r in runs):
        out += ["", "![loss curves](loss_curves.png)"]
    elif any((sweep_dir / r["dir"] / "wandb").is_dir() for r in runs):
        out += ["", "No loss curves here: these runs logged the loss to wandb only (their curves are in its UI, grouped by "
                "sweep); sweep with logger=wandb_csv to get loss_curves.png too."]
    if scales and metrics:
        out += ["", "![quality against guidance scale](quality_vs_guidance.png)"]
    return "\n".join(out) + "\n"


def replicate(run: dict):
    """What a run repeats across settings, so two settings can be paired on it: its seed (training sweeps: the same
    initialisation and batches) and the checkpoint it measured (evaluation sweeps over ``ckpt_path=A,B,C``: the same
    model). A run with neither is its own replicate, keyed by its directory."""
    seed, checkpoint = run["overrides"].get("seed"), run.get("checkpoint")
    return f"run {run['dir']}" if seed is None and checkpoint is None else json.dumps([seed, checkpoint])


def _by_seed(members: list[dict], value) -> dict:
    """``{replicate: value}`` over a group's runs (``replicate``)."""
    values = [(replicate(r), value(r)) for r in members]  # several runs of one replicate: one per w in an evaluation sweep
    return {key: v for key, v in values if v is not None and math.isfinite(v)}


def findings(rows: list[dict], group_keys: list[str], metrics: list[str], scales: list,
             tests: list | None = None) -> list[str]:
    """Plain sentences: which setting is better on each metric, and whether seeds can tell them apart (a paired
    t-test when both settings ran the same seeds, Welch's otherwise; ``ddpm.evaluation.stats``), with the interval and p-value
    behind it. Each test is appended to ``tests``: the page corrects for all of them at once (``holm_lines``)."""
    lines, tests = [], (tests if tests is not None else [])
    for i, key in enumerate(group_keys):
        comparisons = [("final_loss", scales[0] if scales else None)] + [(m, w) for m in metrics[:1] for w in (scales or [None])]
        for name, w in comparisons:
            # Compare the values of `key` with every other swept key held fixed: one finding per slice.
            slices: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
            for row in rows:
                if row["w"] == w and row[name][2] > 0:
                    others = ", ".join(f"{k}={v}" for j, (k, v) in enumerate(zip(group_keys, row["group"])) if j != i)
                    slices[others][json.dumps(row["group"][i])].append(row)
            for others, by_value in slices.items():
                lines += _finding(key, name, w, others, by_value, tests)
    if len(scales) > 1:
        for row_group in sorted({json.dumps(r["group"]) for r in rows}):
            series = sorted((r["w"], r) for r in rows if json.dumps(r["group"]) == row_group and r["w"] is not None)
            label = ", ".join(f"{k}={v}" for k, v in zip(group_keys, json.loads(row_group))) or "all runs"
            for name in ("guided_accuracy", "diversity", *[m for m in metrics if lower_is_better(m)][:1]):
                points = [(w, r[name][0]) for w, r in series if name in r and r[name][2] > 0]
                if len(points) > 1:
                    trend = " -> ".join(f"{v:.3g} (w={w:g})" for w, v in points)
                    lines.append(f"- {label}: {name} {trend}.")
    return lines or ["- (nothing to compare)"]


def holm_lines(tests: list[tuple[str, object]]) -> list[str]:
    """A page with several tests makes several claims: each one's p-value before and after Holm's correction over all
    of them (``stats.holm``: the findings' and the grid's best-vs-runner-up test), and which differences survive it."""
    if len(tests) < 2:
        return []
    adjusted = holm([comparison.p for _, comparison in tests])
    kept = [f"{label} (adjusted p = {p:.3g})" for (label, _), p in zip(tests, adjusted) if p < 1 - LEVEL]
    table = _table(["comparison", "test", "p", "Holm p", f"a difference at {LEVEL:.0%}"],
                   [[label, c.test, f"{c.p:.3g}", f"{p:.3g}", "yes" if p < 1 - LEVEL else "no"]
                    for (label, c), p in zip(tests, adjusted)]) if all(hasattr(c, "test") for _, c in tests) else None
    return ["", "## Holm's correction over this page", "", *([table, ""] if table else []),
            f"These findings are {len(tests)} comparisons; with Holm's correction for all of them "
            + (f"{len(kept)} remain differences at 95%: " + "; ".join(kept) + "." if kept else
               "none remains a difference at 95%.")]


def _finding(key: str, name: str, w, others: str, by_value: dict[str, list], tests: list | None = None) -> list[str]:
    """One sentence comparing the best two values of ``key`` on ``name`` (at ``w``, the ``others`` held fixed); the
    comparison is appended to ``tests`` (for Holm's correction over the page)."""
    if len(by_value) < 2 or any(len(v) != 1 for v in by_value.values()):
        return []
    if name != "final_loss" and (metric(name) is None or metric(name).lower_is_better is None):
        return []  # no better direction known: tabled, never ranked
    ranked = sorted(by_value.items(), key=lambda kv: kv[1][0][name][0], reverse=not lower_is_better(name))
    (best, [best_row]), (second, [second_row]) = ranked[0], ranked[1]
    (mb, sb, nb), (ms, ss, ns) = best_row[name], second_row[name]
    where = (f" at w={w:g}" if w is not None and name != "final_loss" else "") + (f" ({others})" if others else "")
    caveat = (" (losses under different schedules or targets weight the noise levels differently: not comparable)"
              if name == "final_loss" and key.startswith(("schedule", "diffusion", "process", "experiments/")) else "")
    comparison = compare(best_row["raw"][name], second_row["raw"][name])
    head = f"- {name}{where}: {key}={json.loads(best)}"
    if comparison is not None and tests is not None:
        tests.append((f"{name}{where}: {key}={json.loads(best)} vs {json.loads(second)}", comparison))
    if comparison is None:  # one run a side has no spread to compare a gap with
        return [f"{head} {_fmt(mb)} vs {key}={json.loads(second)} {_fmt(ms)}: "
                f"{min(nb, ns)} seed: no statistics (sweep seed=0,1,2 to compare){caveat}."]
    if comparison.clear:
        return [f"{head} is better ({_fmt(mb, sb, nb)}) than {key}={json.loads(second)} ({_fmt(ms, ss, ns)}): "
                f"a difference at 95% ({comparison.describe()}){caveat}."]
    return [f"{head} ({_fmt(mb, sb, nb)}) and {key}={json.loads(second)} ({_fmt(ms, ss, ns)}): cannot tell "
            f"apart at n = {min(nb, ns)} ({comparison.describe()}){caveat}."]


def grid(rows: list[dict], group_keys: list[str], metrics: list[str], scales: list, out_dir: Path,
         tests: list | None = None) -> list[str]:
    """An evaluation grid (two or more swept settings, e.g. ema.sigma_rel x w, or sampler x sampler.steps): a heatmap
    of the first metric's mean over seeds/checkpoints (rows: the first setting, columns: the second, one panel per
    value of the rest), its best cell outlined, and a line with that cell's t interval and its comparison with the
    runner-up (each arm's best cell: say so where it is quoted), appended to ``tests`` for the page's Holm
    correction. Writes grid.png; returns the report's lines."""
    axes = [*group_keys, *(["w"] if len(scales) > 1 else [])]
    if len(axes) < 2 or not metrics:
        return []
    name = metrics[0]
    value_of = lambda row, key: row["w"] if key == "w" else row["group"][group_keys.index(key)]  # noqa: E731
    cells = [r for r in rows if r[name][2] > 0 and (r["w"] is not None or "w" not in axes)]
    if not cells:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = lambda values: sorted(values, key=lambda v: (not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else json.dumps(v)))  # noqa: E731
    row_key, col_key, rest = axes[0], axes[1], axes[2:]
    distinct = lambda keys: list({json.dumps([value_of(r, k) for k in keys]): [value_of(r, k) for k in keys] for r in cells}.values())  # noqa: E731
    row_values, col_values = order([v for [v] in distinct([row_key])]), order([v for [v] in distinct([col_key])])
    panels = distinct(rest)
    lower = lower_is_better(name)
    best = min(cells, key=lambda r: r[name][0] if lower else -r[name][0])
    fig, axs = plt.subplots(1, len(panels), figsize=(max(6.5, 1.6 + 1.3 * len(col_values) * len(panels)), 1.4 + 0.55 * len(row_values)), squeeze=False)
    for ax, panel in zip(axs[0], panels):
        grid_values = [[math.nan] * len(col_values) for _ in row_values]
        here = [r for r in cells if [value_of(r, k) for k in rest] == panel]
        for r in here:
            grid_values[row_values.index(value_of(r, row_key))][col_values.index(value_of(r, col_key))] = r[name][0]
        image = ax.imshow(grid_values, cmap="viridis_r" if lower else "viridis", aspect="auto",  # one colour scale for all panels
                          vmin=min(r[name][0] for r in cells), vmax=max(r[name][0] for r in cells))
        for r in here:
            i, j = row_values.index(value_of(r, row_key)), col_values.index(value_of(r, col_key))
            dark = image.norm(r[name][0]) > 0.5 if lower else image.norm(r[name][0]) < 0.5
            spread = f"\n±{r[name][1]:.2g}" if r[name][2] > 1 else ""  # one run: no spread to show
            ax.text(j, i, f"{r[name][0]:.3g}{spread}", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
            if r is best:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        ax.set_xticks(range(len(col_values)), [str(v) for v in col_values], fontsize=8)
        ax.set_yticks(range(len(row_values)), [str(v) for v in row_values], fontsize=8)  # None: the key's default
        ax.set(xlabel=col_key, ylabel=row_key, title=", ".join(f"{k}={v}" for k, v in zip(rest, panel)) or name)
    fig.suptitle(f"{name} ({'lower' if lower else 'higher'} is better), mean ± std over seeds or checkpoints;\nthe best cell outlined", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_dir / "grid.png")
    plt.close(fig)
    where = ", ".join(f"{k}={value_of(best, k)}" for k in axes)
    lines = ["", "## Grid", "", f"![{name} over {' x '.join(axes)}](grid.png)", ""]
    interval = mean_interval(list(best["raw"][name].values()))
    text = f"Best cell: {where}: {name} {_fmt(*best[name])}"
    if interval:
        text += f", {LEVEL:.0%} CI of the mean [{interval[1]:.4g}, {interval[2]:.4g}]"
    runner_up = sorted((r for r in cells if r is not best), key=lambda r: r[name][0] if lower else -r[name][0])[:1]
    if runner_up:
        comparison = compare(best["raw"][name], runner_up[0]["raw"][name])
        other = ", ".join(f"{k}={value_of(runner_up[0], k)}" for k in axes)
        if comparison is not None and tests is not None:
            tests.append((f"grid, best cell vs runner-up: {where} vs {other}", comparison))
        text += (f"; the runner-up, {other}, {_fmt(*runner_up[0][name])}: "
                 + ("no statistics at n = 1" if comparison is None else
                    ("a difference at 95%" if comparison.clear else "cannot tell apart") + f" ({comparison.describe()})"))
    return [*lines, text + "."]


def plot(runs: list[dict], rows: list[dict], group_keys: list[str], metrics: list[str], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    color_key = group_keys[0] if group_keys else None
    if not any(r["curve"] for r in runs):
        return plot_quality(rows, group_keys, metrics, out_dir, plt)
    values = sorted({json.dumps(r["overrides"].get(color_key)) for r in runs}) if color_key else ["null"]
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(values)}
    fig, ax = plt.subplots(figsize=(7, 4))
    labelled = set()
    for r in runs:
        if not r["curve"]:
            continue
        steps, losses = zip(*r["curve"])
        smooth, acc = [], losses[0]
        for x in losses:  # exponential moving average: the raw per-step loss is too noisy to compare
            acc = 0.95 * acc + 0.05 * x
            smooth.append(acc)
        v = json.dumps(r["overrides"].get(color_key)) if color_key else "null"
        ax.plot(steps, smooth, color=colors[v], alpha=0.8, label=None if v in labelled else f"{color_key}={json.loads(v)}" if color_key else "run")
        labelled.add(v)
    ax.set(xlabel="step", ylabel="training loss (EMA 0.95)", yscale="log", title="Loss curves")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out_dir / "loss_curves.png")
    plt.close(fig)
    plot_quality(rows, group_keys, metrics, out_dir, plt)


def plot_quality(rows: list[dict], group_keys: list[str], metrics: list[str], out_dir: Path, plt) -> None:
    scaled = [r for r in rows if r["w"] is not None]
    if not scaled or not metrics:
        return
    shown = [m for m in metrics if m in ("guided_accuracy", "diversity") or m == "fid" or m.startswith("fd_")][:4]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
    for ax, name in zip(axes[0], shown):
        for group in sorted({json.dumps(r["group"]) for r in scaled}):
            series = sorted((r["w"], r[name]) for r in scaled if json.dumps(r["group"]) == group and r[name][2] > 0)
            if not series:
                continue
            label = ", ".join(f"{k}={v}" for k, v in zip(group_keys, json.loads(group))) or "all runs"
            ax.errorbar([w for w, _ in series], [s[0] for _, s in series], yerr=[s[1] for _, s in series], marker="o", capsize=3, label=label)
        ax.set(xlabel="guidance scale w", title=name)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_dir / "quality_vs_guidance.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory, e.g. multirun/2026-11-30/12-00-00")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: sweep_dir={str(args.sweep_dir)!r}: no such directory", file=sys.stderr)
        sys.exit(2)
    try:
        text = build_report(args.sweep_dir)
        write_bytes(args.sweep_dir / "report.md", text.encode())
    except (ReportError, WriteError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(text)


if __name__ == "__main__":
    main()

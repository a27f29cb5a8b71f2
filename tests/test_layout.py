"""The package's shape: imports flow one way and never in a circle, and the Python API runs without Lightning, Hydra,
omegaconf or wandb, as the README's example shows (which is executed here as written)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"

# Lower layers never import higher ones; a module may import its own layer (without a cycle).
LAYERS = [
    ("core", lambda m: m == "ddpm.core" or m.startswith("ddpm.core.")),
    ("foundation", lambda m: m in ("ddpm.options", "ddpm.files", "ddpm.data", "ddpm.images", "ddpm.snapshots",
                                   "ddpm.checkpoints", "ddpm.builders", "ddpm.interrupts")),
    ("evaluation", lambda m: m == "ddpm.evaluation" or m.startswith("ddpm.evaluation.")),
    ("rules", lambda m: m in ("ddpm.validation", "ddpm.preflight", "ddpm.unread")),
    ("inference", lambda m: m in ("ddpm", "ddpm.inference", "ddpm.diffusers_export")),
    ("training", lambda m: m == "ddpm.training" or m.startswith("ddpm.training.")),
    ("entry points", lambda m: True),  # config, build, train, sample, evaluate, export, report
]
FORBIDDEN_ON_THE_PYTHON_PATH = ("lightning", "lightning_fabric", "pytorch_lightning", "hydra", "omegaconf", "wandb")


def layer(module: str) -> int:
    return next(i for i, (_, inside) in enumerate(LAYERS) if inside(module))


def import_graph() -> dict[str, set[str]]:
    """Every module of ours and the modules of ours it imports, anywhere in it (inside functions too: an import
    deferred into a function is still a dependency)."""
    files = {".".join(f.relative_to(SOURCE).with_suffix("").parts).removesuffix(".__init__"): f
             for f in SOURCE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([base] if base else [])])
                found.add(base)
                found |= {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def test_imports_flow_one_way_without_cycles():
    graph = import_graph()
    assert "ddpm.inference" in graph and "ddpm.core.unet" in graph  # the walk found the package
    upward = sorted(f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
                    for a, targets in graph.items() for b in targets if layer(b) > layer(a))
    assert not upward, upward
    state: dict[str, int] = {}

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := cycle_from(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            assert (found := cycle_from(start, [start])) is None, " -> ".join(found)


def test_the_layer_check_catches_an_upward_import_and_a_cycle():
    """The checks above can fail: an evaluation module importing training is upward; a -> b -> a is a cycle."""
    assert layer("ddpm.training.module") > layer("ddpm.evaluation.metrics") > layer("ddpm.core.unet")
    assert layer("ddpm.train") == len(LAYERS) - 1 and layer("ddpm.inference") < layer("ddpm.training.sampling")
    graph = import_graph()
    assert "ddpm.data" in graph["ddpm.evaluation.metrics"]  # relative and absolute imports are both seen


def readme_example() -> str:
    (code,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return code


@pytest.mark.xdist_group("digits_classifier")
def test_the_readme_python_example_runs_as_written_without_lightning_hydra_or_wandb(tmp_path):
    """Acceptance 1 of issue 22: the README's example, run from the repository root in a fresh interpreter, works and
    leaves none of Lightning, Hydra, omegaconf or wandb imported (the digits classifier is cached in tmp_path)."""
    check = (f"\nimport sys\nleft = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN_ON_THE_PYTHON_PATH!r}))"
             "\nassert not left, left\nprint('CLEAN')\n")
    env = {**os.environ, "DDPM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", readme_example() + check], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([3, 1, 8, 8])" in result.stdout and result.stdout.strip().endswith("CLEAN")


def test_the_training_entry_point_imports_neither_torch_nor_lightning():
    """A SLURM job unpickles ``ddpm.train.main`` before submitit installs its preemption handler: the module stays light
    (issue 18, item 6), so a signal during start-up meets the handler instead of killing the job."""
    check = ("import sys, ddpm.train, hydra_plugins.ddpm_launchers\n"
             "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'pytorch_lightning', 'wandb'})\n"
             "assert not heavy, heavy\nprint('LIGHT')\n")
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "LIGHT" in result.stdout, result.stderr[-3000:]

"""metrics.json: the one writer and the one reader of evaluation records.

Two producers write one shape each, through ``write_metrics``:
- ``ddpm.evaluate``: one evaluation, ``{"metrics": ..., "protocol": ..., "command": ...}`` (``Pipeline.evaluate``'s
  record, and how the command shared its feature extractor between the evaluations of a multirun);
- training's final evaluation (``EvaluateAtEnd``): one per guidance scale, ``{"global_step", "final_loss",
  "evaluations": [{"guidance_scale", "metrics", "protocol"}, ...], "protocol"}``, each entry's protocol the same
  ``Pipeline.protocol`` as ddpm.evaluate's (files from before it have the shared one only).
``evaluations`` reads either as ``[(w, metrics)]``; ``ddpm.report`` reads nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

from ddpm.files import atomic_write


def write_metrics(path: str | Path, record: dict) -> None:
    """``record`` as indented JSON at ``path``, atomically (a reader, or a kill, never sees half of it)."""
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode()), what="metrics")


def evaluations(record: dict) -> list[tuple[float, dict | None]]:
    """``[(guidance scale w, metrics or None)]`` of a metrics.json of either shape; KeyError/TypeError when it is
    neither."""
    if "evaluations" in record:
        return [(entry["guidance_scale"], entry["metrics"]) for entry in record["evaluations"]]
    return [(record["protocol"]["guidance_scale"], record["metrics"])]

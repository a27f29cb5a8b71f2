"""Read back what wandb wrote offline: the records of a run's ``.wandb`` file (a LevelDB-style log of protobuf
``Record`` messages, the format ``wandb sync`` uploads), for the tests that check what a run logged."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7  # the log's block size and its per-chunk header (crc32, length, type)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    """Every complete ``wandb_internal_pb2.Record`` in ``path``, in order (a torn tail is dropped, as wandb sync does)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb run file"
    position, pending, out = HEADER, b"", []
    while position + HEADER <= len(data):
        room = BLOCK - position % BLOCK
        if room < HEADER:  # a block's tail too short for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        chunk = data[position + HEADER:position + HEADER + length]
        if kind == 0 or len(chunk) < length:  # zero padding, or a torn write
            break
        position += HEADER + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
            pending = b""
    parsed = []
    for raw in out:
        record = pb.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def run_segments(wandb_dir: Path) -> list[dict]:
    """One dict per offline segment under ``wandb_dir`` (``offline-run-*``), oldest first: its run id, whether it
    was resumed, and its history rows as {key: value} with ``_step``."""
    segments = []
    for folder in sorted(Path(wandb_dir).glob("offline-run-*")):
        (file,) = folder.glob("run-*.wandb")
        run_ids, history, exits = [], [], 0
        for record in records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.append(record.run.run_id)
            elif kind == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
            elif kind == "exit":
                exits += 1
        segments.append({"folder": folder.name, "run_ids": set(run_ids), "history": history, "finished": exits > 0})
    return segments

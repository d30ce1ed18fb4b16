"""Read an offline W&B run from its files: the logged history rows and the media files.

wandb's own Python reader of the ``run-*.wandb`` transaction log is gone from recent releases (the Go core
owns the format), so this reads the log directly: a 7-byte header (``:W&B``, magic 0xBEE1, version 0),
then LevelDB-log blocks of 32 KiB whose records are split into FULL/FIRST/MIDDLE/LAST chunks, each a
protobuf ``Record`` from ``wandb.proto``. Used to check offline runs without a server (and by the tests).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path) -> list[bytes]:
    buf = path.read_bytes()
    ident, magic, _version = HEADER.unpack_from(buf, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B transaction log (header {buf[:7]!r})")
    pos, parts, out = HEADER.size, [], []
    while pos + CHUNK.size <= len(buf):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = CHUNK.unpack_from(buf, pos)
        pos += CHUNK.size
        if kind == 0 and length == 0:
            pos += left - CHUNK.size
            continue
        parts.append(buf[pos : pos + length])
        pos += length
        if kind in (FULL, LAST):
            out.append(b"".join(parts))
            parts = []
    return out


def _parsed(log: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    records = []
    for data in _records(log):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        records.append(rec)
    return records


def read_offline_run(run_dir: str | Path, wait: float = 120.0) -> dict[str, Any]:
    """``{"history": [row, ...], "config": {...}, "run": {"name", "group", "job_type", "id", "resumed"},
    "media": [relative paths], "artifacts": [{"name", "type", "files", "aliases"}]}`` of one offline run
    folder.

    ``wandb.finish()`` can return before wandb's core process has written the end of the log (it writes
    asynchronously; on a loaded machine the gap is seconds). A finished run's log ends with its ``exit``
    record, so this waits up to ``wait`` seconds for that record and raises ``TimeoutError`` if it never
    comes (``wait=0``: read whatever is there, e.g. a crashed run)."""
    import time

    run_dir = Path(run_dir)
    logs = sorted(run_dir.glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"{run_dir}: no run-*.wandb file (not a W&B run folder)")
    deadline = time.monotonic() + wait
    while True:
        try:
            records = _parsed(logs[0])
        except Exception:  # a record cut off mid-write: read again once more of the log is on disk
            if wait <= 0 or time.monotonic() > deadline:
                raise
            records = []
        if wait <= 0 or any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{logs[0]}: no exit record after {wait:.0f} s (the run has not finished)")
        time.sleep(0.1)
    history, config, run, artifacts = [], {}, {}, []
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history.append(row)
        elif kind == "run":
            run = {"name": rec.run.display_name, "group": rec.run.run_group, "job_type": rec.run.job_type,
                   "id": rec.run.run_id, "resumed": rec.run.resumed}  # fmt: skip
            for item in rec.run.config.update:  # the config given to wandb.init
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            files = [e.path for e in rec.artifact.manifest.contents]
            artifacts.append({"name": rec.artifact.name, "type": rec.artifact.type, "files": sorted(files),
                              "aliases": list(rec.artifact.aliases)})  # fmt: skip
        elif kind == "config":
            for item in rec.config.update:
                key = item.key or "/".join(item.nested_key)
                config[key] = json.loads(item.value_json)
    media_root = run_dir / "files"
    media = sorted(
        str(p.relative_to(media_root)) for p in media_root.rglob("*") if p.is_file() and "media" in p.parts
    )
    return {"history": history, "config": config, "run": run, "media": media, "artifacts": artifacts}


def offline_runs(save_dir: str | Path) -> list[Path]:
    """Offline run folders under a logger's ``save_dir`` (oldest first)."""
    return sorted(Path(save_dir).glob("wandb/offline-run-*"))

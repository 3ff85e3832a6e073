"""Reads what a run actually logged from its offline ``run-<id>.wandb`` file.

The file is wandb's 7-byte header (":W&B", magic, version) followed by a LevelDB-format log of
32 KiB blocks; each record is a ``wandb_internal_pb2.Record``. wandb 0.31 ships no Python reader
(its core is in Go), so the tests carry this small one.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_HEADER = 7
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class LoggedRun:
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    run: pb.RunRecord | None = None
    metrics: list[pb.MetricRecord] = field(default_factory=list)


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:  # trailer padding
            pos += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0


def _items(items) -> dict:
    """Items to a dict; media and tables arrive as nested keys (["live/acc_matrix", "_type"])."""
    out: dict = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def _records(path: Path, wait_s: float) -> list[pb.Record]:
    """The file's records once W&B's service has written its last one (``exit``): ``run.finish()``
    can return before the service, another process, has flushed, on a loaded machine."""
    deadline = time.monotonic() + wait_s
    while True:
        records = []
        for payload in _payloads(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
        kinds = [record.WhichOneof("record_type") for record in records]
        if kinds and kinds[-1] == "exit":
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {wait_s} s; records: {kinds}"
        time.sleep(0.2)


def read_run(path: Path, wait_s: float = 60) -> LoggedRun:
    """Parse one ``run-*.wandb`` file."""
    logged = LoggedRun()
    for record in _records(path, wait_s):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            logged.history.append(_items(record.history.item))
        elif kind == "summary":
            logged.summary.update(_items(record.summary.update))
        elif kind == "config":
            logged.config.update(_items(record.config.update))
        elif kind == "run":
            logged.run = record.run
            logged.config.update(_items(record.run.config.update))
        elif kind == "metric":
            logged.metrics.append(record.metric)
    return logged


def find_run_file(root: Path) -> Path:
    files = sorted(root.rglob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]

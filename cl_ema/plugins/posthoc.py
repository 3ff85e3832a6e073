"""Post-hoc averaging (EDM2's, Karras et al., CVPR 2024; exact in discrete optimizer steps): during training a
small basis of EMAs is saved now and then; after the run ``python -m cl_ema.posthoc`` rebuilds from those
snapshots an average of any horizon (``cl_ema.profiles``: the profiles, the least-squares fit).

Options: ``cl_ema.plugins.options.PostHoc``. Files, in the run folder:

- ``posthoc/snapshots-<k>.bin``: the snapshots taken with k tasks done (k = 0: the start and task 0's; then
  the end of task k − 1 and task k's), appended raw: each snapshot its rows (each basis EMA, and at task ends
  the live weights) one after the other, each the engine's flat tensors one per (device, dtype) group, in the
  storage dtype (``read_snapshot`` reads one back);
- ``posthoc/manifest.json``: what the snapshots are, exactly: each basis row's rule and decay, each
  snapshot's step, task, rows, file and offset in it, the task ends, and the layout of the flat tensors (names
  and sizes).

The snapshots are part of the resumable run: the checkpoint holds the list written up to it, and a run
resumed from it cuts the files back to that list (removing what the stopped run wrote after its checkpoint),
then writes the rest again, the same. A snapshot is appended without a flush to disk, its rows written
straight from the shadows. The files are flushed, and the manifest that lists them written, when a checkpoint
takes the plugin's state and at the last task end (or when ``flush()`` is called): nothing reads the manifest
before the run ends unless a checkpoint refers to it (a run stopped without one can neither resume nor be
rebuilt). A flush per snapshot cost a small model's run more than its training steps; one at every task end
too doubled a split-digits run's flushing (0.025 s against 0.012 s, ``benchmarks/posthoc_overhead.py``).
Raw and appended, because ``torch.save`` of a split-digits snapshot took 0.6 ms, twice its write, and a file
per snapshot was 16 files a task to create, rename and flush (and a 20-task run's 321 files on a cluster's
file quota).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cl_ema.environment import is_main
from cl_ema.errors import UserError
from cl_ema.files import append, atomic_write, sync, writing
from cl_ema.plugins import Position
from cl_ema.plugins.averaging import AveragingPlugin
from cl_ema.plugins.options import PostHoc
from cl_ema.rules import EMARule, Rule, horizon_decay, number

FOLDER, MANIFEST, FORMAT = "posthoc", "manifest.json", "cl_ema-posthoc-2"
LIVE_ROW = "live"
SUFFIX = ".bin"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PostHocPlugin(AveragingPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Keeps the basis of EMAs and writes its snapshots (see the module docstring). ``task_steps``: the first
    task's optimizer steps (the cadence is a share of it); ``num_tasks``: the stream's tasks (the disk the
    snapshots need is known before training, and the manifest is written at the end of task ``num_tasks`` and
    of every task after it; ``flush()`` writes it when training stops sooner); ``run_dir``: where they go. A
    cl_ema run gives all three."""

    def __init__(
        self,
        options: PostHoc | None = None,
        /,
        *,
        task_steps: int | None = None,
        num_tasks: int = 1,
        run_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.options = options if options is not None else PostHoc(**kwargs)
        if task_steps is None or run_dir is None:
            raise UserError(
                "posthoc: needs the first task's optimizer steps and a run folder (a cl_ema run gives both)"
            )
        per_task = self.options.per_task
        self.decays = [horizon_decay(b / per_task, task_steps) for b in self.options.basis]
        self.row_names = [f"ema_{number(b)}x" for b in self.options.basis]  # horizon in units of the cadence
        self.task_steps, self.num_tasks = task_steps, num_tasks
        self.folder = Path(run_dir) / FOLDER
        self.dtype = DTYPES[str(self.options.dtype)]
        self.snapshots: list[dict[str, Any]] = []
        self.task_ends: list[int] = []
        self.plan: set[int] = set()  # steps of the current task at which the basis is saved (its end apart)
        self.unsynced: list[Path] = []  # files appended to since the last flush
        self.listed = -1  # snapshots the manifest on disk lists (-1: none written by this plugin yet)
        self.written: dict[str, int] = {}  # bytes of each file, as the snapshots listed fill it
        self.resumed = False  # loaded from a checkpoint, the files not cut back to it yet

    def engine_rules(self) -> list[Rule]:
        return [EMARule(decay) for decay in self.decays]

    # ------------------------------------------------------------------ disk
    def disk_needed(self) -> int:
        """Bytes of every snapshot of the run: the basis ``per_task`` times a task, the live weights at step 0 and
        at every task end."""
        rows = self.num_tasks * (self.options.per_task * len(self.decays) + 1) + 1
        return rows * self.row_bytes()

    def row_bytes(self) -> int:
        """Bytes of one row of a snapshot: the averaged tensors in the storage dtype."""
        return sum(group.live.numel() for group in self.engine.groups) * self.dtype.itemsize

    def summary(self) -> str:
        horizons = ", ".join(f"{1 / (1 - d):,.0f}" for d in self.decays)
        return (
            f"posthoc: EMAs of horizons {horizons} steps, saved {self.options.per_task} times a task and the live "
            f"weights at each task end, {self.options.dtype}: {self.disk_needed() / 2**20:,.1f} MiB in "
            f"{self.folder}"
        )

    def registered(self) -> None:
        if not is_main(strict=False):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.folder).free
        if self.disk_needed() > free:
            raise UserError(
                f"posthoc: the snapshots need {self.disk_needed() / 2**30:.2f} GiB, {self.folder} has "
                f"{free / 2**30:.2f} GiB free (posthoc.per_task or posthoc.dtype=bfloat16 need less)"
            )

    # ------------------------------------------------------------------ training
    def before_training_exp(self, strategy, **kwargs) -> None:
        if self.resumed:
            self.cut_to_checkpoint()
            self.resumed = False
        if not self.snapshots:  # the weights before the first step (a resumed run has its checkpoint's list)
            self.save(self.engine.step, live=True, basis=False)
        start, steps = self.engine.step, len(strategy.dataloader) * strategy.train_epochs
        per_task = self.options.per_task
        self.plan = {start + round(j * steps / per_task) for j in range(1, per_task)}

    def after_update(self, strategy, **kwargs) -> None:
        self.engine.update()
        if self.engine.step in self.plan:
            self.save(self.engine.step, live=False, basis=True)

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.task_ends.append(self.engine.step)
        self.save(self.engine.step, live=True, basis=True)
        if len(self.task_ends) >= self.num_tasks:  # earlier task ends are flushed by their checkpoints, if any
            self.flush()

    def save(self, step: int, *, live: bool, basis: bool) -> None:
        """Write one snapshot (the main process only); ``flush`` lists it in the manifest."""
        rows: dict[str, list[torch.Tensor]] = {}
        if basis:
            rows |= {name: self.engine.shadow_rows(k) for k, name in enumerate(self.row_names)}
        if live:
            rows[LIVE_ROW] = [group.live for group in self.engine.groups]
        file = snapshot_file(len(self.task_ends))
        offset = self.written.get(file, 0)
        entry = {"step": step, "task": len(self.task_ends), "file": file, "offset": offset, "rows": list(rows)}
        self.snapshots.append(entry)
        self.written[file] = offset + len(rows) * self.row_bytes()
        if not is_main(strict=False):
            return
        # each flat tensor as it is when it is on the CPU in the storage dtype: no copy
        pieces = [t.detach().to("cpu", self.dtype).view(torch.uint8).numpy().data for row in rows.values() for t in row]
        append(self.folder / file, pieces, at=offset)
        if self.folder / file not in self.unsynced:
            self.unsynced.append(self.folder / file)

    def flush(self) -> None:
        """The snapshots written so far on disk, then the manifest that lists them (the main process only)."""
        if is_main(strict=False) and self.listed != len(self.snapshots):  # else the manifest lists them all already
            sync(self.unsynced)
            self.unsynced.clear()
            self.write_manifest()

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "dtype": str(self.options.dtype),
            "basis": [
                {"row": name, "rule": "ema", "decay": decay, "horizon_steps": 1 / (1 - decay)}
                for name, decay in zip(self.row_names, self.decays)
            ],
            "per_task": self.options.per_task,
            "first_task_steps": self.task_steps,
            "task_ends": self.task_ends,
            "layout": [list(zip(group.names, group.sizes)) for group in self.engine.groups],
            "snapshots": self.snapshots,
        }

    def write_manifest(self) -> None:
        atomic_write(self.folder / MANIFEST, json.dumps(self.manifest(), indent=1) + "\n")
        self.listed = len(self.snapshots)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        self.flush()  # a checkpoint must not list a snapshot that a crash of the machine could still lose
        return {"averages": self.engine.state_dict(), "snapshots": self.snapshots, "task_ends": self.task_ends}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        snapshots, ends = state.get("snapshots"), state.get("task_ends")
        if not isinstance(snapshots, list) or not isinstance(ends, list) or not all(_count(e) for e in ends):
            raise ValueError("the post-hoc state lacks its snapshots or task ends")
        written = file_sizes(snapshots, self.row_names, self.row_bytes())
        self.engine.load_state_dict(state.get("averages") or {})
        self.snapshots, self.task_ends, self.written = list(snapshots), list(ends), written
        for file, size in written.items():
            path = self.folder / file
            if is_main(strict=False) and (not path.is_file() or path.stat().st_size < size):
                held = f"holds {path.stat().st_size:,} bytes" if path.is_file() else "is missing"
                raise ValueError(f"its snapshot file {path} {held}, the checkpoint lists {size:,}")
        self.resumed = True  # the files are cut back when training goes on: a refused resume changes nothing

    def cut_to_checkpoint(self) -> None:
        """Remove what the stopped run wrote after its checkpoint (written again, the same, as training goes on)."""
        if is_main(strict=False):
            for path in self.folder.glob(f"*{SUFFIX}"):
                with writing(path):
                    if path.name not in self.written:
                        path.unlink()
                    elif path.stat().st_size > self.written[path.name]:
                        os.truncate(path, self.written[path.name])
            self.unsynced.clear()
            self.write_manifest()

    def check_position(self, at: Position) -> None:
        self.check_steps(at)
        if len(self.task_ends) != at.tasks_done or (self.task_ends and self.task_ends[-1] != at.steps):
            raise ValueError(f"its task ends {self.task_ends[-3:]} do not end the run's {at.tasks_done} tasks")
        if any(entry["step"] > at.steps for entry in self.snapshots):
            raise ValueError("it lists snapshots after the run's last step")


def snapshot_file(tasks_done: int) -> str:
    return f"snapshots-{tasks_done:04d}{SUFFIX}"


def file_sizes(entries: list[Any], basis_rows: list[str], row_bytes: int) -> dict[str, int]:
    """The bytes of each snapshot file that ``entries`` fill, one after the other in their files; ValueError
    naming the first that is not an entry as ``save`` lists it, of a basis of rows ``basis_rows``."""
    sizes: dict[str, int] = {}
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and _count(entry.get("step"))
            and _count(entry.get("task"))
            and entry.get("file") == snapshot_file(entry["task"])
            and entry.get("offset") == sizes.get(entry["file"], 0)  # each file filled in order
            and _count(entry["offset"])
            and isinstance(entry.get("rows"), list)
            and set(entry["rows"]) <= {*basis_rows, LIVE_ROW}
            and len(set(entry["rows"])) == len(entry["rows"])
        ):
            raise _not_the_plugins(entry)
        sizes[entry["file"]] = entry["offset"] + len(entry["rows"]) * row_bytes
    return sizes


def _not_the_plugins(entry: Any) -> ValueError:
    return ValueError(f"a snapshot entry is not one the plugin writes: {str(entry)[:80]}")


def check_manifest(manifest: Any) -> None:
    """ValueError naming what is wrong unless ``manifest`` has the shape ``PostHocPlugin.manifest`` gives it and
    agrees with itself: steps within the task ends, each file filled in order by its snapshots' rows."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"not a post-hoc manifest of this version (format {FORMAT})")
    basis = manifest.get("basis")
    if not isinstance(basis, list) or not all(
        isinstance(b, dict) and isinstance(b.get("row"), str) and isinstance(b.get("decay"), float) for b in basis
    ):
        raise ValueError("its basis is not a list of rows with their decays")
    rows = [b["row"] for b in basis]
    if len(set(rows)) != len(rows) or not all(0 <= b["decay"] < 1 for b in basis):
        raise ValueError("its basis names a row twice or has a decay outside [0, 1)")
    layout, ends = manifest.get("layout"), manifest.get("task_ends")
    if not isinstance(layout, list) or not all(
        isinstance(group, list)
        and all(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and _count(pair[1])
                for pair in group)
        for group in layout
    ):  # fmt: skip
        raise ValueError("its layout is not a list of groups of (name, size)")
    if not isinstance(ends, list) or not ends or not all(_count(e) for e in ends) or ends != sorted(set(ends)):
        raise ValueError("its task ends are not an increasing list of steps")
    if manifest.get("dtype") not in DTYPES or not all(
        _count(manifest.get(k)) for k in ("per_task", "first_task_steps")
    ):
        raise ValueError(
            f"its dtype, per_task or first_task_steps is not one the plugin writes (dtypes: {list(DTYPES)})"
        )
    if not 0 < manifest["first_task_steps"] <= ends[-1]:
        raise ValueError(f"its first_task_steps {manifest['first_task_steps']} is not within its {ends[-1]} steps")
    entries = manifest.get("snapshots")
    if not isinstance(entries, list) or not entries:
        raise ValueError("it lists no snapshots")
    row_bytes = sum(pair[1] for group in layout for pair in group) * DTYPES[manifest["dtype"]].itemsize
    file_sizes(entries, rows, row_bytes)
    last_step = 0
    for entry in entries:  # in step order, none after the last task end
        if not last_step <= entry["step"] <= ends[-1]:
            raise _not_the_plugins(entry)
        last_step = entry["step"]


def read_snapshot(
    path: Path, entry: dict[str, Any], sizes: list[int], dtype: torch.dtype
) -> dict[str, list[torch.Tensor]]:
    """The rows of the snapshot of manifest entry ``entry`` in ``path`` (see the module docstring): by row name,
    one flat tensor per group of ``sizes`` elements. ValueError if the file ends before it does."""
    rows = entry["rows"]
    size = len(rows) * sum(sizes) * dtype.itemsize
    with path.open("rb") as handle:
        handle.seek(entry["offset"])
        data = bytearray(handle.read(size))
    if len(data) != size:
        raise ValueError(
            f"{len(data):,} bytes at offset {entry['offset']:,}, not {len(rows)} rows of {sum(sizes)} values"
        )
    flat = torch.frombuffer(data, dtype=dtype)
    return {name: list(row.split(sizes)) for name, row in zip(rows, flat.split(sum(sizes)))}


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0

"""Any EMA horizon, chosen after the run: ``python -m cl_ema.posthoc RUN_DIR --horizons 0.25 0.5 1 2 4 --decays 0.999``.

For each run below ``RUN_DIR`` that saved post-hoc snapshots (``+plugin@posthoc=posthoc``,
``cl_ema.plugins.posthoc``), each target — an EMA of a horizon in tasks (``d = 1 − 1/(h·S)``, ``S`` the first
task's optimizer steps) or of a decay — is rebuilt at every task end from the snapshots taken at or before it
(``cl_ema.profiles``: the exact discrete profiles, their least-squares fit), evaluated on every test task as
the run evaluated its tracks, and added to the run's ``results.json`` as track ``posthoc_ema_h<h>`` or
``posthoc_ema_<decay>``, with ``track_info`` saying ``posthoc: true`` and its largest relative residual. The
report and ``cl_ema.load`` read them like any track. Tracks a run has already are left as they are, so a
second call with other targets only adds. An unfinished run, a run without snapshots, or a target whose
residual exceeds ``--max-residual`` at some task end is one line (exit 2), and nothing of that run is written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cl_ema.config import check
from cl_ema.data.stream import build_stream
from cl_ema.distributed import resolve_device
from cl_ema.ema import WeightAverages, row
from cl_ema.errors import UserError, first_line
from cl_ema.evaluation import KeptBatches, evaluate_tracks
from cl_ema.models import build_model
from cl_ema.options import OptionError
from cl_ema.plugins import Track
from cl_ema.plugins.posthoc import DTYPES, FOLDER, LIVE_ROW, MANIFEST, check_manifest, read_snapshot
from cl_ema.profiles import combine, ema_target, profiles_at, reconstruct_all
from cl_ema.results import Results, save_outputs
from cl_ema.rules import EMARule, Frozen, horizon_decay, number

DEFAULT_MAX_RESIDUAL = 0.02  # the default basis rebuilds EMAs of 0.05 to 8 tasks within 0.9 % (cl_ema.profiles)


@dataclass(frozen=True)
class Target:
    """An EMA to rebuild: its track name, decay, and horizon in tasks (when it was asked so)."""

    name: str
    decay: float
    horizon_tasks: float | None


def targets(horizons: Sequence[float], decays: Sequence[float], first_task_steps: int) -> list[Target]:
    try:
        made = [Target(f"posthoc_ema_h{number(h)}", horizon_decay(h, first_task_steps), h) for h in horizons]
    except OptionError as err:
        raise UserError(f"--horizons {err.value:g}: {err.expected}") from None
    return made + [Target(f"posthoc_ema_{number(d)}", d, None) for d in decays]


def post_hoc_runs(root: Path) -> list[Path]:
    """``root`` if it is a run folder; else the run folders below it that kept snapshots."""
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    if (root / "results.json").is_file():
        return [root]
    runs = sorted(path.parent for path in root.rglob("results.json"))
    if not runs:
        raise UserError(f"{root}: no run below it (no results.json)")
    # the folder, not the manifest: a run stopped without a checkpoint has no manifest, and is named as unfinished
    kept = [run for run in runs if (run / FOLDER).is_dir()]
    if not kept:
        raise UserError(f"{root}: none of its {len(runs)} runs kept post-hoc snapshots (+plugin@posthoc=posthoc)")
    return kept


def add_tracks(run_dir: Path, horizons: Sequence[float], decays: Sequence[float], max_residual: float) -> list[str]:
    """Rebuild, evaluate and record the targets that ``run_dir`` does not have yet; their names."""
    try:
        results = Results.from_dict(json.loads((run_dir / "results.json").read_text()))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"{run_dir / 'results.json'}: not the results of a cl_ema run ({first_line(err)})") from None
    if results.status != "completed":
        raise UserError(
            f"{run_dir}: the run is {results.status} after {results.tasks_done}/{results.num_tasks} tasks "
            "(post-hoc tracks are rebuilt at every task end of a completed run)"
        )
    manifest = read_manifest(run_dir)
    if manifest["task_ends"] != list(itertools.accumulate(results.meta["steps_per_task"])):
        raise UserError(
            f"{run_dir / FOLDER / MANIFEST}: its task ends {manifest['task_ends'][:6]} are not the run's "
            f"(results.json: {results.meta['steps_per_task'][:6]} steps a task)"
        )
    wanted = [t for t in targets(horizons, decays, manifest["first_task_steps"]) if t.name not in results.tracks]
    if not wanted:
        return []
    try:
        cfg = OmegaConf.load(run_dir / "config.yaml")
    except (OSError, ValueError, OmegaConfBaseException) as err:
        raise UserError(f"{run_dir / 'config.yaml'}: not readable ({first_line(err)})") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{run_dir / 'config.yaml'}: not a run's configuration")
    checked = check(cfg)
    c = checked.config
    device = resolve_device(c.device)
    stream = build_stream(checked.dataset, c.data, seed=c.seed, device=device)
    model = build_model(checked.model, stream.spec).to(device)
    if c.train.channels_last:
        model.to(memory_format=torch.channels_last)
    engine = WeightAverages(model, [Frozen() for _ in wanted])  # one row per target, loaded at each task end
    engine.register()
    layout = [[[name, size] for name, size in zip(group.names, group.sizes)] for group in engine.groups]
    if [list(map(list, group)) for group in manifest["layout"]] != layout:
        raise UserError(f"{run_dir / FOLDER / MANIFEST}: its snapshots do not fit the run's model (another layout)")
    snapshots = Snapshots(run_dir / FOLDER, manifest)
    fits: dict[str, list[tuple[float, list[torch.Tensor]]]] = {t.name: [] for t in wanted}  # per task end
    for task, end in enumerate(manifest["task_ends"]):
        basis, tensors = snapshots.basis_at(end)
        profiles = torch.stack([ema_target(t.decay, end) for t in wanted])
        for target, fit in zip(wanted, reconstruct_all(basis, profiles)):
            if fit.residual > max_residual:
                raise UserError(
                    f"{run_dir}: {target.name} cannot be rebuilt from the snapshots at task {task + 1} (relative "
                    f"residual {fit.residual:.3f} > --max-residual {max_residual}): its horizon is shorter than the "
                    "snapshots' cadence, or the basis too narrow (posthoc.per_task, posthoc.basis)"
                )
            fits[target.name].append((fit.residual, [combine(fit.coefficients, group) for group in zip(*tensors)]))
    tracks = [
        Track(t.name, partial(engine.swapped, k), state=partial(engine.state, row(k))) for k, t in enumerate(wanted)
    ]
    for target in wanted:
        results.add_track(target.name)
    kept = KeptBatches()  # the test sets, built once for every task end
    for task in range(len(manifest["task_ends"])):  # every target of a task end in one pass over the test sets
        for k, target in enumerate(wanted):
            for shadow, value in zip(engine.shadow_rows(k), fits[target.name][task][1]):
                shadow.copy_(value.to(shadow.device))
        evaluated = evaluate_tracks(model, tracks, stream, task, batch_size=c.train.eval_batch_size, kept=kept)
        for name, accuracies in evaluated.items():
            results.record(name, task, accuracies)
    for target in wanted:
        results.meta["track_info"][target.name] = {
            "rule": "ema",
            "decay": target.decay,
            "horizon": float(f"{1 / (1 - target.decay):.12g}"),
            "horizon_tasks": target.horizon_tasks,
            "posthoc": True,
            "residual": float(f"{max(r for r, _ in fits[target.name]):.6g}"),
        }
    save_outputs(results, run_dir)
    return [t.name for t in wanted]


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / FOLDER / MANIFEST
    if not path.is_file():
        raise UserError(f"{run_dir}: no post-hoc snapshots (train with +plugin@posthoc=posthoc to keep them)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not readable ({err})") from None
    try:
        check_manifest(manifest)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    return manifest


class Snapshots:
    """A run's snapshots: their profiles at a step, and their tensors (read once each)."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder, self.manifest = folder, manifest
        self.decays = {b["row"]: b["decay"] for b in manifest["basis"]}
        self.sizes = [sum(size for _, size in group) for group in manifest["layout"]]
        self.dtype = DTYPES[manifest["dtype"]]
        self.loaded: dict[tuple[str, int], dict[str, list[torch.Tensor]]] = {}

    def tensors(self, entry: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        """The rows of the snapshot of manifest entry ``entry``."""
        key = entry["file"], entry["offset"]
        if key not in self.loaded:
            try:
                self.loaded[key] = read_snapshot(self.folder / entry["file"], entry, self.sizes, self.dtype)
            except (OSError, ValueError) as err:  # a missing, truncated or foreign file
                raise UserError(f"{self.folder / entry['file']}: not a readable snapshot ({err})") from None
        return self.loaded[key]

    def basis_at(self, step: int) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """The profiles (rows, step + 1) of every snapshot row saved at or before ``step``, and their tensors."""
        entries = [e for e in self.manifest["snapshots"] if e["step"] <= step]
        rows, tensors = [], []
        by_rule = {
            name: profiles_at(EMARule(decay), [e["step"] for e in entries], step) for name, decay in self.decays.items()
        }
        for i, entry in enumerate(entries):
            saved = self.tensors(entry)
            for name in entry["rows"]:
                if name == LIVE_ROW:
                    one = torch.zeros(step + 1, dtype=torch.float64)
                    one[entry["step"]] = 1.0
                    rows.append(one)
                else:
                    rows.append(by_rule[name][i])
                tensors.append([t.to(torch.float32) for t in saved[name]])
        return torch.stack(rows), tensors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cl_ema.posthoc", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a run folder, or a folder of runs (outputs/, multirun/)")
    parser.add_argument("--horizons", type=float, nargs="*", default=[], help="EMA horizons in tasks")
    parser.add_argument("--decays", type=float, nargs="*", default=[], help="EMA decays")
    parser.add_argument(
        "--max-residual",
        type=float,
        default=DEFAULT_MAX_RESIDUAL,
        help="the largest relative L2 residual of a rebuilt profile (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        if not args.horizons and not args.decays:
            raise UserError("give --horizons (in tasks) or --decays: the EMAs to rebuild")
        if any(not (h > 0) for h in args.horizons) or any(not (0 <= d < 1) for d in args.decays):
            raise UserError("--horizons must be > 0 and --decays in [0, 1)")
        if not 0 < args.max_residual < math.inf:
            raise UserError(f"--max-residual {args.max_residual:g}: must be a number > 0 (a relative residual)")
        for run_dir in post_hoc_runs(args.root):
            added = add_tracks(run_dir, args.horizons, args.decays, args.max_residual)
            print(f"{run_dir}: " + (f"added {', '.join(added)}" if added else "has every track asked for already"))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

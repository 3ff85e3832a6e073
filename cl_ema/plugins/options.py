"""What each of cl_ema's plugins lets a config set: one options class per plugin, torch-free.

A plugin's config file (``conf/plugin/<name>.yaml``) names its options class as ``_target_`` and mirrors
its defaults; constructing the class checks every option (types, ranges, choices: ``cl_ema.options``)
before torch or Avalanche is imported. ``builds`` names the plugin it configures, which takes the options
object first — ``EMAPlugin(EMA(decay=0.999))`` — or the same options as keywords:
``EMAPlugin(decay=0.999)``. An option that another option overrides is recorded as ``null`` (``decay``
beside ``horizons``), so a run's config never names a value it did not use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Annotated, Any, ClassVar

from pydantic import Field, Strict

from cl_ema.options import (
    Choice,
    Flag,
    Fraction,
    Fractions,
    MemorySize,
    NonNegative,
    OptionError,
    Positive,
    Positives,
    Size,
    options,
)
from cl_ema.rules import Buffers, EMAOptions, check_entry


class Sync(Choice):
    none = "none"  # evaluation only: training never sees the averages
    task_end = "task_end"  # the EMA weights are loaded into the live model after each task


@options
class EMA(EMAOptions):
    """EMA shadows of the model, one per decay, each an evaluation track (``cl_ema.plugins.ema.EMAPlugin``):
    ``decay`` (one shadow), or ``decays`` (several), or ``horizons`` in units of the first task's optimizer
    steps ``S`` (decay ``1 − update_every/(h·S)``); the schedule options of ``cl_ema.rules.EMAOptions``;
    ``recompute_bn``: re-estimate BatchNorm statistics of each shadow on the last task's batches before it is
    evaluated; ``sync=task_end``: load the (single) shadow into the live model after each task, which
    changes training."""

    builds: ClassVar[str] = "cl_ema.plugins.ema.EMAPlugin"

    decay: Fraction | None = 0.999
    decays: Fractions | None = None  # several decays from one run; replaces decay
    horizons: Positives | None = None  # in units of the first task's optimizer steps; replaces decay
    buffers: Buffers = Buffers.average  # BatchNorm statistics: averaged, or the live model's
    recompute_bn: Flag = False
    sync: Sync = Sync.none

    def __post_init__(self) -> None:
        if self.decays is not None and self.horizons is not None:
            raise OptionError("horizons", self.horizons, "give decays or horizons, not both")
        if self.decays is not None or self.horizons is not None:
            self.decay = None  # replaced
        elif self.decay is None:
            raise OptionError("decay", None, "give a decay, decays or horizons")
        if self.sync == Sync.task_end and len(self.horizons or self.decays or [self.decay]) > 1:
            raise OptionError("sync", str(self.sync), "changes training, so it takes one decay, not several")
        EMAOptions.__post_init__(self)

    def entries(self) -> list[dict[str, Any]]:
        """One ``ema`` rule entry (``cl_ema.rules``) per shadow."""
        schedule = {f.name: getattr(self, f.name) for f in dataclasses.fields(EMAOptions)}
        if self.horizons is not None:
            return [{"rule": "ema", "horizon": h, **schedule} for h in self.horizons]
        return [{"rule": "ema", "decay": d, **schedule} for d in self.decays or [self.decay]]  # type: ignore[list-item]


@options
class Averages:
    """Evaluation-only averages of the live trajectory, one track per entry of ``rules``
    (``cl_ema.plugins.averaging.AveragesPlugin``): each entry names a rule of ``cl_ema.rules`` and its options,
    ``{rule: wise, anchor: prev_task, alpha: 0.5}``, and may name its track (``name: …``)."""

    builds: ClassVar[str] = "cl_ema.plugins.averaging.AveragesPlugin"

    rules: list[dict[str, Any]] = field(default_factory=list)
    buffers: Buffers = Buffers.average  # BatchNorm statistics: averaged, or the live model's

    def __post_init__(self) -> None:
        if not self.rules:
            raise OptionError("rules", self.rules, "give at least one rule")
        for index, entry in enumerate(self.rules):
            try:
                self.rules[index] = check_entry(entry)
            except OptionError as err:
                raise err.renamed(f"rules[{index}]") from None


@options
class CLSER:
    """CLS-ER's plastic and stable EMA teachers (``cl_ema.plugins.cls_er.CLSERPlugin``)."""

    builds: ClassVar[str] = "cl_ema.plugins.cls_er.CLSERPlugin"

    reg_weight: NonNegative = 0.1  # λ of the consistency loss
    plastic_decay: Fraction = 0.999
    plastic_update_prob: Fraction = 0.9
    stable_decay: Fraction = 0.999
    stable_update_prob: Fraction = 0.7


@options
class CoMA:
    """CoMA (``fisher=false``) or CoFiMA (``fisher=true``) (``cl_ema.plugins.coma.CoMAPlugin``); ``weight``: λ,
    the new task's share of each merge."""

    builds: ClassVar[str] = "cl_ema.plugins.coma.CoMAPlugin"

    weight: Fraction = 0.5  # λ, as the authors' code runs it
    fisher: Flag = False
    fisher_max: Annotated[float, Strict(), Field(gt=0, le=1e6)] = 1e-4  # their cap on the Fisher
    buffers: Buffers = Buffers.average


@options
class DER:
    """DER (``beta=0``) and DER++ (``beta>0``) (``cl_ema.plugins.der.DERPlugin``); ``batch_size_mem``: memory
    samples per batch (Mammoth's ``minibatch_size``; null: as many as the training batch)."""

    builds: ClassVar[str] = "cl_ema.plugins.der.DERPlugin"

    mem_size: MemorySize = 200
    batch_size_mem: Size | None = None
    alpha: NonNegative = 0.5
    beta: NonNegative = 0.0


class ReplayPolicy(Choice):
    class_balanced = "class_balanced"  # Avalanche's ClassBalancedBuffer, updated after each task
    reservoir = "reservoir"  # Mammoth's ER: reservoir sampling over the stream, updated every step


@options
class Replay:
    """Experience replay from a memory of ``mem_size`` samples, ``batch_size_mem`` replayed per step (null: as
    many as the training batch) (``cl_ema.plugins.replay.replay``)."""

    builds: ClassVar[str] = "cl_ema.plugins.replay.replay"

    mem_size: MemorySize = 200
    batch_size_mem: Size | None = None
    policy: ReplayPolicy = ReplayPolicy.class_balanced


@options
class LwF:
    """Learning without Forgetting, through Avalanche's ``LwFPlugin`` (``cl_ema.plugins.lwf.LwFPlugin``)."""

    builds: ClassVar[str] = "cl_ema.plugins.lwf.LwFPlugin"

    alpha: NonNegative = 1.0
    temperature: Positive = 2.0  # the logits are divided by it


class Storage(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"  # half the disk; each snapshot rounded to 2⁻⁹ of its value


@options
class PostHoc:
    """Snapshots of a small basis of EMAs, from which ``python -m cl_ema.posthoc`` rebuilds an average of any
    horizon after the run (``cl_ema.plugins.posthoc.PostHocPlugin``; formulas: ``cl_ema.profiles``). The basis:
    EMAs of horizons ``basis`` × Δ, with Δ = S / ``per_task`` optimizer steps (S: the first task's steps),
    saved ``per_task`` times a task, evenly spread, the last at the task's end; the live weights are saved
    at step 0 and at every task end. The defaults were measured by ``benchmarks/posthoc_basis.py``."""

    builds: ClassVar[str] = "cl_ema.plugins.posthoc.PostHocPlugin"

    basis: Positives = field(default_factory=lambda: [1.0, 4.0])  # EMA horizons, in units of the cadence Δ
    per_task: Annotated[int, Strict(), Field(ge=1, le=10_000)] = 16  # snapshots a task (Δ = S / per_task)
    dtype: Storage = Storage.float32  # how snapshots are stored

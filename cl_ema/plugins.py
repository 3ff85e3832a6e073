"""Avalanche plugins of cl_ema: the EMA of the weights, replay, and a training progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import ReplayPlugin as AvalancheReplayPlugin
from avalanche.training.storage_policy import BalancedExemplarsBuffer, ReservoirSamplingBuffer
from torch import Tensor, nn
from tqdm.auto import tqdm

from cl_ema.config import SYNC_MODES, check_ema_options
from cl_ema.data import experience_indices, index_dataset
from cl_ema.ema import EMA, recompute_bn
from cl_ema.errors import UserError
from cl_ema.evaluation import Track


class EMAPlugin(SupervisedPlugin):
    """Keeps EMA shadows of the model for one or more decays and offers them as eval tracks.

    Lifecycle: ``attach(model)`` registers the shadows (at build time, so they start from the
    initial weights); ``after_update`` updates them after every optimizer step; at the end of
    each training experience, ``sync="task_end"`` copies the (single) shadow into the live model,
    and ``recompute_bn`` remembers that experience's batches to re-estimate BatchNorm statistics
    of each shadow before it is evaluated. With ``sync="none"`` training is never changed.
    """

    def __init__(
        self,
        decay: float = 0.999,
        decays: Sequence[float] | None = None,
        update_every: int = 1,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        buffers: str = "average",
        recompute_bn: bool = False,
        sync: str = "none",
    ) -> None:
        super().__init__()
        self.decays = check_ema_options(
            list(decays) if decays else decay, update_every, warmup_gamma, warmup_power, buffers
        )
        if sync not in SYNC_MODES:
            raise UserError(f"ema.sync={sync!r}: must be one of {', '.join(SYNC_MODES)}")
        if sync == "task_end" and len(self.decays) > 1:
            raise UserError("ema.sync=task_end changes training, so it takes one decay, not ema.decays")
        self.options = dict(
            update_every=update_every,
            warmup=warmup,
            warmup_gamma=warmup_gamma,
            warmup_power=warmup_power,
            buffers=buffers,
        )
        self.recompute_bn = recompute_bn
        self.sync = sync
        self.ema: EMA | None = None
        self._bn_batches: Callable[[], Iterator[Tensor]] | None = None

    def attach(self, model: nn.Module) -> EMA:
        if self.ema is None or self.ema.model is not model:
            self.ema = EMA(model, self.decays, **self.options)
            self.ema.register()
        return self.ema

    def before_training(self, strategy, **kwargs) -> None:
        self.attach(strategy.model)

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._bn_batches = None  # evaluations during training use the averaged statistics

    def after_update(self, strategy, **kwargs) -> None:
        self.ema.update()

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self.recompute_bn:
            self._bn_batches = strategy.input_batches()
        if self.sync == "task_end":
            self.ema.copy_to_live(0)

    def tracks(self) -> list[Track]:
        return [Track(name, lambda k=k: self._swapped(k)) for k, name in enumerate(self.ema.track_names)]

    @contextmanager
    def _swapped(self, index: int) -> Iterator[None]:
        with self.ema.swapped(index):
            if self.recompute_bn and self._bn_batches is not None:
                recompute_bn(self.ema.model, self._bn_batches())
            yield

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)


class ReplayPlugin(AvalancheReplayPlugin):
    """Avalanche's ReplayPlugin, filling its storage policy through ``post_adapt``.

    avalanche-lib 0.6 still calls the buffer's deprecated ``update()``, which resets the warning
    filters and warns on every task; ``post_adapt`` is what that method forwards to.
    """

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.storage_policy.post_adapt(strategy, strategy.experience)

    def state_dict(self) -> dict:
        """The memory's contents (sample indices, labels, reservoir weights), group by group."""
        policy = self.storage_policy
        if not isinstance(policy, BalancedExemplarsBuffer) or not all(
            isinstance(g, ReservoirSamplingBuffer) for g in policy.buffer_groups.values()
        ):
            raise UserError(f"checkpointing replay memory needs a reservoir-based buffer, not {type(policy).__name__}")
        groups = []
        for key, group in policy.buffer_groups.items():
            index = experience_indices(group.buffer)
            targets = torch.as_tensor(list(group.buffer.targets), dtype=torch.long)
            groups.append({"key": key, "max_size": group.max_size, "index": index, "targets": targets,
                           "weights": group._buffer_weights.clone()})  # fmt: skip
        seen = sorted(getattr(policy, "seen_classes", set()))
        return {"groups": groups, "seen_classes": seen, "num_exps": getattr(policy, "_num_exps", 0)}

    def load_state_dict(self, state: dict) -> None:
        policy = self.storage_policy
        policy.buffer_groups = {}
        for entry in state["groups"]:
            group = ReservoirSamplingBuffer(entry["max_size"])
            group.buffer = index_dataset(entry["index"], entry["targets"])
            group._buffer_weights = entry["weights"]
            policy.buffer_groups[entry["key"]] = group
        if hasattr(policy, "seen_classes"):
            policy.seen_classes = set(state["seen_classes"])
        if hasattr(policy, "_num_exps"):
            policy._num_exps = state["num_exps"]


class FiniteLossPlugin(SupervisedPlugin):
    """Stops the run when the loss becomes NaN or infinite, naming the task and step.

    The first non-finite step is tracked on the device (no synchronization per step) and read
    every ``check_every`` steps and at the end of each task.
    """

    def __init__(self, check_every: int = 1) -> None:
        super().__init__()
        self.check_every = check_every
        self._step: Tensor | None = None
        self._first_bad: Tensor | None = None

    def before_training_exp(self, strategy, **kwargs) -> None:
        device = strategy.device
        self._step = torch.zeros((), dtype=torch.long, device=device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self._step += 1
        bad = ~torch.isfinite(strategy.loss.detach()) & (self._first_bad < 0)
        self._first_bad = torch.where(bad, self._step, self._first_bad)
        if strategy.clock.train_exp_iterations % self.check_every == 0:
            self._check(strategy)

    def after_training_exp(self, strategy, **kwargs) -> None:
        self._check(strategy)

    def _check(self, strategy) -> None:
        step = int(self._first_bad)
        if step >= 0:
            task = strategy.experience.current_experience + 1
            lr = strategy.optimizer.param_groups[0]["lr"]
            raise UserError(
                f"the loss became NaN or inf at task {task}, step {step} of that task (is train.lr={lr:g} too high?); "
                "the results and checkpoint of the tasks before it stay on disk"
            )


class ProgressBarPlugin(SupervisedPlugin):
    """One tqdm bar per training epoch, with the running loss (read every ``refresh`` steps)."""

    def __init__(self, refresh: int = 10) -> None:
        super().__init__()
        self.refresh = refresh
        self._bar: tqdm | None = None

    def before_training_epoch(self, strategy, **kwargs) -> None:
        exp = strategy.experience.current_experience
        self._bar = tqdm(
            total=len(strategy.dataloader),
            desc=f"task {exp + 1} epoch {strategy.clock.train_exp_epochs + 1}/{strategy.train_epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=None,  # off when stderr is not a terminal
        )

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self._bar.update()
        if self._bar.n % self.refresh == 0 and not self._bar.disable:
            self._bar.set_postfix(loss=f"{strategy.loss.item():.3f}", refresh=False)

    def after_training_epoch(self, strategy, **kwargs) -> None:
        self._bar.close()

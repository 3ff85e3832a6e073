"""Plugins every run has: stop on a non-finite loss, and a progress bar. Neither keeps state across tasks."""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from tqdm.auto import tqdm

from cl_ema.errors import UserError


class FiniteLossPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Stops the run when the loss becomes NaN or infinite, naming the task and step.

    The first non-finite step is tracked on the device (no synchronization per step) and read
    every ``check_every`` steps and at the end of each task.
    """

    stateless = True

    def __init__(self, check_every: int = 1) -> None:
        super().__init__()
        self.check_every = check_every
        self._step = torch.zeros((), dtype=torch.long)
        self._first_bad = torch.full((), -1, dtype=torch.long)

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
                f"the loss became NaN or inf at task {task}, step {step} of that task (is optimizer.lr={lr:g} too "
                "high?); the results and checkpoint of the tasks before it stay on disk"
            )


class LRStepsPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Multiplies every learning rate by ``gamma`` after each epoch in ``milestones`` of a task.

    Each task starts again from the learning rates the optimizer was built with, as a MultiStepLR
    made anew per task (SLCA, CoMA); so nothing is kept from one task to the next.
    """

    stateless = True

    def __init__(self, milestones: list[int], gamma: float) -> None:
        super().__init__()
        self.milestones = set(milestones)
        self.gamma = gamma
        self.epochs_done = 0

    def before_training_exp(self, strategy, **kwargs) -> None:
        self.epochs_done = 0
        for group in strategy.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"]

    def after_training_epoch(self, strategy, **kwargs) -> None:
        self.epochs_done += 1
        if self.epochs_done in self.milestones:
            for group in strategy.optimizer.param_groups:
                group["lr"] *= self.gamma


class ProgressBarPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """One tqdm bar per training epoch, with the running loss (read every ``refresh`` steps)."""

    stateless = True

    def __init__(self, refresh: int = 10, enabled: bool = True) -> None:
        super().__init__()
        self.refresh = refresh
        self.enabled = enabled
        self._bar: Any = None  # tqdm's bar of the epoch

    def before_training_epoch(self, strategy, **kwargs) -> None:
        exp = strategy.experience.current_experience
        self._bar = tqdm(
            total=len(strategy.dataloader),
            desc=f"task {exp + 1} epoch {strategy.clock.train_exp_epochs + 1}/{strategy.train_epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=None if self.enabled else True,  # None: off when stderr is not a terminal
        )

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self._bar.update()
        if self._bar.n % self.refresh == 0 and not self._bar.disable:
            self._bar.set_postfix(loss=f"{strategy.loss.item():.3f}", refresh=False)

    def after_training_epoch(self, strategy, **kwargs) -> None:
        self._bar.close()

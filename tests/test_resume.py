"""Reproducibility, checkpoint / resume after SIGKILL, and hostile inputs: one line, exit 2, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
from conftest import CHECKPOINTED
from helpers import cli_in_process, run_experiment

from cl_ema.errors import UserError

SLOW_RUN = ["strategy=ema_replay", "ema.decays=[0.9,0.99]", "train.epochs=25", "seed=4", "data.n_tasks=2"]


def tracks(path: Path) -> dict:
    return json.loads(path.read_text())["tracks"]


def test_same_seed_same_results_other_seed_other_class_order(tmp_path):
    a, _ = run_experiment(tmp_path / "a", "strategy=ema_replay", "train.epochs=3", "seed=7")
    b, _ = run_experiment(tmp_path / "b", "strategy=ema_replay", "train.epochs=3", "seed=7")
    c, _ = run_experiment(tmp_path / "c", "strategy=ema_replay", "train.epochs=3", "seed=8")
    assert tracks(tmp_path / "a" / "results.json") == tracks(tmp_path / "b" / "results.json")
    assert a.meta["class_order"] == b.meta["class_order"] != c.meta["class_order"]


def cli(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.Popen([sys.executable, "-m", "cl_ema", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    # both runs log through this process's W&B service, as under a launcher that uses wandb: the
    # killed run's stream stays open there, and the resume must continue through a service of its own
    wandb.setup()
    assert os.environ.get(wandb.env.SERVICE)
    run_dir = tmp_path / "run"
    proc = cli(*SLOW_RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # in task 2, or between task 1's checkpoint and its results.json
    proc.wait()
    if (run_dir / "results.json").exists():  # the checkpoint is written first: it may be all there is
        interrupted = json.loads((run_dir / "results.json").read_text())
        assert interrupted["status"] == "running" and interrupted["tasks_done"] == 1, interrupted["tasks_done"]

    resumed = cli(*SLOW_RUN, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming {run_dir} after task 1/2" in out
    assert "is still open in the W&B service named by WANDB_SERVICE" in err

    run_experiment(tmp_path / "whole", *SLOW_RUN)  # uninterrupted, same seed
    final = json.loads((run_dir / "results.json").read_text())
    assert final["status"] == "completed"
    assert final["tracks"] == tracks(tmp_path / "whole" / "results.json")  # identical on CPU
    records = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 2 and len({p.name for p in records}) == 1  # W&B resumed the same run id


def test_resume_true_finds_the_run_of_the_same_configuration(checkpointed_run, tmp_path):
    base = tmp_path / "outputs"
    shutil.copytree(checkpointed_run, base / "first")
    run_experiment(base / "other", *CHECKPOINTED, "seed=5")
    results, text = run_experiment(base / "new", *CHECKPOINTED, "resume=true")
    assert f"resuming {base / 'first'} after task 2/2" in text and results.status == "completed"
    with pytest.raises(UserError, match="no checkpoint of this configuration"):
        run_experiment(base / "new2", "strategy=ema", "data.n_tasks=2", "seed=9", "resume=true")


@pytest.mark.parametrize(
    "content,expected",
    [(b"PK\x03\x04 truncated", "not a readable cl_ema checkpoint"), (None, "not a cl_ema checkpoint")],
)
def test_truncated_or_foreign_checkpoint_is_refused_and_nothing_is_lost(checkpointed_run, tmp_path, content, expected):
    before = (checkpointed_run / "results.json").read_bytes()
    last = checkpointed_run / "checkpoints" / "last.pt"
    if content is None:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, last)  # somebody else's checkpoint
    else:
        last.write_bytes(content)
    with pytest.raises(UserError, match=expected):
        run_experiment(tmp_path / "again", *CHECKPOINTED, f"resume={checkpointed_run}")
    assert (checkpointed_run / "results.json").read_bytes() == before


def test_checkpoint_with_code_in_it_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "checkpoints").mkdir()
    torch.save({"format": "cl_ema-checkpoint-1", "x": Evil()}, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match="not a readable cl_ema checkpoint"):
        run_experiment(tmp_path / "again", f"resume={tmp_path}")


def test_resume_with_another_configuration_is_refused(checkpointed_run, tmp_path):
    with pytest.raises(UserError, match=r"different configuration \(ema.decay: 0.99 in the checkpoint, 0.9 now"):
        run_experiment(tmp_path / "again", *CHECKPOINTED, "ema.decay=0.9", f"resume={checkpointed_run}")


def test_nan_loss_stops_with_task_and_step_and_keeps_earlier_results(tmp_path, monkeypatch):
    from cl_ema.template import DeviceDataTemplate

    criterion = DeviceDataTemplate.criterion

    def poisoned(self):
        loss = criterion(self)
        if self.experience.current_experience == 1 and self.clock.train_exp_iterations >= 4:
            return loss * float("nan")
        return loss

    monkeypatch.setattr(DeviceDataTemplate, "criterion", poisoned)
    with pytest.raises(UserError, match=r"loss became NaN or inf at task 2, step 5 of that task"):
        run_experiment(tmp_path, "strategy=ema", "checkpoint=true")
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "failed" and data["tasks_done"] == 1
    assert np.isfinite(data["tracks"]["live"]["acc_matrix"][0][0])
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["results"]["tasks_done"] == 1


@pytest.mark.parametrize(
    "args,expected",
    [
        (["hydra.run.dir={blocker}/run"], "error: cannot create the run folder {blocker}/run: Not a directory"),
        (["resume={tmp}/nowhere"], "error: resume={tmp}/nowhere: no checkpoints/last.pt in that directory"),
    ],
)  # fmt: skip
def test_hostile_inputs_on_the_command_line(tmp_path, args, expected):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    fill = {"blocker": blocker, "tmp": tmp_path}
    args = [a.format(**fill) for a in args]
    run_dir = [] if "hydra" in args[0] else [f"hydra.run.dir={tmp_path}/r"]
    status, _, err = cli_in_process("logger=none", *args, *run_dir, cwd=tmp_path)
    assert status == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected.format(**fill)), err

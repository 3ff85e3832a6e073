"""Reproducibility, checkpoint / resume after SIGKILL, and hostile inputs: one line, exit 2, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
from conftest import CHECKPOINTED
from helpers import cli_in_process, run_experiment
from processes import Started, cli

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
        (["resume={tmp}/nowhere"], "error: resume={tmp}/nowhere: no run there (no config.yaml in that folder)"),
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


# ---------------------------------------------------------------------------- resume=<run dir> alone
def outside(run_dir: Path, root: Path) -> dict[Path, int]:
    """Every file and folder below ``root`` but ``run_dir``'s, with its modification time."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p != run_dir and run_dir not in p.parents}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "beside",
    [[], ["device=cpu"], ["logger=none"], ["experiment=split_digits", "seed=0"], ["strategy=ema", "ema.decay=0.99"],
     ["checkpoint=true", "data.download=false"]],
    ids=["alone", "device", "logger", "the-runs-own-values", "the-runs-own-choices", "neutral-keys"],
)  # fmt: skip
def test_resume_by_folder_accepts_neutral_keys_and_the_runs_own_values(checkpointed_run, tmp_path, beside):
    """``resume=<run dir>`` continues the run as its config.yaml says; writes nothing outside its folder."""
    before = outside(checkpointed_run, tmp_path)
    status, out, err = cli_in_process(f"resume={checkpointed_run}", *beside, cwd=tmp_path)
    assert status == 0, err[-2000:]
    assert f"resuming {checkpointed_run} after task 2/2" in out
    assert outside(checkpointed_run, tmp_path) == before
    assert json.loads((checkpointed_run / "results.json").read_text())["status"] == "completed"


@pytest.mark.parametrize(
    "beside,named",
    [(["seed=1"], "seed=1"), (["ema.decay=0.5"], "ema.decay=0.5"), (["threads=7"], "threads=7"),
     (["strategy=cls_er"], "strategy=cls_er"), (["seed=1", "device=cpu", "ema.decay=0.5"], "seed=1, ema.decay=0.5"),
     (["+plugin@posthoc=posthoc"], "+plugin@posthoc=posthoc")],
    ids=["seed", "plugin-option", "threads", "strategy", "two-keys-and-a-neutral-one", "a-plugin-it-lacks"],
)  # fmt: skip
def test_resume_by_folder_refuses_what_would_change_the_results_naming_the_keys(checkpointed_run, tmp_path, beside,
                                                                                named):  # fmt: skip
    files = {p: p.read_bytes() for p in checkpointed_run.rglob("*") if p.is_file()}
    status, out, err = cli_in_process(f"resume={checkpointed_run}", *beside, cwd=tmp_path)
    assert status == 2 and out == ""
    assert one_error_line(err).startswith(
        f"error: resume={checkpointed_run} continues that run as it was configured: {named} would change its results "
        "(beside resume= only "
    )
    assert {p: p.read_bytes() for p in checkpointed_run.rglob("*") if p.is_file()} == files


def test_resume_by_folder_names_each_key_that_may_change_once(checkpointed_run, tmp_path):
    import re

    _, _, err = cli_in_process(f"resume={checkpointed_run}", "seed=1", cwd=tmp_path)
    names = re.search(r"\(beside resume= only (.*) may change\)", err).group(1).split(", ")
    assert sorted(names) == ["checkpoint", "data.download", "deterministic", "device", "logger"], names


@pytest.fixture(scope="module")
def horizons_run(tmp_path_factory):
    """A finished run started with ``ema.horizons=[0.5,1,2]`` (integers where floats go)."""
    folder = tmp_path_factory.mktemp("horizons") / "run"
    run_experiment(folder, *HORIZONS, "checkpoint=true")
    return folder


HORIZONS = ("strategy=ema", "ema.horizons=[0.5,1,2]", "data.n_tasks=2", "train.epochs=1")


def test_resume_by_folder_compares_values_by_value(horizons_run, tmp_path):
    shutil.copytree(horizons_run, tmp_path / "run")
    status, out, err = cli_in_process(f"resume={tmp_path / 'run'}", "ema.horizons=[0.5,1.0,2.0]", cwd=tmp_path)
    assert status == 0, err[-2000:]
    assert f"resuming {tmp_path / 'run'} after task 2/2" in out


@pytest.mark.parametrize("given", [HORIZONS, (*HORIZONS[:1], "ema.horizons=[0.5,1.0,2.0]", *HORIZONS[2:])],
                         ids=["as-started", "floats"])  # fmt: skip
def test_resume_true_continues_the_newest_run_of_the_configuration_and_writes_no_folder(horizons_run, tmp_path,
                                                                                         given):  # fmt: skip
    runs = tmp_path / "outputs" / "split_digits" / "ema"
    for name, age in (("older", 100), ("newer", 10)):
        shutil.copytree(horizons_run, runs / name)
        os.utime(runs / name / "checkpoints" / "last.pt", (time.time() - age,) * 2)
    status, out, err = cli_in_process("logger=none", *given, "resume=true", cwd=tmp_path)
    assert status == 0, err[-2000:]
    assert "resuming outputs/split_digits/ema/newer after task 2/2" in out
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_dir() and p.parent == runs) == ["newer", "older"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]


BY_FOLDER = ("logger=none", "data.n_tasks=2", "train.epochs=1", "seed=3")  # `strategy=…` beside it


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``strategy`` → the tracks of ``BY_FOLDER`` with that strategy, run without a stop (once each)."""
    made: dict[str, dict] = {}

    def tracks_of(strategy: str) -> dict:
        if strategy not in made:
            folder = tmp_path_factory.mktemp(strategy) / "whole"
            run_experiment(folder, *BY_FOLDER, f"strategy={strategy}")
            made[strategy] = tracks(folder / "results.json")
        return made[strategy]

    return tracks_of


def _stop_after_the_first_task(proc: Started, checkpoints: Path, pattern: str, signum: int) -> Path:
    """Send ``signum`` once the first task's checkpoint (``checkpoints.glob(pattern)``) is written; its run folder."""
    deadline = time.time() + 300
    while not list(checkpoints.glob(pattern)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)  # in task 2, or between task 1's checkpoint and its results.json
    (found,) = checkpoints.glob(pattern)
    return found.parent.parent


@pytest.mark.slow
# Each stop once, each with another of the strategies whose state is largest (a DER memory beside an EMA, 20
# averages beside a replay buffer, CLS-ER's two EMAs): the stops and the states are independent, and every
# pair would be nine such runs where three show the same.
@pytest.mark.parametrize(
    ("strategy", "stop"), [("ema_derpp", "SIGKILL"), ("averages_replay", "sweep"), ("cls_er", "SIGTERM")]
)
def test_resume_by_folder_alone_ends_like_the_uninterrupted_run(tmp_path, uninterrupted, strategy, stop):
    """Killed, stopped by SIGTERM, or stopped in a sweep (a job folder whose name holds '=' and ','): the command
    the stop prints (``python -m cl_ema resume=<run dir>``, nothing else), run as a shell splits it, continues
    the run in its folder, writes nothing outside it, and ends with the uninterrupted run's results, bit for bit."""
    import shlex

    if stop == "sweep":
        proc = cli("-m", *BY_FOLDER, f"strategy={strategy}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
        run_dir = _stop_after_the_first_task(proc, tmp_path / "sweep", "*/checkpoints/last.pt", signal.SIGTERM)
        assert "=" in run_dir.name and "," in run_dir.name, run_dir.name
    else:
        proc = cli(*BY_FOLDER, f"strategy={strategy}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        run_dir = _stop_after_the_first_task(proc, tmp_path, "run/checkpoints/last.pt", getattr(signal, stop))
    _, err = proc.communicate(timeout=300)
    if stop == "SIGKILL":
        command = ["python", "-m", "cl_ema", f"resume={run_dir}"]  # what the user types: nothing was printed
    else:
        assert proc.returncode == 143, err[-2000:]
        line = one_error_line(err)
        assert line.startswith("error: interrupted by SIGTERM after 1 finished task(s)"), line
        command = shlex.split(line.split("`")[1])
    assert command == ["python", "-m", "cl_ema", f"resume={run_dir}"], command
    (tmp_path / "elsewhere").mkdir()
    before = outside(run_dir, tmp_path)
    resumed = cli(*command[3:], cwd=tmp_path / "elsewhere")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming {run_dir} after task 1/2" in out
    assert outside(run_dir, tmp_path) == before
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
    assert tracks(run_dir / "results.json") == uninterrupted(strategy)

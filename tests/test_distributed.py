"""Data parallel under torchrun (gloo, 2 CPU processes): same results as one process, one writer."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from helpers import ROOT, run_experiment, run_script
from processes import Started, cli, torchrun

pytestmark = pytest.mark.slow
# 10 epochs: a task lasts about a second under torchrun, ample time to kill a run after its first checkpoint
RUN = ["strategy=ema_replay", "ema.decays=[0.9,0.99]", "logger=none", "device=cpu", "seed=1", "train.epochs=10"]


def on_two_processes(*args: str, cwd: Path) -> Started:
    """``torchrun --standalone --nproc-per-node=2 args``, a thread per process."""
    return torchrun("--standalone", "--nproc-per-node=2", *args, cwd=cwd, env={"OMP_NUM_THREADS": "1"})


def finish(proc: Started) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """`python -m cl_ema` under torchrun with 2 processes, each keeping its final state (``ddp_worker.py``: one
    torchrun run serves the tests of both), and the same run in one process."""
    root, ranks = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("ranks")
    worker = ROOT / "tests" / "ddp_worker.py"
    out = finish(on_two_processes(str(worker), str(ranks), *RUN, f"hydra.run.dir={root / 'run'}", cwd=root))
    single, _ = run_experiment(root / "single", *RUN)
    return root, out, single, ranks


def test_two_processes_give_the_single_process_results(two_processes):
    root, out, single, _ = two_processes
    data = json.loads((root / "run" / "results.json").read_text())
    assert data["status"] == "completed" and data["world_size"] == 1 + 1
    assert "2 processes" in out
    test_sizes = [len(index) for index in _digits_test_indices(single)]
    for track in single.tracks:
        for setting in ("class_il", "task_il"):
            ours = np.array(
                data["tracks"][track]["acc_matrix"]
                if setting == "class_il"
                else data["tracks"][track][setting]["acc_matrix"]
            )
            # only the order of the gradient reduction differs: at most one test sample per task
            assert (np.abs(ours - single.matrices[track, setting]) <= 1 / np.array(test_sizes) + 1e-12).all(), track


def _digits_test_indices(results):
    from cl_ema.config import Scenario
    from cl_ema.data import sources
    from cl_ema.data.stream import stream_from_stores

    stream = stream_from_stores(*sources.load_digits(), Scenario.split, 5, seed=1, device=torch.device("cpu"))
    return stream.test_indices


def test_only_the_main_process_writes(two_processes):
    root, _, _, _ = two_processes
    written = sorted(p.relative_to(root).parts[0] for p in root.iterdir())
    assert written == ["run", "single"]  # no folder of the second process, no outputs/
    assert (root / "run" / ".hydra" / "config.yaml").exists() and (root / "run" / "checkpoints" / "last.pt").exists()


def test_every_process_keeps_identical_ema_shadows_and_replay_memory(two_processes):
    _, _, _, folder = two_processes
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for a, b in zip(*(r["plugins"]["ema"]["averages"]["shadows"] for r in ranks)):
        assert torch.equal(a, b)  # bit for bit, without communication
    memories = [r["plugins"]["replay"]["groups"] for r in ranks]
    assert [g["key"] for g in memories[0]] == [g["key"] for g in memories[1]]
    for a, b in zip(*memories):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["weights"], b["weights"])
    assert all(torch.equal(ranks[0]["model"][k], ranks[1]["model"][k]) for k in ranks[0]["model"])


def test_killed_and_resumed_under_torchrun_equals_the_uninterrupted_run(two_processes, tmp_path):
    root, _, _, _ = two_processes
    run_dir = tmp_path / "run"
    proc = on_two_processes("-m", "cl_ema", *RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)  # torchrun starts them in sessions of their own
    for process in [psutil.Process(proc.pid), *workers]:
        process.send_signal(signal.SIGKILL)  # torchrun and both workers, in the middle of task 2
    proc.communicate()
    assert json.loads((run_dir / "results.json").read_text())["status"] == "running"
    out = finish(
        on_two_processes("-m", "cl_ema", *RUN, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    )
    assert f"resuming {run_dir}" in out
    tracks = [json.loads((d / "results.json").read_text())["tracks"] for d in (run_dir, root / "run")]
    assert tracks[0] == tracks[1]  # the fixture's uninterrupted run under torchrun


def test_scaling_benchmark_runs_the_gloo_path():
    # the script in this process; the torchrun it starts, and its two workers, in processes of their own
    out = run_script("scaling.py", "--device", "cpu", "--processes", "2", "--model", "resnet18", "--width", "4",
                     "--steps", "2", "--warmup", "1", "--batch-size", "8", "--samples", "1000")  # fmt: skip
    assert "2 processes" in out and "scaling efficiency" in out


def test_bad_input_is_said_once_under_torchrun(tmp_path):
    proc = on_two_processes("-m", "cl_ema", "logger=none", "device=cpu", "ema.decay=1.5", cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    said = [line for line in err.splitlines() if line.startswith("error: ")]
    assert said == ["error: ema.decay=1.5: Input should be less than or equal to 1"], err[-3000:]
    assert not list(tmp_path.iterdir())  # no process wrote a folder


def _job_process(launcher: Started) -> psutil.Process | None:
    """The process of a submitit_local job the launcher started (submitit's ``_submit`` entry)."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "submitit.core._submit" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def test_a_preempted_submitit_job_is_requeued_and_resumes_in_its_own_folder(tmp_path):
    """SLURM's warning before a time limit (or a preemption) reaches a job as submitit's signal: the job is
    requeued, finds its own folder, continues from its last finished task and ends as if never stopped."""
    args = ["-m", "hydra/launcher=submitit_local", "seed=3", "strategy=ema_replay", "logger=none", "train.epochs=12"]
    launcher = cli(*args, f"hydra.sweep.dir={tmp_path / 'preempted'}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    results = tmp_path / "preempted" / "0_seed=3,strategy=ema_replay,train.epochs=12" / "results.json"
    deadline, signalled = time.monotonic() + 300, None
    while signalled is None and time.monotonic() < deadline and launcher.poll() is None:
        if results.is_file() and json.loads(results.read_text() or "{}").get("tasks_done", 0) >= 2:
            job = _job_process(launcher)
            if job is not None:
                job.send_signal(signal.SIGUSR2)  # submitit's preemption / time-limit signal
                signalled = json.loads(results.read_text())["tasks_done"]
        time.sleep(0.05)
    _, err = launcher.communicate(timeout=600)
    assert signalled is not None and signalled < 5, err[-3000:]
    assert launcher.returncode == 0, err[-3000:]
    logs = " ".join(p.read_text() for p in (tmp_path / "preempted").rglob("*_log.*")).lower()
    assert "this job is preempted" in logs and "requeued job" in logs, logs[-3000:]
    requeued = json.loads(results.read_text())
    # the uninterrupted run in this process (the launcher changes nothing a run computes), one thread as the job's
    run_experiment(tmp_path / "whole", *args[2:], "threads=1")
    uninterrupted = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert requeued["status"] == "completed" and requeued["tracks"] == uninterrupted["tracks"]

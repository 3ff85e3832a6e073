"""No result ever lost, no traceback ever shown: run folders, write errors, checkpoints, signals, sweeps."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, cli_in_process, interrupt_in_task, run_experiment

from cl_ema.errors import UserError

FAST = ["logger=none", "train.epochs=2"]


def cli(*args: str, cwd: Path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "cl_ema", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------- run folders
@pytest.mark.slow
def test_runs_started_together_keep_folders_of_their_own(tmp_path):
    """Three runs at once, two of them the same configuration: three complete, consistent folders."""
    seeds = ["seed=1", "seed=1", "seed=2"]
    procs = [cli(*FAST, "strategy=ema", seed, cwd=tmp_path) for seed in seeds]
    for proc in procs:
        status, _, err = finish(proc)
        assert status == 0, err[-2000:]
    folders = sorted(p.parent for p in tmp_path.glob("outputs/split_digits/ema/*/results.json"))
    assert len(folders) == 3
    found = []
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        config = (folder / "config.yaml").read_text()
        assert results["status"] == "completed" and f"seed: {results['seed']}\n" in config
        assert torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["config"]["seed"] == results["seed"]
        found.append(results["seed"])
    assert sorted(found) == [1, 1, 2]


def test_claiming_a_folder_is_exclusive(tmp_path):
    from multiprocessing import Pool

    with Pool(2) as pool:
        claimed = pool.starmap(_claim, [(str(tmp_path / "run"),)] * 8)
    assert len(set(claimed)) == 8 and str(tmp_path / "run") in claimed
    assert all((Path(c) / ".cl_ema_run").is_file() for c in claimed)


def _claim(folder: str) -> str:
    from cl_ema.rundirs import claim

    return str(claim(Path(folder), given=False, key="hydra.run.dir"))


def test_a_finished_run_folder_is_refused_and_left_untouched(tmp_path):
    run_experiment(tmp_path / "done", "strategy=ema", "data.n_tasks=2", "checkpoint=true")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "done").rglob("*")}
    status, out, err = cli_in_process("logger=none", f"hydra.run.dir={tmp_path / 'done'}", cwd=tmp_path)
    assert status == 2 and out == ""
    line = one_error_line(err)
    assert f"hydra.run.dir={tmp_path / 'done'}: that folder already holds a run" in line
    assert f"resume={tmp_path / 'done'}" in line
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "done").rglob("*")} == before  # not even Hydra's files


# ---------------------------------------------------------------------------- write errors
@pytest.mark.slow
def test_a_file_size_limit_ends_in_one_line_and_keeps_earlier_results(tmp_path):
    limit = 60_000  # results.json, CSVs and the heatmap fit; the checkpoint (~400 kB) does not
    proc = cli(*FAST, "checkpoint=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))  # fmt: skip
    status, _, err = finish(proc)
    assert status == 2
    line = one_error_line(err)
    assert "checkpoints/last.pt" in line and "file too large" in line
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and results["tasks_done"] == 1
    assert results["tracks"]["live"]["acc_matrix"][0][0] is not None
    assert not list((tmp_path / "run").rglob("*.tmp"))


DISK_ERRORS = [
    (errno.ENOSPC, "no space left"),
    (errno.EDQUOT, "disk quota exceeded"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
]


@pytest.mark.parametrize("code,cause", DISK_ERRORS)
def test_disk_errors_name_the_file_and_keep_what_was_written(tmp_path, monkeypatch, code, cause):
    import cl_ema.files

    real_replace, calls = os.replace, []

    def failing(src, dst):
        calls.append(dst)
        if str(dst).endswith("results.json") and len([c for c in calls if str(c).endswith("results.json")]) == 3:
            raise OSError(code, os.strerror(code), str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(cl_ema.files.os, "replace", failing)
    with pytest.raises(
        UserError, match=rf"cannot write {tmp_path}/results.json: {cause}.*files written before are kept"
    ):
        run_experiment(tmp_path, "strategy=ema", "checkpoint=true")
    kept = json.loads((tmp_path / "results.json").read_text())
    assert kept["tasks_done"] >= 2 and kept["status"] in ("running", "failed")
    # the checkpoint is written first: it holds the task whose results.json failed
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["results"]["tasks_done"] == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_result_files_get_the_mode_of_the_users_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        run_experiment(tmp_path, "data.n_tasks=2", "checkpoint=true")
    finally:
        os.umask(previous)
    for name in ("results.json", "config.yaml", "acc_matrix.png", "checkpoints/last.pt", "matrices/live.class_il.csv"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


# ---------------------------------------------------------------------------- checkpoints
def _edit_checkpoint(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda s: s["results"].update(tasks_done=-1), r"impossible task counts \(tasks_done=-1 of num_tasks=2\)"),
        (lambda s: s.pop("optimizer"), "field 'optimizer' is missing or not a dict"),
        (lambda s: s.update(train_iterations="many"), "field 'train_iterations' is missing or not a int"),
        (
            lambda s: s["plugins"]["ema"]["shadows"][0].resize_(3),
            "the state of plugin ema does not fit .the saved shadows do not match",
        ),
        (
            lambda s: s["model"].update({"features.1.weight": torch.zeros(3, 3)}),
            "the model's weights do not fit this model .size mismatch for features.1.weight",
        ),
        (lambda s: s["plugins"].pop("ema"), r"holds the state of plugins \[\], this run has \['ema'\]"),
        (lambda s: s["optimizer"]["param_groups"][0].update(lr="abc"), "optimizer's lr='abc' is not a finite number"),
        (lambda s: s["results"].update(tasks_done=True), r"impossible task counts \(tasks_done=True"),
    ],
    ids=["tasks_done", "missing", "ill-typed", "shadow-shape", "model-shape", "plugin-missing", "optimizer", "bool"],
)
def test_a_broken_checkpoint_is_one_line_and_rewrites_nothing(tmp_path, edit, expected):
    run_experiment(tmp_path, "strategy=ema", "data.n_tasks=2", "checkpoint=true")
    before = (tmp_path / "results.json").read_bytes()
    _edit_checkpoint(tmp_path / "checkpoints" / "last.pt", edit)
    with pytest.raises(UserError, match=expected):
        run_experiment(tmp_path / "again", "strategy=ema", "data.n_tasks=2", f"resume={tmp_path}")
    assert (tmp_path / "results.json").read_bytes() == before


def test_resume_true_skips_unreadable_runs_and_false_means_no_resume(tmp_path, capsys):
    base = tmp_path / "outputs"
    run_experiment(base / "good", "strategy=ema", "data.n_tasks=2", "checkpoint=true")
    run_experiment(base / "broken", "strategy=ema", "data.n_tasks=2", "checkpoint=true")
    (base / "broken" / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 cut off")  # the newest
    _, text = run_experiment(base / "new", "strategy=ema", "data.n_tasks=2", "checkpoint=true", "resume=true")
    assert f"resuming {base / 'good'} after task 2/2" in text
    assert f"resume=true: skipping {base / 'broken'}" in capsys.readouterr().err
    _, text = run_experiment(base / "fresh", "strategy=ema", "data.n_tasks=2", "resume=false")
    assert "resuming" not in text and (base / "fresh" / "results.json").exists()


# ---------------------------------------------------------------------------- signals
SIGNAL_RUN = ["strategy=ema_replay", "train.epochs=40", "seed=2", "logger=none", "data.n_tasks=2"]


def _same_as_uninterrupted(tmp_path: Path, run_dir: Path) -> None:
    assert json.loads((run_dir / "results.json").read_text())["status"] == "interrupted"
    run_experiment(tmp_path / "resumer", *SIGNAL_RUN, "checkpoint=true", f"resume={run_dir}")
    run_experiment(tmp_path / "whole", *SIGNAL_RUN)
    tracks = [json.loads((d / "results.json").read_text())["tracks"] for d in (run_dir, tmp_path / "whole")]
    assert tracks[0] == tracks[1]


@pytest.mark.slow
def test_sigterm_ends_in_one_line_and_the_run_resumes_to_the_same_results(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(*SIGNAL_RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # in the middle of task 2
    code, _, err = finish(proc)
    assert code == 143
    line = one_error_line(err)
    assert line.startswith("error: interrupted by SIGTERM after 1 finished task(s)") and f"resume={run_dir}" in line
    _same_as_uninterrupted(tmp_path, run_dir)


def test_ctrl_c_ends_in_one_line_and_the_run_resumes_to_the_same_results(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    interrupt_in_task(monkeypatch, task=1, step=5)  # Python turns Ctrl-C (SIGINT) into this KeyboardInterrupt
    code, _, err = cli_in_process(*SIGNAL_RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert code == 130
    line = one_error_line(err)
    assert line.startswith("error: interrupted by SIGINT after 1 finished task(s)") and f"resume={run_dir}" in line
    _same_as_uninterrupted(tmp_path, run_dir)


# ---------------------------------------------------------------------------- one line, always
def test_mnist_that_cannot_be_downloaded_names_the_url_and_the_folder(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.mnist as mnist

    from cl_ema.data.sources import load_mnist

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(mnist, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as caught:
        load_mnist(tmp_path, download=True)
    message = str(caught.value)
    assert message.startswith(f"could not download MNIST into {tmp_path}") and "\n" not in message
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in message and f"{tmp_path}/MNIST/raw" in message


def test_compile_without_a_compiler_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(UserError, match="train.compile=true needs a C\\+\\+ compiler \\(no-such-compiler is not on"):
        run_experiment(tmp_path, "train.compile=true")


def test_a_failed_multirun_job_does_not_stop_the_sweep_and_is_named_at_the_end(tmp_path):
    status, _, err = cli_in_process("-m", *FAST, "ema.decay=0.9,1.5,0.99", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                    cwd=tmp_path)  # fmt: skip
    assert status == 2 and "Traceback" not in err and "Error executing job" not in err
    lines = err.strip().splitlines()
    failure = "#1 (logger=none train.epochs=2 ema.decay=1.5): ema.decay=1.5: must be a number in [0, 1]"
    assert lines[0] == f"error: job {failure}"
    assert (
        lines[-1] == f"error: 1 of 3 jobs failed, the others completed: {failure} (error.txt in their folders in "
        f"{tmp_path / 'sweep'})"
    )
    done = [json.loads(p.read_text())["status"] for p in (tmp_path / "sweep").glob("*/results.json")]
    assert done == ["completed", "completed"]


def test_an_interrupted_sweep_names_the_jobs_it_did_not_run():
    from cl_ema.sweep import SWEEP, grid

    jobs = grid(["seed=0,1,2", "strategy=ema"])
    assert jobs == [["seed=0", "strategy=ema"], ["seed=1", "strategy=ema"], ["seed=2", "strategy=ema"]]
    SWEEP.start(jobs, Path("unused"))
    SWEEP.started.update({0, 1})
    assert SWEEP.not_run() == "; jobs not run: #2 (seed=2 strategy=ema)"
    SWEEP.folder = None


@pytest.mark.slow
def test_an_unreachable_wandb_server_costs_at_most_15_seconds_and_one_warning(tmp_path):
    # in a process of its own: W&B's service outlives a run and would keep this broken server for later tests
    script = f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT / "tests")!r})
from helpers import compose_config
from cl_ema.building import build
from cl_ema.loggers import RunInfo

node = compose_config("logger=wandb").logger.wandb
assert node.init_timeout == 15, node.init_timeout  # the default
started = time.perf_counter()
try:
    build(node, "logger.wandb", run=RunInfo(Path(sys.argv[1]), {{}}, "x", "y", 0, ["live"], "id"), resumed=None)
except RuntimeError as err:
    print(time.perf_counter() - started)
    print(err)
else:
    sys.exit("no error")
"""
    nothing_listens = "http://127.0.0.1:9"
    env = {**os.environ, "WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": nothing_listens}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    elapsed, *message = proc.stdout.strip().splitlines()
    assert float(elapsed) < 15 + 3
    assert len(message) == 1 and re.search(r"^Timed out|127.0.0.1:9", message[0]), message  # the run's one warning


def test_the_report_refuses_an_unwritable_out_in_one_line(tmp_path):
    run_experiment(tmp_path / "runs" / "a", "data.n_tasks=2")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "cl_ema.report", str(tmp_path / "runs"), "--out", str(blocker / "r")],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith(f"error: cannot write {blocker}/r/")

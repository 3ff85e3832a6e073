"""Whole runs on split digits: forgetting, replay, EMA leaves training alone, outputs, W&B, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, run_experiment
from pinned import PINNED, STRATEGIES, matrices_of, pinned_overrides
from wandb_records import find_run_file, read_run

DECAYS = "ema.decays=[0.9,0.99,0.995]"


@pytest.fixture
def runs(shared_runs):
    """Runs shared by the tests (of every file) that make the same one: name → (results, out_dir, console text)."""
    return lambda name, *overrides: shared_runs(*overrides)


def matrices(results, track: str):
    return [results.matrices[track, s] for s in ("class_il", "task_il")]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_gives_the_pinned_matrices(runs, strategy):
    """Refactoring must not change results: split digits, seed 0, one thread, bit for bit on CPU. A change of
    results on purpose regenerates them: ``python tests/pinned.py`` (docs/development.md)."""
    pinned = json.loads(PINNED.read_text())
    assert strategy in pinned, f"no pinned matrices for strategy={strategy}: run python tests/pinned.py"
    results, _, _ = runs(f"pinned_{strategy}", *pinned_overrides(strategy))
    assert matrices_of(results) == pinned[strategy]


def test_plain_fine_tuning_forgets(runs):
    results, _, _ = runs("plain", *pinned_overrides("plain"))
    final = results.metrics("live", 4)
    assert final["avg_forgetting"] > 0.8  # class-IL fine-tuning: old classes are all but lost
    assert final["learning_acc"] > 0.9  # while each task is learned well
    assert results.tracks == ["live"]


def test_replay_forgets_clearly_less_than_plain(runs):
    plain, _, _ = runs("plain", *pinned_overrides("plain"))
    replay, _, _ = runs("replay", *pinned_overrides("replay"))
    assert replay.metrics("live", 4)["avg_forgetting"] < plain.metrics("live", 4)["avg_forgetting"] - 0.4
    assert replay.metrics("live", 4)["avg_acc"] > plain.metrics("live", 4)["avg_acc"] + 0.3


def test_ema_does_not_change_training(runs):
    plain, _, _ = runs("plain", *pinned_overrides("plain"))
    ema, _, _ = runs("ema", *pinned_overrides("ema"))
    for a, b in zip(matrices(plain, "live"), matrices(ema, "live")):
        assert np.array_equal(a, b)
    assert ema.tracks == ["live", "ema_0.99"]
    assert not np.array_equal(ema.matrices["ema_0.99", "class_il"], ema.matrices["live", "class_il"])


def test_many_decays_from_one_run_leave_training_alone(runs):
    plain, _, _ = runs("plain", *pinned_overrides("plain"))
    multi, _, text = runs("multi", "strategy=ema", DECAYS)
    assert multi.tracks == ["live", "ema_0.9", "ema_0.99", "ema_0.995"]
    for a, b in zip(matrices(plain, "live"), matrices(multi, "live")):
        assert np.array_equal(a, b)
    single, _, _ = runs("ema", *pinned_overrides("ema"))  # decay 0.99 alone gives the same track
    for a, b in zip(matrices(single, "ema_0.99"), matrices(multi, "ema_0.99")):
        assert np.array_equal(a, b)
    for track in multi.tracks:
        assert track in text
    assert "ema_0.995: decay 0.995, averages over ~200 steps" in text


def test_recompute_bn_leaves_training_alone_and_changes_the_ema_tracks(runs):
    plain, _, _ = runs("plain_cnn", "strategy=plain", "model=cnn", "train.epochs=3")
    averaged, _, _ = runs("ema_cnn", "strategy=ema", "model=cnn", "train.epochs=3", "ema.decay=0.9")
    recomputed, _, _ = runs(
        "ema_cnn_bn", "strategy=ema", "model=cnn", "train.epochs=3", "ema.decay=0.9", "ema.recompute_bn=true"
    )
    for other in (averaged, recomputed):
        for a, b in zip(matrices(plain, "live"), matrices(other, "live")):
            assert np.array_equal(a, b)
    assert not np.array_equal(averaged.matrices["ema_0.9", "class_il"], recomputed.matrices["ema_0.9", "class_il"])


def test_checkpointing_does_not_change_the_run(runs, tmp_path):
    replay, _, _ = runs("replay", *pinned_overrides("replay"))
    again, _ = run_experiment(tmp_path, "strategy=replay", "checkpoint=true")
    for a, b in zip(matrices(replay, "live"), matrices(again, "live")):
        assert np.array_equal(a, b)


def test_ema_replay_live_track_equals_replay(runs):
    replay, _, _ = runs("replay", *pinned_overrides("replay"))
    both, _, _ = runs("ema_replay", "strategy=ema_replay", "ema.decays=[0.9,0.99]")
    for a, b in zip(matrices(replay, "live"), matrices(both, "live")):
        assert np.array_equal(a, b)


def test_sync_task_end_changes_training(runs):
    ema, _, _ = runs("ema", *pinned_overrides("ema"))
    synced, _, _ = runs("synced", "strategy=ema", "ema.sync=task_end")
    assert not np.array_equal(synced.matrices["live", "class_il"], ema.matrices["live", "class_il"])
    # right after each task the live weights *are* the EMA weights
    assert np.array_equal(synced.matrices["live", "class_il"], synced.matrices["ema_0.99", "class_il"])


def test_result_files(runs):
    results, out, _ = runs("multi", "strategy=ema", DECAYS)
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "completed" and data["tasks_done"] == 5 and data["strategy"] == "ema"
    assert set(data["tracks"]) == {"live", "ema_0.9", "ema_0.99", "ema_0.995"}
    for track, entry in data["tracks"].items():
        matrix = np.array(entry["acc_matrix"])
        assert matrix.shape == (5, 5) and ((matrix >= 0) & (matrix <= 1)).all()
        assert entry["avg_acc"] == pytest.approx(matrix[-1].mean())
        assert entry["avg_forgetting"] == pytest.approx(np.mean([matrix[j, j] - matrix[4, j] for j in range(4)]))
        assert entry["bwt"] == pytest.approx(-entry["avg_forgetting"])
        assert set(entry["task_il"]) >= {"acc_matrix", "avg_acc", "avg_forgetting", "bwt"}
        csv_rows = (out / "matrices" / f"{track}.class_il.csv").read_text().splitlines()
        assert len(csv_rows) == 6 and float(csv_rows[5].split(",")[5]) == pytest.approx(matrix[4, 4], abs=1e-6)
    assert data["class_order"] == results.meta["class_order"] and len(data["steps_per_task"]) == 5
    assert (out / "acc_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["ema"]["decays"] == [0.9, 0.99, 0.995] and resolved["choices"]["strategy"] == "ema"
    assert not list(out.rglob("*.tmp"))  # atomic writes leave nothing behind


def test_results_json_reads_back_into_the_same_results(runs):
    from cl_ema.results import Results

    _, out, _ = runs("multi", "strategy=ema", DECAYS)
    saved = json.loads((out / "results.json").read_text())
    again = Results.from_dict(saved)
    assert again.status == "completed" and again.meta["class_order"] == saved["class_order"]
    assert json.loads(json.dumps(again.to_dict())) == saved


def test_checkpoint_holds_every_shadow_and_loads_safely(tmp_path):
    from cl_ema.ema import EMA

    run_experiment(tmp_path, "strategy=ema", "ema.decays=[0.9,0.99]", "checkpoint=true", "data.n_tasks=2")
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == "cl_ema-checkpoint-3" and state["results"]["tasks_done"] == 2
    assert set(state["plugins"]) == {"ema"}  # plugin states by config name
    model = digits_mlp()
    model.load_state_dict(state["model"])
    ema = EMA(model, [0.9, 0.99])
    ema.register()
    ema.load_state_dict(state["plugins"]["ema"]["averages"])
    assert state["plugins"]["ema"]["tasks"] == 2
    for got, saved in zip(ema.state_dict()["shadows"], state["plugins"]["ema"]["averages"]["shadows"]):
        assert torch.equal(got, saved)
    assert ema.step == sum(state["results"]["steps_per_task"]) == state["train_iterations"]


def digits_mlp():
    from cl_ema.data.sources import DIGITS_NORM
    from cl_ema.data.storage import DataSpec
    from cl_ema.models import MLP

    return MLP(DataSpec((1, 8, 8), 10, DIGITS_NORM), hidden=100, layers=2)


def test_bf16_autocast_and_channels_last(tmp_path):
    results, text = run_experiment(
        tmp_path,
        "model=cnn",
        "train.precision=bf16",
        "train.channels_last=true",
        "train.epochs=2",
        "data.n_tasks=2",
        "checkpoint=true",
    )
    assert "precision=bf16 autocast" in text and results.status == "completed"
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    conv = state["model"]["features.0.weight"]
    assert conv.dtype == torch.float32 and conv.is_contiguous(memory_format=torch.channels_last)
    assert results.metrics("live", 1)["learning_acc"] > 0.5  # it learns


def test_compiled_model_trains_like_the_eager_one_and_saves_plain_keys(runs, tmp_path):
    from torch._dynamo.utils import counters

    eager, _, _ = runs("ema", *pinned_overrides("ema"))
    graphs_before = counters["stats"]["unique_graphs"]
    compiled, text = run_experiment(tmp_path, "strategy=ema", "train.compile=true", "checkpoint=true")
    assert "compiled" in text and counters["stats"]["unique_graphs"] > graphs_before  # dynamo really ran
    for track in ("live", "ema_0.99"):
        for got, expected in zip(matrices(compiled, track), matrices(eager, track)):
            np.testing.assert_allclose(got, expected, atol=0.012)  # fused kernels round differently: <= 1 sample of ~90
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    digits_mlp().load_state_dict(state)  # no `_orig_mod.` prefix


@pytest.mark.gpu
def test_cuda_run_with_bf16_autocast_learns(tmp_path):
    results, text = run_experiment(
        tmp_path, "device=cuda", "model=cnn", "train.precision=auto", "train.channels_last=true", "data.n_tasks=2"
    )
    expected = "bf16 autocast" if torch.cuda.is_bf16_supported() else "fp32"
    assert "device=cuda" in text and f"precision={expected}" in text
    assert results.status == "completed" and results.metrics("live", 1)["learning_acc"] > 0.5


def test_wandb_offline_run_holds_what_was_logged(tmp_path):
    results, _ = run_experiment(tmp_path, "logger=wandb", "logger.wandb.mode=auto", "strategy=ema", "seed=3")
    logged = read_run(find_run_file(tmp_path))
    tasks = [row["task"] for row in logged.history if "live/class_il/avg_acc" in row]
    assert tasks == [1, 2, 3, 4, 5]
    last = [row for row in logged.history if row.get("task") == 5 and "ema_0.99/class_il/avg_acc" in row][0]
    assert last["ema_0.99/class_il/avg_acc"] == pytest.approx(results.metrics("ema_0.99", 4)["avg_acc"])
    assert last["live/task_il/acc_task_1"] == pytest.approx(results.matrices["live", "task_il"][4, 0])
    assert last["live/class_il/forgetting_task_1"] == pytest.approx(results.forgetting("live", 4)[0])
    assert logged.summary["final/ema_0.99/avg_acc"] == pytest.approx(results.metrics("ema_0.99", 4)["avg_acc"])
    assert logged.summary["final/ema/avg_acc"] == logged.summary["final/ema_0.99/avg_acc"]  # for decay sweeps
    ema, live = results.metrics("ema_0.99", 4), results.metrics("live", 4)
    assert logged.summary["final/ema_0.99/diff_live/avg_acc"] == pytest.approx(ema["avg_acc"] - live["avg_acc"])
    assert logged.summary["final/ema_0.99/task_il/diff_live/avg_acc"] == pytest.approx(
        results.metrics("ema_0.99", 4, "task_il")["avg_acc"] - results.metrics("live", 4, "task_il")["avg_acc"]
    )
    assert "final/live/diff_live/avg_acc" not in logged.summary
    assert logged.summary["final/live/task_il/avg_acc"] == pytest.approx(
        results.metrics("live", 4, "task_il")["avg_acc"]
    )
    assert logged.config["seed"] == 3 and logged.config["ema"]["decay"] == 0.99
    globs = {m.glob_name: m.step_metric for m in logged.metrics if m.glob_name}
    assert globs["live/*"] == globs["ema_0.99/*"] == "task" and globs["continual/*"] == "train_step"
    assert logged.run.run_group.startswith("split_digits-ema-ema_0.99-")  # + the setting's id
    assert logged.config["world_size"] == 1
    assert set(logged.run.tags) >= {"split_digits", "ema"}
    media = {k: v for row in logged.history for k, v in row.items() if k.endswith("acc_matrix")}
    assert media["live/acc_matrix"]["_type"] == "table-file" and media["ema_0.99/acc_matrix"]["nrows"] == 50
    assert media["acc_matrix"]["_type"] == "image-file"


def test_wandb_failure_does_not_stop_training(tmp_path, monkeypatch, capsys):
    import wandb

    from cl_ema.loggers import Loggers

    def broken(*args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", broken)
    monkeypatch.setattr(Loggers, "STRICT", False)  # the net under test (the suite runs without it)
    results, _ = run_experiment(tmp_path, "logger=wandb", "data.n_tasks=2")
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and re.match(r"warning: logger wandb disabled \(.*unreachable\)", warning[0]), warning
    assert results.status == "completed" and (tmp_path / "results.json").exists()


def test_a_run_id_held_by_a_shared_wandb_service_resumes_through_its_own(tmp_path):
    """A killed run's stream stays open in a W&B service it shared (WANDB_SERVICE): the resume goes on."""
    import wandb

    held = wandb.init(project="cl_ema", dir=str(tmp_path), id="heldrun1", mode="offline")  # its service is shared
    resume = (
        "import wandb; from cl_ema.loggers.wandb_logger import init_own_run; "
        f"run = init_own_run(wandb, project='cl_ema', dir={str(tmp_path)!r}, id='heldrun1', resume='allow', "
        "mode='offline'); print(run.id); run.finish()"
    )
    try:
        env = {**os.environ, "WANDB_SILENT": "true"}
        assert env.get("WANDB_SERVICE")
        proc = subprocess.run([sys.executable, "-c", resume], env=env, capture_output=True, text=True, timeout=120)
    finally:
        held.finish()
    assert proc.returncode == 0 and proc.stdout.strip() == "heldrun1", proc.stderr[-2000:]
    (warning,) = proc.stderr.strip().splitlines()
    assert warning.startswith("warning: W&B run heldrun1 is still open in the W&B service named by WANDB_SERVICE")


@pytest.mark.slow
def test_cli_default_run_from_a_non_editable_install(tmp_path):
    """`python -m cl_ema` with no arguments, from a wheel, in an unrelated working directory."""
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [bin_dir / "uv", "build", "--wheel", "--out-dir", tmp_path / "dist", ROOT], check=True, capture_output=True
    )
    wheel = next((tmp_path / "dist").glob("cl_ema-*.whl"))
    site = tmp_path / "site"
    subprocess.run(
        [bin_dir / "uv", "pip", "install", "--no-deps", "--target", site, wheel], check=True, capture_output=True
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("WANDB_MODE", None)  # logger=wandb, mode=auto: offline without an account
    env.pop("WANDB_API_KEY", None)
    env["HOME"] = str(tmp_path)  # no ~/.netrc login
    proc = subprocess.run(
        [sys.executable, "-m", "cl_ema"], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task 5/5" in proc.stdout and "final metrics" in proc.stdout and "ema_0.99" in proc.stdout
    assert "W&B offline run:" in proc.stdout and "wandb sync" in proc.stdout
    readme = (ROOT / "README.md").read_text()
    shown = next(b for b in readme.split("```text\n")[1:] if b.startswith("final metrics")).split("```")[0]
    assert shown in proc.stdout  # the README shows what `make run` prints, to the space
    (result_file,) = work.glob("outputs/split_digits/ema/*/results.json")
    data = json.loads(result_file.read_text())
    assert data["status"] == "completed" and set(data["tracks"]) == {"live", "ema_0.99"}
    assert (result_file.parent / ".hydra" / "config.yaml").exists()  # the composed config
    where = subprocess.run(
        [sys.executable, "-c", "import cl_ema.config as c; print(c.CONFIG_DIR)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where == str(site / "cl_ema" / "conf")  # the configs came from the wheel, not the checkout


def test_tensorboard_and_wandb_at_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results, _ = run_experiment(
        tmp_path, "logger=[wandb,tensorboard]", "strategy=ema", "eval.every_n_steps=50", "data.n_tasks=2"
    )
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    acc = events.Scalars("ema_0.99/class_il/avg_acc")
    assert [e.step for e in acc] == [1, 2] and acc[-1].value == pytest.approx(results.metrics("ema_0.99", 1)["avg_acc"])
    assert [e.step for e in events.Scalars("live/task_il/acc_task_1")] == [1, 2]
    assert [e.step for e in events.Scalars("continual/live/acc_task_1")][:3] == [0, 50, 100]  # optimizer steps
    assert len(events.Images("acc_matrix/class_il")) == 2  # the matrix after each task
    assert read_run(find_run_file(tmp_path)).summary["final/live/avg_acc"] == pytest.approx(
        results.metrics("live", 1)["avg_acc"]
    )


@pytest.mark.parametrize(
    "experiment,strategy,protocol",
    [("seq_mnist", "cls_er", "seq_mnist/clser_200"), ("perm_mnist", "ema_replay", "perm_mnist/er_500")],
)
def test_mammoth_protocols_run_on_mnist_files(tmp_path, experiment, strategy, protocol):
    from fake_datasets import write_mnist

    write_mnist(tmp_path / "data", per_class=8, test_per_class=2)
    results, text = run_experiment(
        tmp_path / "out",
        f"experiment={experiment}",
        f"strategy={strategy}",
        f"best_args={protocol}",
        f"data.root={tmp_path / 'data'}",
        "data.download=false",
        "data.n_tasks=5" if experiment == "seq_mnist" else "data.n_tasks=3",
    )
    assert results.status == "completed"
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    if experiment == "seq_mnist":
        assert data["class_order"] == list(range(10)) and data["task_classes"][0] == [0, 1]
        assert results.tracks == ["live", "ema_plastic", "ema_stable"]
        assert data["config"]["train"]["drop_last"] is True  # CLS-ER's loaders
    else:
        assert data["task_classes"] == [list(range(10))] * 3  # domain-incremental: all classes in every task
        assert data["config"]["data"]["permute_first_task"] is True  # Mammoth permutes the first task too
    assert data["config"]["replay"]["policy"] == "reservoir"

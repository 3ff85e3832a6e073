import os

import pytest

os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest worker per core: a second torch thread per worker only makes them wait for each other
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CL_EMA_STRICT_LOGGERS", "1")  # a logger that fails fails the test (cl_ema.loggers.Loggers)


def pytest_collection_modifyitems(config, items):
    """The slowest tests first (those that start fresh Python processes), so that the workers that steal
    the rest finish together; ``gpu`` tests skip cleanly where there is no CUDA device (CI never has one)."""
    import torch

    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: otherwise in collection order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory):
    """Runs made once per test worker and shared by every test that asks for the same overrides (they must
    not change the folder), figures drawn: ``shared_runs(*overrides)`` → (results, folder, console text)."""
    from helpers import run_experiment

    made = {}

    def get(*overrides: str):
        if overrides not in made:
            folder = tmp_path_factory.mktemp("shared") / "run"
            results, text = run_experiment(folder, *overrides, figures=True)
            made[overrides] = (results, folder, text)
        return made[overrides]

    return get


@pytest.fixture(scope="session")
def _checkpointed_run(tmp_path_factory):
    from helpers import run_experiment

    folder = tmp_path_factory.mktemp("checkpointed") / "run"
    run_experiment(folder, *CHECKPOINTED)
    return folder


CHECKPOINTED = ("strategy=ema", "data.n_tasks=2", "checkpoint=true")  # the run the fixture below copies


@pytest.fixture
def checkpointed_run(_checkpointed_run, tmp_path):
    """A finished run (``CHECKPOINTED``) with its checkpoint, made once per session, copied for a test to
    break or resume: its folder under ``tmp_path``."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(_checkpointed_run, copy)
    return copy

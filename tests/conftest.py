import os

import pytest

os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest worker per core: a second torch thread per worker only makes them wait for each other
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CL_EMA_STRICT_LOGGERS", "1")  # a logger that fails fails the test (cl_ema.loggers.Loggers)


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip cleanly where there is no CUDA device (CI never has one)."""
    import torch

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

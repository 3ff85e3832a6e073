"""Docker files, checked without a Docker engine: lint, compose structure, same lockfile as setup."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run([hadolint, "--failure-threshold", "info", DOCKERFILE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_installs_from_the_lockfile_with_the_setup_uv():
    text = DOCKERFILE.read_text()
    makefile = (ROOT / "Makefile").read_text()
    uv_image = re.search(r'"uv==([\d.]+)"', text).group(1)
    uv_setup = re.search(r'"uv==([\d.]+)"', makefile).group(1)
    assert uv_image == uv_setup
    assert re.search(r"^COPY pyproject.toml uv.lock", text, re.M)
    syncs = re.findall(r"^RUN uv sync (.*)$", text, re.M)
    assert syncs and all("--frozen" in s for s in syncs)  # exactly the locked versions
    assert "$(UV) sync --frozen" in makefile and "UV := .tools/bin/uv" in makefile


def test_image_runs_as_non_root_and_keeps_secrets_out():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "WANDB_API_KEY" not in re.sub(r"^#.*$", "", text, flags=re.M)  # only ever passed at run time
    assert re.search(r'^VOLUME \[.*"/data".*\]', text, re.M)
    assert re.search(r'^ENTRYPOINT \["python", "-m", "cl_ema"\]', text, re.M)


def test_compose_file_reserves_the_gpu_and_passes_wandb_through():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    service = compose["services"]["cl_ema"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert service["environment"]["WANDB_API_KEY"] == "${WANDB_API_KEY:-}"
    assert any(v.endswith(":/data") for v in service["volumes"])

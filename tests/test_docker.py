"""The Docker image (docker/, docs/docker.md).

Its files are checked everywhere, without a Docker engine: hadolint, the lockfile and uv of the setup, what
the build copies, the compose services. The image itself is built and run (``docker`` and ``slow``, `make
docker-test`) only where a Docker daemon answers ``docker info``; elsewhere (CI) those tests skip, saying
why. The base image can be replaced for the build with ``PYTHON_IMAGE=…`` in the environment (a mirror,
or a local stand-in where no registry is reachable); the tag built is ``CL_EMA_TEST_IMAGE`` (cl_ema:test).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
COMPOSE = ROOT / "docker" / "compose.yaml"
IMAGE = os.environ.get("CL_EMA_TEST_IMAGE", "cl_ema:test")
QUICK = ("experiment=split_digits", "logger=none")  # seconds of training on a CPU
SLOW = ("experiment=split_digits", "train.epochs=200", "logger=none")  # about 15 s a task: time to stop it


def _final_stage(text: str) -> str:
    return re.split(r"^FROM ", text, flags=re.M)[-1]


def _code(text: str) -> str:
    return re.sub(r"^\s*#.*$", "", text, flags=re.M)


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
    assert syncs and all("--frozen" in s and "--no-dev" in s for s in syncs)  # exactly the locked versions
    assert "$(UV) sync --frozen" in makefile and "UV := .tools/bin/uv" in makefile


def test_build_copies_every_file_the_project_metadata_names():
    """pyproject.toml's readme and license file are read when the project is installed: without them in the
    image, `uv sync` stops (OSError: License file does not exist: LICENSE)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    named = [re.search(r'^readme = "(.+)"', pyproject, re.M).group(1)]
    named.append(re.search(r'^license = \{ file = "(.+)" \}', pyproject, re.M).group(1))
    text = DOCKERFILE.read_text()
    copied = {name for line in re.findall(r"^COPY (?!--from)(.*) \S+$", text, re.M) for name in line.split()}
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for name in named:
        assert (ROOT / name).is_file()
        assert name in copied, f"the Dockerfile never copies {name}"
        assert f"!{name}" in ignore, f".dockerignore leaves {name} out of the build context"


def test_final_image_holds_the_environment_only():
    """Build tools and uv stay in the builder stage; the image gets the environment, not a second copy of the
    sources or uv's cache; no VOLUME for results (an anonymous volume that `docker run --rm` deletes)."""
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    final = _code(_final_stage(text))
    assert re.search(r"^COPY --from=builder /opt/venv /opt/venv$", final, re.M)
    assert "uv" not in re.findall(r"[\w.-]+", final) and "pip install" not in final
    copied = re.findall(r"^COPY (?!--from)(.*)$", final, re.M)
    assert copied == ["docker/entrypoint.sh /usr/local/bin/cl_ema-entrypoint"]  # no sources
    assert "UV_NO_CACHE=1" in text or "--mount=type=cache" in text
    assert not re.search(r"^VOLUME", text, re.M)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+\.\d+-slim-\w+$", text, re.M), "a pinned patch release"


def test_image_drops_root_and_keeps_secrets_out():
    text = DOCKERFILE.read_text()
    assert not re.search(r"^USER (root|0)\b", text, re.M)
    assert re.search(r'^ENTRYPOINT \["cl_ema-entrypoint"\]$', text, re.M)
    script = ENTRYPOINT.read_text()
    assert script.startswith("#!/bin/sh\n") and "set -eu" in script
    assert re.search(r'^exec setpriv --reuid="\$uid" --regid="\$gid" --clear-groups -- "\$@"$', script, re.M)
    for path in (DOCKERFILE, ENTRYPOINT, COMPOSE):  # only ever passed at run time
        assert not re.search(r"WANDB_API_KEY\s*[=:]\s*\S", _code(path.read_text())), path


def test_compose_has_a_gpu_and_a_cpu_service_and_passes_only_what_is_set():
    compose = yaml.safe_load(COMPOSE.read_text())
    gpu, cpu = compose["services"]["cl_ema"], compose["services"]["cl_ema_cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in cpu  # runs where Docker has no NVIDIA runtime
    for service in (gpu, cpu):
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        # the list form, names only: a variable unset in the shell is not passed (an empty WANDB_MODE is an error)
        assert isinstance(service["environment"], list)
        assert {"WANDB_API_KEY", "WANDB_MODE", "HOST_UID", "HOST_GID"} <= set(service["environment"])
        assert all("=" not in entry for entry in service["environment"])
        assert "cl_ema_data:/data" in service["volumes"]
    assert compose["volumes"]["cl_ema_data"]["name"] == "cl_ema_data"  # the volume `docker run` names


# --- the image itself, where a Docker daemon answers ---------------------------------------------------


def _no_daemon() -> str | None:
    """Why the image cannot be built here, or None."""
    docker = shutil.which("docker")
    if docker is None:
        return "no `docker` client on PATH (CI has no Docker daemon); `make docker-test` where one runs"
    try:
        proc = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer in 60 s; `make docker-test` where a Docker daemon runs"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        return f"no Docker daemon answers `docker info` (CI has none): {why}"
    return None


def _docker(*args: str, timeout: float = 900, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"docker {' '.join(args)}: exit status {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def image() -> str:
    reason = _no_daemon()
    if reason:
        pytest.skip(reason)
    base = os.environ.get("PYTHON_IMAGE")
    build_args = ["--build-arg", f"PYTHON_IMAGE={base}"] if base else []
    _docker("build", *build_args, "-f", str(DOCKERFILE), "-t", IMAGE, str(ROOT), timeout=3600, check=True)
    return IMAGE


def _me() -> list[str]:
    return ["-e", f"HOST_UID={os.getuid()}", "-e", f"HOST_GID={os.getgid()}"]


def _results(outputs: Path) -> list[Path]:
    return sorted(outputs.rglob("results.json"))


def _read(results: Path) -> dict:
    return json.loads(results.read_text())


@pytest.mark.docker
@pytest.mark.slow
def test_image_is_lean_and_starts_quietly(image):
    """Under 7 GB; neither uv nor the sources ship; any uid finds a HOME and matplotlib's baked font cache."""
    size = int(_docker("image", "inspect", "--format", "{{.Size}}", image, check=True).stdout)
    assert size < 7e9, f"{size / 1e9:.2f} GB"
    probe = (
        "import os, shutil, matplotlib.pyplot, matplotlib;"
        "print(shutil.which('uv'), os.path.exists('/src'), os.access(os.environ['HOME'], os.W_OK),"
        " matplotlib.get_cachedir(), shutil.which('g++') is not None)"
    )
    proc = _docker("run", "--rm", "--user", "4321:4321", image, "python", "-c", probe, check=True)
    assert proc.stdout.split() == ["None", "False", "True", "/opt/matplotlib", "True"]
    assert proc.stderr == "", proc.stderr  # e.g. "Matplotlib is building the font cache" at every start


@pytest.mark.docker
@pytest.mark.slow
def test_default_experiment_writes_into_the_host_folder(image, tmp_path):
    """The documented `mkdir -p outputs && docker run --rm -v "$PWD/outputs:/work/outputs" cl_ema`: results
    belong to the owner of the host folder (uid 1000 where that is root: nothing tells who else)."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    proc = _docker("run", "--rm", "-v", f"{outputs}:/work/outputs", image, check=True)
    assert "results: /work/outputs/split_digits/ema/" in proc.stdout
    (results,) = _results(outputs)
    data = _read(results)
    assert data["status"] == "completed" and data["tasks_done"] == data["num_tasks"] == 5
    assert results.stat().st_uid == (os.getuid() or 1000)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("how", ["HOST_UID", "--user", "folder owner"])
def test_results_belong_to_the_user_who_ran_it(image, tmp_path, how):
    """A host folder Docker creates (as root) for HOST_UID, an existing one for --user, or one whose owner
    the entrypoint takes as the user. Run as root, the test hands the folder to uid 4321 (a uid without a name
    in the image) for the last two: root's own folder would be given to uid 1000, and --user 0 is root."""
    outputs = tmp_path / "outputs"
    uid, gid = os.getuid(), os.getgid()
    if how == "HOST_UID":
        args = _me()  # outputs/ does not exist yet: Docker makes it, as root
    else:
        outputs.mkdir()
        if uid == 0:
            uid = gid = 4321
            os.chown(outputs, uid, gid)
        args = ["--user", f"{uid}:{gid}"] if how == "--user" else []
    _docker("run", "--rm", *args, "-v", f"{outputs}:/work/outputs", image, *QUICK, check=True)
    (results,) = _results(outputs)
    assert _read(results)["status"] == "completed"
    for path in (outputs, results, results.parent):
        assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid), path


@pytest.mark.docker
@pytest.mark.slow
def test_a_bad_override_is_one_line_and_status_2(image):
    proc = _docker("run", "--rm", image, "ema.decay=2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: ema.decay=2"), line


@pytest.mark.docker
@pytest.mark.slow
def test_docker_stop_then_resume_in_a_new_container(image, tmp_path):
    """SIGTERM (docker stop, docker kill --signal TERM) reaches cl_ema, which marks its results interrupted
    and names the resume; a second container with the same overrides and resume= finishes the run."""
    outputs = tmp_path / "outputs"
    name = f"cl_ema_test_{uuid.uuid4().hex[:12]}"
    mount = ["-v", f"{outputs}:/work/outputs"]
    run = ["docker", "run", "--rm", "--name", name, *_me(), *mount, image, *SLOW]
    with subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as first:
        try:
            deadline = time.monotonic() + 600
            while True:
                assert first.poll() is None, f"ended before it was stopped: {first.communicate()}"
                assert time.monotonic() < deadline, "no task finished in 600 s"
                found = _results(outputs) if outputs.is_dir() else []
                try:
                    if found and _read(found[0])["tasks_done"] >= 1:
                        break
                except (OSError, ValueError):
                    pass  # not there yet
                time.sleep(1)
            _docker("kill", "--signal", "TERM", name, check=True)
            stdout, stderr = first.communicate(timeout=120)
        finally:
            if first.poll() is None:
                _docker("rm", "--force", name)
    assert first.returncode == 128 + 15, stdout + stderr
    (results,) = _results(outputs)
    stopped = _read(results)
    assert stopped["status"] == "interrupted" and 1 <= stopped["tasks_done"] < 5, stopped["status"]
    run_dir = "/work/outputs/" + results.parent.relative_to(outputs).as_posix()
    assert f"resume={run_dir}" in stdout + stderr

    _docker("run", "--rm", *_me(), *mount, image, *SLOW, f"resume={run_dir}", check=True)
    (results,) = _results(outputs)  # the same folder: the run went on in it
    resumed = _read(results)
    assert resumed["status"] == "completed" and resumed["tasks_done"] == 5
    assert results.stat().st_uid == os.getuid()


@pytest.mark.docker
@pytest.mark.slow
def test_train_compile_works_with_the_compiler_the_image_ships(image, tmp_path):
    """train.compile=true on a CPU: Inductor compiles C++ with the image's g++, under a uid that has no name
    in the image (its cache folder is named after the user)."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    uid, gid = (os.getuid(), os.getgid()) if os.getuid() else (4321, 4321)
    os.chown(outputs, uid, gid)
    args = ["--user", f"{uid}:{gid}", "-v", f"{outputs}:/work/outputs"]
    proc = _docker("run", "--rm", *args, image, *QUICK, "train.compile=true", "train.epochs=1", check=True)
    assert ", compiled" in proc.stdout.splitlines()[0]
    (results,) = _results(outputs)
    assert _read(results)["status"] == "completed"

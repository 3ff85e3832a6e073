"""The docs (README.md and docs/**/*.md): every code block runs or is checked, and the reference tables are whole.

The convention for code blocks is in docs/development.md ("Code blocks"): ```python runs, ```bash is checked
command by command (``python -m cl_ema <overrides>`` is composed and validated, never trained), ```text is
output; a block this file does not know how to check fails, so that each new one is classified.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import CONF, ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
MAKEFILE = ROOT / "Makefile"

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<what>\S+)\s*(?P<arg>.*?)\s*-->")

# Commands a bash block may hold that no test can run here (an account, a daemon, a scheduler, GPUs): `bash -n`
# checks their syntax, with the rest of their block. Keys are a command's leading words.
SYNTAX_ONLY = {
    ("wandb", "agent"): "needs a W&B account and a sweep",
    ("wandb", "login"): "needs a W&B account",
    ("wandb", "sync"): "needs a W&B account",
    ("docker",): "needs a Docker daemon",
    ("tensorboard",): "starts a server",
    ("sbatch",): "needs SLURM",
    ("nvidia-smi",): "needs a GPU",
}
SHELL_SEPARATORS = {";", "&", "&&", "|", "||"}


def check_config(*overrides: str) -> None:
    """What ``python -m cl_ema <overrides>`` would run, composed and checked without training: the one place
    the docs test calls the project's config API."""
    from cl_ema.config import check, compose

    check(compose(*overrides))


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, from 1
    language: str
    code: str
    marker: re.Match | None  # a `<!-- docs-test: what arg -->` comment on the last non-blank line above the fence

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        above = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        body, j = [], i + 1
        while j < len(lines) and not re.fullmatch(rf"[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*", lines[j]):
            body.append(lines[j][indent:] if not lines[j][:indent].strip() else lines[j])
            j += 1
        assert j < len(lines), f"{page.relative_to(ROOT)}:{i + 1}: a code block that is never closed"
        words = opening["info"].split()
        blocks.append(Block(page, i + 1, words[0] if words else "", "\n".join(body) + "\n", MARKER.fullmatch(above)))
        i = j + 1
    return blocks


BLOCKS = [block for page in PAGES for block in code_blocks(page)]


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_every_code_block_runs_or_is_checked(block: Block, tmp_path, monkeypatch):
    if block.marker and block.marker["what"] == "from":
        source = ROOT / block.marker["arg"]
        assert source.is_file(), f"{block}: `docs-test: from {block.marker['arg']}` names no file"
        assert block.code.strip() in source.read_text(), f"{block}: the block is not a verbatim part of {source}"
    elif block.language == "text":
        pass  # output, as a command prints it
    elif block.language == "python":
        code = compile(block.code, str(block), "exec")  # a syntax error fails every Python block
        if block.marker and block.marker["what"] == "compile-only":
            assert block.marker["arg"], f"{block}: say why it cannot run: <!-- docs-test: compile-only <reason> -->"
        else:
            assert not block.marker, f"{block}: unknown marker {block.marker[0]}"
            run_python(code, tmp_path, monkeypatch)
    elif block.language == "bash":
        assert not block.marker, f"{block}: bash blocks take no marker ({block.marker[0]})"
        check_bash(block)
    else:
        pytest.fail(
            f"{block}: a ```{block.language} block, which the docs test does not know how to check: use "
            "```python (run), ```bash (commands checked), ```text (output), or put "
            "<!-- docs-test: from <path> --> above a block copied verbatim from that file (docs/development.md)"
        )


def run_python(code, tmp_path: Path, monkeypatch) -> None:
    """In this process (its imports are already paid for), in a fresh namespace and an empty working folder;
    the block's random seeds stay in the block."""
    import torch

    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng(devices=[]):
        exec(code, {"__name__": "__main__"})


def check_bash(block: Block) -> None:
    syntax = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
    assert syntax.returncode == 0, f"{block}: bash -n: {syntax.stderr.strip()}"
    for words in shell_commands(block.code):
        check_command(words, block)


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell script, as words: continuation lines joined, comments dropped, split at
    ; & && | ||, loop headers and keywords left out, leading VAR=value assignments kept."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word not in SHELL_SEPARATORS:
                command.append(word)
                continue
            while command and command[0] in ("do", "then", "else"):
                command.pop(0)
            if command and command[0] not in ("for", "while", "done", "fi"):
                commands.append(command)
            command = []
    return commands


ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")


def check_command(words: list[str], block: Block) -> None:
    assignments = []  # the environment given to the command: VAR=value words before it
    while words and ASSIGNMENT.fullmatch(words[0]):
        assignments.append(words.pop(0).split("=", 1)[0])
    if not words:
        return  # VAR=value alone
    where = f"{block}: `{shlex.join(words)}`"
    if words[:3] == ["python", "-m", "cl_ema"]:
        check_cl_ema(words[3:], where)
    elif words[0] == "torchrun":
        assert "-m" in words and words[words.index("-m") + 1] == "cl_ema", f"{where}: torchrun runs -m cl_ema here"
        check_cl_ema(words[words.index("-m") + 2 :], where)
    elif words[:2] == ["python", "-m"]:
        spec = importlib.util.find_spec(words[2])
        assert spec and spec.origin, f"{where}: no module {words[2]}"
        check_options(Path(spec.origin), words[3:], where)
    elif words[0] == "python":
        check_options(ROOT / words[1], words[2:], where)
    elif words[0] == "bash":
        script = ROOT / words[1]
        check_options(script, words[2:], where)
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, f"{where}: bash -n {script} fails"
        for name in assignments:  # the environment a script is given is read by it
            assert name in script.read_text(), f"{where}: {script.name} does not read {name}"
    elif words[0] == "make":
        check_make(words[1:], where)
    elif words[:2] in (["source", ".venv/bin/activate"], [".", ".venv/bin/activate"]):
        assert re.search(r"^VENV\s*:?=\s*\.venv/bin\s*$", MAKEFILE.read_text(), re.M), f"{where}: make's venv moved"
    elif words[:2] == ["wandb", "sweep"]:
        assert (ROOT / words[2]).is_file(), f"{where}: no sweep file {words[2]}"
    elif not any(tuple(words[: len(prefix)]) == prefix for prefix in SYNTAX_ONLY):
        pytest.fail(f"{where}: a command the docs test does not know how to check (add it to tests/test_docs.py)")


def check_cl_ema(args: list[str], where: str) -> None:
    """Compose and check the run's config; a multirun's sweeps value by value (the others at their first)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = [arg for arg in args if arg in ("-m", "--multirun")]
    overrides = [arg for arg in args if arg not in multirun]
    assert not [arg for arg in overrides if arg.startswith("-")], f"{where}: an option that is no Hydra override"
    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = {i: list(o.sweep_string_iterator()) for i, o in enumerate(parsed) if o.is_sweep_override()}
    assert multirun or not sweeps, f"{where}: a sweep (a,b,…) without -m"
    first = [
        f"{o.input_line.split('=', 1)[0]}={sweeps[i][0]}" if i in sweeps else o.input_line for i, o in enumerate(parsed)
    ]
    runs = [first] + [
        [*first[:i], f"{parsed[i].input_line.split('=', 1)[0]}={value}", *first[i + 1 :]]
        for i, values in sweeps.items()
        for value in values[1:]
    ]
    for run in runs:
        try:
            check_config(*run)
        except Exception as err:
            pytest.fail(f"{where}: {' '.join(run)}: {type(err).__name__}: {err}")


def check_options(script: Path, args: list[str], where: str) -> None:
    assert script.is_file(), f"{where}: no file {script}"
    source = script.read_text()
    for arg in args:
        if arg.startswith("--"):
            option = arg.split("=", 1)[0]
            declared = f'"{option}"' in source or f"'{option}'" in source  # argparse's add_argument("--x")
            assert declared or (script.suffix == ".sh" and option in source), f"{where}: {script.name} has no {option}"


def check_make(args: list[str], where: str) -> None:
    makefile = MAKEFILE.read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.M))
    for arg in args:
        if ASSIGNMENT.fullmatch(arg):
            name, value = arg.split("=", 1)
            assert f"$({name})" in makefile, f"{where}: the Makefile does not read {name}"
            if name == "ARGS" and args[0] == "run":
                check_cl_ema(shlex.split(value), where)
        else:
            assert arg in targets, f"{where}: no make target {arg}"


# ------------------------------------------------------------------------------------------- the pages themselves
def options(group: str) -> list[str]:
    return sorted(str(p.relative_to(CONF / group).with_suffix("")) for p in (CONF / group).rglob("*.yaml"))


def test_the_docs_list_every_experiment_strategy_and_protocol():
    experiments, strategies = (DOCS / "experiments.md").read_text(), (DOCS / "strategies.md").read_text()
    for name in options("experiment"):
        assert f"| `{name}` |" in experiments or f"| `{name}` (default) |" in experiments, name
    for name in options("strategy"):
        assert f"| `{name}` |" in strategies, name
    for protocol in options("best_args"):
        assert f"`{protocol}`" in experiments, protocol


def test_the_readme_is_a_front_page_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 250, "the README is the front page: move details to docs/"
    for target in re.findall(r"\]\((?!https?://|#)([^)#\s]+)", text):
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_every_page_is_in_the_nav_and_every_api_page_names_modules_that_exist():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        assert str(page.relative_to(DOCS)) in nav, f"{page.relative_to(ROOT)} is not in mkdocs.yml's nav"
    for page in (DOCS / "api").glob("*.md"):
        for module in re.findall(r"^::: ([\w.]+)", page.read_text(), re.M):
            assert importlib.util.find_spec(module), f"{page.relative_to(ROOT)}: no module {module}"

"""README's commands stay true: every `make` target exists, every `python -m` module or script
exists and accepts the flags README gives it, every `dvc ... -S key=value` names a real key.

What the commands *do* is tested elsewhere (test_dag runs the DVC and Prefect paths on a micro
project, CI runs `make test` from a clean clone); this catches the README drifting from the code.
"""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """Shell commands of README: lines of fenced bash blocks and inline `python|make|dvc ...`."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        commands += [line.split("#")[0].strip() for line in block.splitlines()]
    commands += re.findall(r"`((?:python|make|dvc) [^`]+)`", text)
    return sorted({c for c in commands if c.split(" ")[0] in ("python", "make", "dvc")})


COMMANDS = readme_commands()


def test_readme_has_the_two_main_commands() -> None:
    assert {"make run", "make test"} <= set(COMMANDS)


@cache
def _help(target: tuple[str, ...]) -> str:
    proc = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(target)} --help failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


def _flags(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("--") and w != "--help"]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("make ")])
def test_make_targets_exist(command: str) -> None:
    target = command.split()[1]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no Makefile target {target}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python ")
                                     and "<" not in c and "|" not in c])
def test_python_commands_exist_and_take_their_flags(command: str) -> None:
    words = command.split()[1:]
    if words[0] == "-m":
        target: tuple[str, ...] = ("-m", words[1])
        rest = words[2:]
        if words[1] in ("appo", "flows.cluster") and rest and not rest[0].startswith("-"):
            target, rest = ("-m", words[1], rest[0]), rest[1:]  # a subcommand's own flags
    else:
        assert (ROOT / words[0]).is_file(), f"{words[0]} does not exist"
        target, rest = (words[0],), words[1:]
    text = _help(target)
    for flag in _flags(rest):
        for part in flag.split("/"):  # "--set/--params": both
            part = part if part.startswith("--") else f"--{part}"
            assert part in text, f"`{command}`: {part} is not an option of {' '.join(target)}"


def _has_key(params: dict, dotted: str) -> bool:
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("dvc ") and " -S " in c])
def test_dvc_set_overrides_name_real_params(command: str) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in re.findall(r"-S ([\w.\-]+)=", command):
        assert _has_key(params, key), f"`{command}`: params.yaml has no {key}"

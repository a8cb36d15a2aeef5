"""Every command in the code blocks of README.md and BUILD.md runs as written.

The cheap ones run for real, in a temporary directory that sees the repository's configs/: `--help`
of every command, `vdit params`, `vdit flops`, and `vdit prepare` on a folder of generated videos
(`vdit compile` of the documented XL/2 config runs with the slow tests, where libtpu is installed).
The rest are parsed as `vdit` would parse them: the command exists, every flag is one of its flags,
the --config file loads with its overrides and validates. `make` targets and variables must exist in
the Makefile, and every `python bench/...` script must exist and take the flags given.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex

import jax
import numpy as np
import pytest
from tiny import ROOT

from vdit import cli, configlib
from vdit.cli import base
from vdit.data.video_io import write_video

DOCS = ("README.md", "BUILD.md")
RUN = {"params", "flops", "prepare"}  # run for real; compile too, in the slow set
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@dataclasses.dataclass(frozen=True)
class Documented:
    where: str  # FILE:LINE
    program: str  # "vdit", "make" or "python"
    args: tuple[str, ...]  # after the program (and, for vdit, its command first)
    env: tuple[tuple[str, str], ...]  # NAME=VALUE written before it

    def __str__(self) -> str:
        return f"{self.where}: {self.program} {shlex.join(self.args)}"


def documented() -> list[Documented]:
    """The commands of the fenced code blocks of DOCS, continuation lines joined, comments cut."""
    out = []
    for name in DOCS:
        text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        for block in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
            first = text[: block.start()].count("\n") + 2
            lines = block.group(1).splitlines()
            i = 0
            while i < len(lines):
                start, logical = i, lines[i]
                while logical.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    logical = logical.rstrip()[:-1] + " " + lines[i]
                i += 1
                head = [w for w in logical.split() if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w)]
                if not head or head[0] not in ("vdit", ".venv/bin/vdit", "make", "python"):
                    continue  # prose, a file tree, a continuation comment
                words = [os.path.expandvars(w) for w in shlex.split(logical, comments=True)]
                env = []
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                    env.append(tuple(words.pop(0).split("=", 1)))
                if not words:
                    continue
                program = {".venv/bin/vdit": "vdit"}.get(words[0], words[0])
                if program == "python" and len(words) > 1 and words[1].startswith("bench/"):
                    pass
                elif program not in ("vdit", "make"):
                    continue
                out.append(
                    Documented(f"{name}:{first + start}", program, tuple(words[1:]), tuple(env))
                )
    return out


COMMANDS = documented()
VDIT = [c for c in COMMANDS if c.program == "vdit"]


def test_the_docs_hold_commands_of_every_kind():
    assert {c.program for c in COMMANDS} == {"vdit", "make", "python"}
    assert {c.args[0] for c in VDIT} == set(cli.COMMANDS)  # every command is shown somewhere


def _vdit(capsys, args) -> tuple[int, str, str]:
    """`vdit ARGS...` in this process: (exit status, stdout, stderr)."""
    try:
        cli.run(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def in_temp_dir(tmp_path, monkeypatch):
    """A working directory with the repository's configs/ and a tiny videos/ folder (VIDEOS too)."""
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    rng = np.random.default_rng(0)
    for folder in ("videos", "VIDEOS"):
        (tmp_path / folder).mkdir()
        write_video(tmp_path / folder / "a.mp4", rng.integers(0, 256, (4, 16, 24, 3), np.uint8))
        write_video(tmp_path / folder / "b.png", rng.integers(0, 256, (1, 16, 16, 3), np.uint8))
    with open(tmp_path / "captions.jsonl", "w") as f:
        f.write(json.dumps({"file": "a.mp4", "caption": "a red square moves left"}) + "\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help_with_an_example_that_parses(capsys, name):
    code, out, _ = _vdit(capsys, [name, "--help"])
    assert code == 0 and out.startswith(f"usage: vdit {name} ")
    example = out.split("example:\n", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    words = shlex.split(example)
    assert words[:2] == ["vdit", name]
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # the example's configs/ paths
        _parses(Documented("help", "vdit", tuple(words[1:]), ()))
    finally:
        os.chdir(cwd)


def _parses(c: Documented) -> None:
    """`vdit` reads the command as its user would: its flags, and the config they make."""
    command = cli.COMMANDS.get(c.args[0])
    assert command is not None, f"{c}: no such vdit command"
    try:
        fv = base.parse(command, c.args[1:])
    except base.UsageError as e:
        pytest.fail(f"{c}: {e}")
    if "config" in fv and fv["config"].present:
        try:
            if c.args[0] == "sweep":  # a sweep config: its checks and its base training config
                from vdit.sweep import plan

                plan.check(fv.config)
                configlib.load(fv.config.base, plan_only=True)
            else:
                configlib.load(fv.config, plan_only=True)
        except ValueError as e:
            pytest.fail(f"{c}: {e}")


# `vdit prepare` decodes videos with an ffmpeg subprocess; here it runs inside a JAX process (the
# tests'), which `vdit prepare` itself never is, so JAX's fork warning does not apply.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
@pytest.mark.parametrize("c", VDIT, ids=str)
def test_documented_vdit_commands(capsys, in_temp_dir, c):
    name = c.args[0]
    if name not in RUN:  # compile: run by test_documented_compile_runs, in the slow set
        _parses(c)
        return
    if "--runner=beam" in c.args:
        pytest.importorskip("apache_beam", reason="--runner=beam needs the data extra")
    env = dict(c.env)
    if "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", ""):  # fake CPU devices
        count = int(env["XLA_FLAGS"].split("device_count=")[1].split()[0])
        assert jax.device_count() == count, "tests/conftest.py sets up another device count"
    code, out, err = _vdit(capsys, c.args)
    assert code == 0, f"{c}:\n{err[-2000:]}"
    if name == "prepare":
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["written"] == 2 and summary["skipped"] == 0
    elif name == "params":
        assert "total parameters" in out
    else:
        assert "total model FLOPs" in out


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
@pytest.mark.parametrize("c", [c for c in VDIT if c.args[0] == "compile"], ids=str)
def test_documented_compile_runs(capsys, in_temp_dir, c):
    code, out, err = _vdit(capsys, c.args)
    assert code == 0, f"{c}:\n{err[-2000:]}"
    assert "fits" in out or "does not fit" in out or "GiB" in out


def _makefile() -> tuple[set[str], set[str]]:
    text = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"^([A-Z_]+)\s*\??=", text, re.M))
    return targets, variables


@pytest.mark.parametrize("c", [c for c in COMMANDS if c.program == "make"], ids=str)
def test_documented_make_commands(c):
    targets, variables = _makefile()
    for word in c.args:
        if "=" in word:
            assert word.split("=", 1)[0] in variables, f"{c}: the Makefile sets no {word}"
        else:
            assert word in targets, f"{c}: the Makefile has no target {word!r}"


@pytest.mark.parametrize("c", [c for c in COMMANDS if c.program == "python"], ids=str)
def test_documented_bench_commands(c):
    path = os.path.join(ROOT, c.args[0])
    assert os.path.isfile(path), f"{c}: no such script"
    source = open(path, encoding="utf-8").read()
    options = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))
    for word in c.args[1:]:
        if word.startswith("--"):
            assert word.split("=", 1)[0] in options, f"{c}: {c.args[0]} takes no {word}"

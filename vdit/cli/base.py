"""What every `vdit` command shares: its description, flag parsing, help, and one-line errors.

A command is a `Command`: a name, a one-line summary, an example that runs, a function that defines
its flags on a fresh absl `FlagValues` (so `vdit COMMAND --help` lists only its own) and the
function that runs it. `--config` is ml_collections' config file flag on that `FlagValues`.

Errors a user can fix print as one line, `vdit COMMAND: error: ...`, and exit with status 2: a flag
that is not the command's, a missing required flag, a config file that does not exist or load, an
override of a field the config lacks, and the ValueError / OSError that vdit raises on
purpose (a config field, a mesh, a work directory without checkpoints, a checkpoint that cannot be
written). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import textwrap
from collections.abc import Callable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

WIDTH = 100  # help text width


class UsageError(Exception):
    """A command line or input the user can fix; printed as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    summary: str  # one line, for `vdit --help`
    usage: str  # the command's synopsis after `vdit NAME`
    example: str  # a command line that runs as written (tests/test_docs.py runs or parses it)
    define: Callable[[flags.FlagValues, Sequence[str]], None]  # (flags, argv) -> None
    run: Callable[[flags.FlagValues], None]
    required: tuple[tuple[str, str], ...] = ()  # (flag, what to give): checked before `run`
    distributed: bool = False  # takes the multi-process flags; jax.distributed starts before run
    notes: str = ""  # more help, after the summary


# ----------------------------------------------------------------------------------------------
# Flags several commands define
# ----------------------------------------------------------------------------------------------
def define_config(fv: flags.FlagValues, argv: Sequence[str], help: str) -> None:
    """--config=FILE[:ARG] and its --config.FIELD=VALUE overrides (ml_collections)."""
    config_flags.DEFINE_config_file(
        "config", None, help, flag_values=fv, lock_config=False, sys_argv=list(argv)
    )


def define_distributed(fv: flags.FlagValues) -> None:
    """The multi-process start-up flags (train, sample, eval, encode)."""
    flags.DEFINE_enum(
        "distributed",
        "auto",
        ["auto", "on", "off"],
        "Multi-process start-up: auto = from --coordinator_address/--num_processes/--process_id "
        "or a detected cluster (SLURM, Open MPI, TPU slice), else one process; on = always call "
        "jax.distributed.initialize() (any environment JAX detects); off = one process.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "HOST:PORT of process 0's coordinator (multi-process runs).",
        flag_values=fv,
    )
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.", flag_values=fv)
    flags.DEFINE_integer(
        "process_id", None, "This process's index, 0..num_processes-1.", flag_values=fv
    )
    flags.DEFINE_string(
        "local_device_ids",
        None,
        "Comma-separated local devices this process uses (e.g. one GPU each).",
        flag_values=fv,
    )


DISTRIBUTED_FLAGS = (
    "distributed",
    "coordinator_address",
    "num_processes",
    "process_id",
    "local_device_ids",
)


def init_distributed(fv: flags.FlagValues) -> None:
    """jax.distributed from the flags or the cluster (before any device is touched); log the layout."""
    import logging

    from vdit.parallel import distributed

    try:
        distributed.initialize(
            fv.coordinator_address,
            fv.num_processes,
            fv.process_id,
            fv.local_device_ids,
            fv.distributed,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    logging.getLogger("vdit").info(distributed.describe())


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------
def command_flags(command: Command, argv: Sequence[str]) -> flags.FlagValues:
    """The command's flags, defined on a fresh FlagValues (not parsed)."""
    fv = flags.FlagValues()
    command.define(fv, argv)
    if command.distributed:
        define_distributed(fv)
    return fv


def parse(command: Command, args: Sequence[str]) -> flags.FlagValues:
    """Parse `args` (what follows `vdit NAME`) into the command's flags; UsageError naming the
    problem and the fix."""
    argv = [f"vdit {command.name}", *args]
    fv = command_flags(command, argv)
    config_arg = _config_value(args)
    if "config" in fv and config_arg is not None:
        _check_config_file(config_arg)
    try:
        rest = fv(argv)
    except flags.UnrecognizedFlagError as e:
        if e.flagname.startswith("config.") and "config" in fv:
            raise UsageError(
                f"--{e.flagname} overrides a config field, but no --config is given"
            ) from None
        close = difflib.get_close_matches(e.flagname, list(fv), n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise UsageError(
            f"--{e.flagname} is not a flag of `vdit {command.name}`{hint}; "
            f"`vdit {command.name} --help` lists its flags"
        ) from None
    except flags.Error as e:  # a bad value, or a config file that raised while loading
        raise UsageError(_last_line(str(e))) from None
    except Exception as e:  # an override of a field the config lacks, or the file raised
        raise UsageError(_config_error(args, config_arg, e)) from None
    if len(rest) > 1:
        raise UsageError(
            f"unexpected argument {rest[1]!r}: flags are written --name=value; "
            f"`vdit {command.name} --help` lists them"
        )
    for name, what in command.required:
        if fv[name].value is None:
            raise UsageError(f"--{name} is required: {what}")
    if "config" in fv and fv["config"].present:
        c = fv.config
        if type(c).__name__ == "_ErrorConfig":  # ml_collections' stand-in for a failed load
            try:
                c.to_dict()  # raises the load error
            except Exception as e:
                raise UsageError(f"--config={config_arg}: does not load: {e}") from None
        if not isinstance(c, ml_collections.ConfigDict):
            raise UsageError(
                f"--config={config_arg}: get_config() returned {type(c).__name__}, not an "
                "ml_collections.ConfigDict"
            )
    return fv


def _config_value(args: Sequence[str]) -> str | None:
    """The value of --config=VALUE (or --config VALUE) in `args`."""
    for i, a in enumerate(args):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(args):
            return args[i + 1]
    return None


def _config_error(args: Sequence[str], config_arg: str | None, e: Exception) -> str:
    if isinstance(e, AttributeError | KeyError) and config_arg is not None:
        try:
            found = _bad_override(config_arg, args)
        except Exception:  # the file itself does not load
            found = None
        if found:
            return found
    return f"--config={config_arg}: does not load: {type(e).__name__}: {e}"


def _check_config_file(value: str) -> None:
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
        raise UsageError(
            f"--config={value}: no such file {path!r}; give a config file such as "
            "configs/default.py (a variant after ':', e.g. configs/default.py:S/2)"
        )


def _last_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    return f"{lines[0].split(':', 1)[0]}: {lines[-1]}"  # "flag --config=...: ValueError: ..."


def _bad_override(config_arg: str, args: Sequence[str]) -> str | None:
    """Which --config.A.B=V names a field the config does not have, and what it does have."""
    fv = flags.FlagValues()
    define_config(fv, ["vdit", f"--config={config_arg}"], "")
    fv(["vdit", f"--config={config_arg}"])
    for arg in args:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0]
        node, done = fv.config, []
        for part in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(done) or "the config"
                have = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return f"--config.{path}: {where} has no field {part!r}" + (
                    f" (its fields: {', '.join(have)})" if have else ""
                )
            node, done = node[part], [*done, part]
    return None


# ----------------------------------------------------------------------------------------------
# Help
# ----------------------------------------------------------------------------------------------
def command_help(command: Command) -> str:
    fv = command_flags(command, [f"vdit {command.name}"])
    usage = textwrap.fill(
        f"usage: vdit {command.name} {command.usage}",
        WIDTH,
        subsequent_indent=" " * len(f"usage: vdit {command.name} "),
        break_long_words=False,
        break_on_hyphens=False,
    )
    out = [usage, "", command.summary]
    if command.notes:
        out += ["", textwrap.fill(command.notes, WIDTH)]
    out += ["", "example:", textwrap.indent(command.example, "  "), "", "flags:"]
    required = {name for name, _ in command.required}
    own = [name for name in fv if name not in DISTRIBUTED_FLAGS]
    out += [_flag_help(fv[name], name in required) for name in own]
    if "config" in fv:
        out.append(
            _wrap("--config.FIELD=VALUE", "Override one field, e.g. --config.train.steps=50.")
        )
    if command.distributed:
        out += ["", "multi-process flags (one process per host, each running the same command):"]
        out += [_flag_help(fv[name], False) for name in DISTRIBUTED_FLAGS]
    return "\n".join(out)


def _flag_help(flag: flags.Flag, required: bool) -> str:
    text = flag.help + (" (required)" if required else "")
    if flag.default is not None and flag.name != "config":
        default = repr(flag.default) if isinstance(flag.default, str) else flag.default
        text += f" (default: {default})"
    return _wrap(f"--{flag.name}", text)


def _wrap(name: str, text: str) -> str:
    body = textwrap.fill(text, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return f"  {name}\n{body}"


def commands_help(commands: Sequence[Command]) -> str:
    width = max(len(c.name) for c in commands)
    lines = ["usage: vdit COMMAND [--flag=value ...]", "", "commands:"]
    lines += [f"  {c.name:{width}s}  {c.summary}" for c in commands]
    lines += ["", "`vdit COMMAND --help` lists the flags of a command, with an example."]
    return "\n".join(lines)


def fail(command: str, message: str, status: int = 2) -> None:
    """Print `vdit COMMAND: error: MESSAGE` (one line) and exit."""
    print(f"vdit {command}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(status)


def raised_by_vdit(e: BaseException) -> bool:
    """Whether vdit's own code raised `e` (an error written for the user) rather than a library."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    name = tb.tb_frame.f_globals.get("__name__", "")
    return name == "vdit" or name.startswith("vdit.")

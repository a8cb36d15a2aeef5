"""The `vdit` command: one sub-command per task, each with its own flags.

    vdit train   --config=configs/default.py[:VARIANT] --workdir=DIR [--config.FIELD=VALUE ...]
    vdit sample  --workdir=DIR --prompt="a red square moves left" --out=sample.mp4
    vdit eval    --workdir=DIR                       colour / motion accuracy of samples vs prompts
    vdit params  --config=...                        every parameter's shape and sharding
    vdit flops   --config=...                        analytic FLOPs of one train step, by part
    vdit compile --config=... --topology=v5p-8       compile the train step for a TPU slice
    vdit prepare --input=DIR --out=DIR               videos and images -> records
    vdit encode  --config=configs/latent.py --vae=DIR --input=RECORDS --out=DIR
                                                     records -> VAE latents
    vdit export  --workdir=DIR --out=DIR --format=safetensors|orbax|stablehlo|diffusers
                                                     a trained model's parameters out of its run
    vdit import  --config=configs/wan.py --from=DIFFUSERS_DIR --out=DIR
                                                     open Wan2.1 weights -> a vdit export
    vdit sweep   --config=configs/sweep.py --workdir=DIR [--dry_run]
                                                     an IsoFLOP compute-scaling sweep

`vdit --help` lists the commands, `vdit COMMAND --help` the flags of one, with an example. The
commands live in vdit/cli/model.py (train, sample, eval), vdit/cli/planning.py (params, flops,
compile), vdit/cli/data.py (prepare, encode), vdit/cli/export.py (export), vdit/cli/interop.py (import) and vdit/cli/sweep.py
(sweep); vdit/cli/base.py parses, helps and reports errors.

Multi-process runs (one process per host, all running the same command; train, sample, eval,
encode): --coordinator_address=HOST:PORT --num_processes=N --process_id=I [--local_device_ids=0,1]
--distributed=auto|on|off. `auto` (the default) initializes `jax.distributed` from these flags, or
with no arguments when the environment is a cluster JAX detects (SLURM, Open MPI, a TPU slice; see
vdit/parallel/distributed.py), and otherwise runs one process.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from absl import app

from vdit.cli import base, data, export, interop, model, planning, sweep

COMMANDS: dict[str, base.Command] = {
    c.name: c
    for c in (
        *model.COMMANDS,
        *planning.COMMANDS,
        *data.COMMANDS,
        *export.COMMANDS,
        *interop.COMMANDS,
        *sweep.COMMANDS,
    )
}
HELP = ("--help", "-h", "-help", "--helpfull", "help")


def run(args: Sequence[str]) -> None:
    """`vdit ARGS...`: parse the command's flags and run it; user errors exit 2 with one line."""
    args = list(args)
    if not args or args[0] in HELP:
        print(base.commands_help(list(COMMANDS.values())), file=sys.stdout if args else sys.stderr)
        sys.exit(0 if args else 2)
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        base.fail(
            name, f"unknown command; usage: vdit {{{'|'.join(COMMANDS)}}} [flags] (vdit --help)"
        )
    command = COMMANDS[name]
    if any(a in HELP for a in rest):
        print(base.command_help(command))
        return
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        fv = base.parse(command, rest)
        if command.distributed:
            base.init_distributed(fv)
        command.run(fv)
    except base.UsageError as e:
        base.fail(name, str(e))
    except (ValueError, OSError) as e:  # OSError: a missing file, an unwritable checkpoint
        if not base.raised_by_vdit(e):
            raise  # a library's error: a bug to report, with its traceback
        base.fail(name, str(e))


def main() -> None:
    """The `vdit` entry point. absl's app sets up logging; the command parses its own flags."""
    app.run(lambda _: run(sys.argv[1:]), argv=sys.argv[:1])

"""`vdit sweep`: plan, run (or write as launches), fit and plot a compute-scaling sweep."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags

from vdit.cli.base import Command, define_config


def _sweep_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    define_config(fv, argv, "Sweep config file: configs/sweep.py[:cpu|smoke|cluster].")
    flags.DEFINE_string(
        "workdir",
        None,
        "Sweep directory: runs/ (one `vdit train` work directory per run), launch.sh, sweep.json, "
        "report.md, the plots and the sample grid.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "dry_run",
        False,
        "Print the plan (runs, parameters, FLOPs per step, steps, tokens, time estimated from "
        "measured steps) and change nothing.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "launch_only",
        False,
        "Write each run's config and DIR/launch.sh (one `vdit train` line per run) instead of "
        "running them here; run the sweep command again once they are done to fit.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "target_flops",
        None,
        "A training budget to predict the compute-optimal N, D and loss for (with intervals).",
        flag_values=fv,
    )
    flags.DEFINE_bool("json", False, "Print the fits as one JSON object.", flag_values=fv)


def _sweep(fv: flags.FlagValues) -> None:
    import logging

    from vdit import sweep
    from vdit.sweep import plan as plan_lib

    logging.getLogger("vdit").setLevel(logging.INFO)
    if fv.target_flops is not None and fv.target_flops <= 0:
        raise ValueError(f"--target_flops={fv.target_flops}: give a positive number of FLOPs")
    plan, out = sweep.sweep(
        fv.config,
        fv.workdir,
        dry_run=fv.dry_run,
        launch_only=fv.launch_only,
        target_flops=fv.target_flops,
    )
    if out is None:
        print(plan_lib.plan_table(plan))
        if fv.launch_only:
            print(f"\nwrote {fv.workdir}/launch.sh and each run's config.py", file=sys.stderr)
        return
    if fv.json:
        print(json.dumps(out["fits"]))
        return
    with open(f"{fv.workdir}/report.md") as f:
        print(f.read())


SWEEP = Command(
    name="sweep",
    summary="an IsoFLOP compute-scaling sweep: plan, run or resume, fit power laws, plot",
    usage="--config=configs/sweep.py[:VARIANT] --workdir=DIR [--dry_run] [--launch_only] "
    "[--target_flops=C]",
    example="vdit sweep --config=configs/sweep.py:smoke --workdir=runs/sweep_smoke --dry_run",
    define=_sweep_flags,
    run=_sweep,
    required=(
        ("config", "a sweep config, e.g. --config=configs/sweep.py"),
        ("workdir", "the sweep directory, e.g. --workdir=runs/sweep"),
    ),
    notes="Every run is an ordinary `vdit train` work directory under DIR/runs/ with its config "
    "saved as config.py; finished runs are skipped and a stopped one resumes, so the same command "
    "continues a stopped sweep.",
)

COMMANDS = (SWEEP,)

"""Running a planned sweep: each run an ordinary `vdit train` work directory, one after another.

    DIR/runs/NAME/config.py    the run's whole training config (`vdit train --config=` takes it)
    DIR/runs/NAME/...          what `vdit train` writes (checkpoints, metrics.jsonl, tensorboard)
    DIR/runs/NAME/sweep_run.json  the run's planned figures and its wall time, once it is finished
    DIR/launch.sh              one `vdit train` command line per run (for a cluster launcher)

A run is finished when its metrics.jsonl holds `eval_loss` at its last step; finished runs are
skipped and an unfinished one resumes from its latest checkpoint (the loop does that by itself), so
running the same command again continues a stopped sweep. A run directory whose config is not the
one the plan gives is refused (a changed sweep config needs a new DIR).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shlex
import time
from collections.abc import Callable
from typing import Any

import ml_collections

from vdit.sweep import plan as plan_lib
from vdit.train.metrics import read_metrics

log = logging.getLogger(__name__)

_CONFIG_FILE = '''"""Run {name} of a compute-scaling sweep, written by `vdit sweep`; train it with

    vdit train --config={path} --workdir={workdir}
"""

import ml_collections

CONFIG = {config!r}


def get_config(arg=None):
    return ml_collections.ConfigDict(CONFIG)
'''


def run_dir(workdir: str, run: plan_lib.Run) -> str:
    return os.path.join(workdir, "runs", run.name)


def _tuples(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return tuple(_tuples(v) for v in x)
    return x


def write_run_config(workdir: str, run: plan_lib.Run, config: ml_collections.ConfigDict) -> str:
    """DIR/runs/NAME/config.py holding `config`; ValueError when one with another config is there."""
    d = run_dir(workdir, run)
    path = os.path.join(d, "config.py")
    want = _tuples(config.to_dict())
    if os.path.isfile(path):
        if _tuples(read_run_config(path)) != want:
            raise ValueError(
                f"{d} holds a run of another config than this sweep's plan gives; continue "
                "it with the sweep config it was started with, or give a new --workdir"
            )
        return path
    os.makedirs(d, exist_ok=True)
    text = _CONFIG_FILE.format(name=run.name, path=path, workdir=d, config=want)
    with open(path, "w") as f:
        f.write(text)
    return path


def read_run_config(path: str) -> dict[str, Any]:
    """The CONFIG literal of a run's config.py (read, not executed)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CONFIG":
            return ast.literal_eval(node.value)
    raise ValueError(f"{path}: no CONFIG = {{...}} in it; it is not a run config of `vdit sweep`")


def final_metrics(workdir: str, run: plan_lib.Run) -> dict[str, Any] | None:
    """The eval figures logged at the run's last step, or None while it is not finished."""
    d = run_dir(workdir, run)
    if not os.path.isfile(os.path.join(d, "metrics.jsonl")):
        return None
    out: dict[str, Any] = {}
    for row in read_metrics(d):
        if row["step"] == run.steps and "eval_loss" in row:
            out = {k: v for k, v in row.items() if k.startswith("eval_loss")}
    return out or None


def launch_lines(workdir: str, runs: list[plan_lib.Run]) -> str:
    """A shell script of one `vdit train` line per run (what a cluster launcher wraps)."""
    lines = [
        "#!/bin/sh",
        "# One ordinary training run per line; each resumes if restarted.",
        "set -e",
    ]
    for r in runs:
        d = run_dir(workdir, r)
        cfg = os.path.join(d, "config.py")
        lines.append(f"vdit train --config={shlex.quote(cfg)} --workdir={shlex.quote(d)}")
    return "\n".join(lines) + "\n"


def write_configs(
    sc: ml_collections.ConfigDict, workdir: str, plan: plan_lib.Plan
) -> list[ml_collections.ConfigDict]:
    """Every run's config file and DIR/launch.sh; returns the configs."""
    configs = []
    for r in plan.runs:
        c = plan_lib.run_config(sc, r.width, r.depth, r.heads, r.steps)
        write_run_config(workdir, r, c)
        configs.append(c)
    path = os.path.join(workdir, "launch.sh")
    with open(path, "w") as f:
        f.write(launch_lines(workdir, list(plan.runs)))
    os.chmod(path, 0o755)
    return configs


def run_all(
    sc: ml_collections.ConfigDict,
    workdir: str,
    plan: plan_lib.Plan,
    train: Callable[[ml_collections.ConfigDict, str], Any] | None = None,
) -> list[dict[str, Any]]:
    """Train every unfinished run of `plan` in turn (`train`: vdit's train_and_evaluate); returns
    each run's record (the plan's figures, its final eval losses, its wall time)."""
    if train is None:
        from vdit.train.loop import train_and_evaluate as train
    configs = write_configs(sc, workdir, plan)
    records = []
    for i, (r, c) in enumerate(zip(plan.runs, configs, strict=True)):
        d = run_dir(workdir, r)
        record_path = os.path.join(d, "sweep_run.json")
        final = final_metrics(workdir, r)
        if final is not None and os.path.isfile(record_path):
            log.info("run %d/%d %s: finished, skipped", i + 1, len(plan.runs), r.name)
            with open(record_path) as f:
                records.append(json.load(f))
            continue
        log.info("run %d/%d %s: %d steps", i + 1, len(plan.runs), r.name, r.steps)
        spent = 0.0
        partial = os.path.join(d, "sweep_time.json")  # wall time of earlier, stopped attempts
        if os.path.isfile(partial):
            with open(partial) as f:
                spent = json.load(f)["seconds"]
        t = time.perf_counter()
        try:
            if final is None:
                train(c, d)
        finally:
            spent += time.perf_counter() - t
            with open(partial, "w") as f:
                json.dump({"seconds": spent}, f)
        final = final_metrics(workdir, r)
        if final is None:
            raise RuntimeError(f"{d}: training ended without eval_loss at step {r.steps}")
        record = {**plan_lib.to_dict(r), **final, "wall_seconds": spent}
        with open(record_path, "w") as f:
            json.dump(record, f, indent=1)
        records.append(record)
    return records

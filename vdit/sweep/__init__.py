"""Compute-scaling (IsoFLOP) sweeps: `vdit sweep --config=configs/sweep.py --workdir=DIR`.

    plan.py    budgets x model sizes -> runs with the steps that spend each budget (vdit/flops.py)
    run.py     each run an ordinary `vdit train` work directory under DIR/runs/, one after another,
               finished ones skipped, a stopped one resumed; or DIR/launch.sh for a cluster
    fit.py     per-budget parabolas in log N, power laws of N_opt, D_opt, L_opt, bootstrap intervals
    report.py  sweep.json, report.md, the PNG plots and the sample grid across budgets

`sweep(sc, workdir)` does all of it; the sweep section `sc` is configs/sweep.py's.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections
import numpy as np

from vdit.sweep import fit, report
from vdit.sweep import plan as plan_lib
from vdit.sweep import run as run_lib

log = logging.getLogger(__name__)


def collect(
    sc: ml_collections.ConfigDict,
    workdir: str,
    records: list[dict[str, Any]],
    plan: plan_lib.Plan,
    target_flops: float | None = None,
    grid: bool = True,
) -> dict[str, Any]:
    """Fit the finished runs' records and write every output to `workdir`; returns sweep.json."""
    lo, hi = min(r["budget"] for r in records), max(r["budget"] for r in records)
    if target_flops:
        lo, hi = min(lo, target_flops), max(hi, target_flops)
    curve = np.logspace(np.log10(lo) - 0.2, np.log10(hi) + 0.2, 40)
    fits = fit.fit(
        records,
        bootstrap=sc.bootstrap,
        seed=sc.bootstrap_seed,
        target_flops=target_flops,
        curve_flops=tuple(curve),
    )
    notes = [
        f"left out: {size} at C={budget:.3g} ({steps} steps: {why})"
        for size, budget, steps, why in plan.left_out
    ]
    out = {"runs": records, "fits": fits, "left_out": [list(x) for x in plan.left_out]}
    paths = report.plots(workdir, records, fits)
    if grid and sc.grid_prompts:
        best = {}
        for r in records:
            if r["budget"] not in best or r["eval_loss"] < best[r["budget"]]["eval_loss"]:
                best[r["budget"]] = r
        rows = [(c, run_lib.run_dir(workdir, _run(best[c]))) for c in sorted(best)]
        paths += report.sample_grid(workdir, rows, list(sc.grid_prompts), tuple(sc.grid_shape))
        out["sample_grid"] = {"rows": [os.path.basename(d) for _, d in rows], "seed": 0}
    total = sum(r["wall_seconds"] for r in records)
    notes.append(f"wall time of the runs: {total / 60:.1f} min")
    out["outputs"] = [os.path.basename(p) for p in paths] + ["report.md"]
    report.write_json(os.path.join(workdir, "sweep.json"), out)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(report.markdown(records, fits, notes))
    return out


def _run(record: dict[str, Any]) -> plan_lib.Run:
    fields = {f for f in plan_lib.Run.__dataclass_fields__}
    return plan_lib.Run(**{k: v for k, v in record.items() if k in fields})


def sweep(
    sc: ml_collections.ConfigDict,
    workdir: str,
    *,
    dry_run: bool = False,
    launch_only: bool = False,
    target_flops: float | None = None,
    train=None,
) -> tuple[plan_lib.Plan, dict[str, Any] | None]:
    """Plan (and unless `dry_run`, run and fit) the sweep `sc` in `workdir`. `launch_only` writes
    the run configs and DIR/launch.sh and stops; run again after the launches to fit."""
    plan = plan_lib.make_plan(sc, measure_steps=sc.time_steps if dry_run else 0)
    if not plan.runs:
        raise ValueError(
            "budgets x sizes: every pair is left out (steps outside [min_steps, max_steps]); "
            + "; ".join(f"{s} at C={b:.3g}: {n} steps" for s, b, n, _ in plan.left_out)
        )
    if dry_run:
        return plan, None
    os.makedirs(workdir, exist_ok=True)
    if launch_only:
        run_lib.write_configs(sc, workdir, plan)
        return plan, None
    records = run_lib.run_all(sc, workdir, plan, train=train)
    return plan, collect(sc, workdir, records, plan, target_flops)

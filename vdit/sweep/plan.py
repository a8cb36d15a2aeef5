"""The plan of an IsoFLOP sweep: compute budgets x model sizes -> runs with the steps that spend each
budget, counted with vdit/flops.py on the run's own data mix (attention included).

    sizes   (width, depth, heads) of the family, all on the base training config's data and batch
    budget  C FLOPs of training (forward + backward model FLOPs, no recompute, no padding)
    steps   round(C / FLOPs per step), the FLOPs per step averaged over the first
            `flops_batches` packed batches of the run's pipeline (the batches it will train on)

A pair whose steps fall outside [min_steps, max_steps] is left out of the plan and listed (too few
steps for the schedule's warmup and decay to mean anything, or more than the sweep affords).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from vdit import configlib, flops
from vdit.data import pipeline
from vdit.models.dit import VideoDiT


@dataclasses.dataclass(frozen=True)
class Run:
    """One planned run of the sweep."""

    name: str  # its work directory under DIR/runs/
    budget: float  # C, the FLOPs it spends
    width: int
    depth: int
    heads: int
    params: int  # N, every parameter of the DiT (text encoder included)
    flops_per_step: float  # model FLOPs of one train step on the run's data (vdit/flops.py)
    tokens_per_step: float  # video tokens of one step (its batch's non-padding tokens)
    steps: int
    est_seconds: float | None  # from a measured step of its size (None: not measured)

    @property
    def tokens(self) -> float:
        """D: the video tokens the run trains on."""
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        """What the run spends (within half a step of `budget`)."""
        return self.steps * self.flops_per_step


@dataclasses.dataclass(frozen=True)
class Plan:
    runs: tuple[Run, ...]
    left_out: tuple[tuple[str, float, int, str], ...]  # (size name, budget, steps, why)
    flops_layout: str  # where the FLOPs per step were counted


def size_name(width: int, depth: int) -> str:
    return f"w{width}d{depth}"


def run_name(budget: float, width: int, depth: int) -> str:
    return f"C{budget:.2e}_{size_name(width, depth)}".replace("+", "")


def check(sc: ml_collections.ConfigDict) -> None:
    """The sweep section's own checks; ValueError naming the field."""
    if not sc.sizes:
        raise ValueError("sizes: give at least one (width, depth, heads)")
    for s in sc.sizes:
        if len(s) != 3 or min(s) < 1 or s[0] % s[2]:
            raise ValueError(f"sizes: {tuple(s)} is not (width, depth, heads) with heads | width")
    if not sc.budgets or min(sc.budgets) <= 0:
        raise ValueError(f"budgets: {tuple(sc.budgets)} must be positive FLOPs")
    if not 1 <= sc.min_steps <= sc.max_steps:
        raise ValueError(
            f"min_steps={sc.min_steps}, max_steps={sc.max_steps}: need 1 <= min <= max"
        )
    if not 0 <= sc.warmup_fraction < 1:
        raise ValueError(f"warmup_fraction={sc.warmup_fraction} is not in [0, 1)")
    if sc.flops_batches < 1:
        raise ValueError(f"flops_batches={sc.flops_batches} must be >= 1")
    if sc.base.data.get("eval_samples", 0) <= 0:
        raise ValueError("base.data.eval_samples: a sweep fits eval_loss; hold out samples (> 0)")


def run_config(
    sc: ml_collections.ConfigDict, width: int, depth: int, heads: int, steps: int
) -> ml_collections.ConfigDict:
    """The training config of one run: the base with the run's size, steps and warmup."""
    c = ml_collections.ConfigDict(sc.base.to_dict())
    c.model.width, c.model.depth, c.model.heads = int(width), int(depth), int(heads)
    c.train.steps = int(steps)
    c.optim.warmup_steps = max(1, round(sc.warmup_fraction * steps))
    c.train.checkpoint_every = min(c.train.checkpoint_every, steps)
    return c


def count_params(c: ml_collections.ConfigDict) -> int:
    """N of a loaded config, from abstract shapes (no arrays are made)."""
    model = nnx.eval_shape(lambda: VideoDiT(configlib.model_config(c), rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def data_layouts(c: ml_collections.ConfigDict, batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(segment_ids, text_segment_ids) of the first `batches` packed batches of the loaded config's
    pipeline: the batches a run of it trains on first (the data does not depend on the model)."""
    it = iter(pipeline.build(configlib.pipeline_config(c)))
    return [(b["segment_ids"], b["text_segment_ids"]) for b in (next(it) for _ in range(batches))]


def step_seconds(c: ml_collections.ConfigDict, steps: int) -> tuple[float, float]:
    """(median seconds of a train step after the first, seconds of the first: compile included) of
    the loaded config `c` on this process's devices; the state and batches are thrown away."""
    from vdit.train.dit_task import DiTTask

    task = DiTTask(c, jax.devices())
    state = task.state.init()
    times = []
    for step in range(steps + 1):
        batch, _ = task.batch(step)
        t = time.perf_counter()
        state, metrics = task.step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:])) if steps else math.nan, times[0]


def make_plan(sc: ml_collections.ConfigDict, measure_steps: int | None = None) -> Plan:
    """Every (budget, size) run of the sweep section `sc`, and those left out. `measure_steps`
    (default sc.time_steps) train steps of each size are timed for the estimated times (0: none)."""
    check(sc)
    measure_steps = sc.time_steps if measure_steps is None else measure_steps
    base = configlib.load(sc.base, jax.device_count())
    layouts = data_layouts(base, sc.flops_batches)
    tokens = float(np.mean([(seg > 0).sum() for seg, _ in layouts]))
    runs, left_out = [], []
    for width, depth, heads in sc.sizes:
        c = configlib.load(run_config(sc, width, depth, heads, 1), jax.device_count())
        cfg = configlib.model_config(c)
        per_step = float(np.mean([flops.step_flops(cfg, s, t)["total_useful"] for s, t in layouts]))
        n = count_params(c)
        timed = None
        for budget in sc.budgets:
            steps = round(budget / per_step)
            if not sc.min_steps <= steps <= sc.max_steps:
                why = "too few steps" if steps < sc.min_steps else "too many steps"
                left_out.append((size_name(width, depth), float(budget), steps, why))
                continue
            if timed is None and measure_steps:
                timed = step_seconds(c, measure_steps)
            est = None if timed is None else timed[1] + steps * timed[0]
            runs.append(
                Run(
                    name=run_name(budget, width, depth),
                    budget=float(budget),
                    width=int(width),
                    depth=int(depth),
                    heads=int(heads),
                    params=n,
                    flops_per_step=per_step,
                    tokens_per_step=tokens,
                    steps=steps,
                    est_seconds=est,
                )
            )
    runs.sort(key=lambda r: (r.budget, r.params))
    layout = f"mean of the first {sc.flops_batches} packed batches of the base config's pipeline"
    return Plan(tuple(runs), tuple(left_out), layout)


def plan_table(plan: Plan) -> str:
    """The plan as a markdown table, and the pairs left out."""
    lines = [
        "| run | width | depth | params N | FLOPs/step | steps | tokens D | C spent | est. time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in plan.runs:
        est = "-" if r.est_seconds is None else f"{r.est_seconds:.0f} s"
        lines.append(
            f"| {r.name} | {r.width} | {r.depth} | {r.params:,} | {r.flops_per_step:.3g} | "
            f"{r.steps} | {r.tokens:.3g} | {r.flops:.3g} | {est} |"
        )
    total = [r.est_seconds for r in plan.runs if r.est_seconds is not None]
    if total:
        lines.append(f"\n{len(plan.runs)} runs, estimated {sum(total) / 60:.1f} min in all")
    lines.append(f"FLOPs per step: {plan.flops_layout}")
    for size, budget, steps, why in plan.left_out:
        lines.append(f"left out: {size} at C={budget:.3g} ({steps} steps: {why})")
    return "\n".join(lines)


def to_dict(run: Run) -> dict[str, Any]:
    return {**dataclasses.asdict(run), "tokens": run.tokens, "flops": run.flops}

"""Benchmark: train-step throughput on one device, against the matmul rate XLA reaches at the model's shapes.

For each config (default: ``configs/default.py`` as is, and ``configs/default.py:B/2`` on 1024-token rows
of 256-400-token clips, 2 rows per step), on ONE device:

* builds the real pipeline batches and the real jitted train step (as ``vdit/train/loop.py`` does),
  compiles it, runs ``--warmup`` + ``--steps`` steps and reports the median step time, useful
  (non-padding) video tokens/s, packing fill and the analytic FLOPs of ``vdit.flops.step_flops``:
  model FLOPs (useful tokens and attention pairs, no recompute) and executed FLOPs (padding, masked
  attention blocks, kernel recompute) per step and per second;
* times jitted float32 ``x @ w`` forward at the model's dense shapes (``M = B*L`` rows:
  ``(M, D) x (D, D)``, ``(M, D) x (D, F)``, ``(M, F) x (F, D)``, ``(M, D) x (D, 6D)``), median of
  ``--matmul-reps``, and combines them weighted by the FLOPs the model spends in each shape
  (``sum(flops) / sum(flops / rate)``). "Fraction of matmul rate" = model FLOPs/s / that rate: how
  close the whole step runs to what this CPU does on the model's own matmuls alone.

Prints markdown tables and writes JSON (``--out``).

Usage: python bench/throughput.py [--configs configs/default.py:S/2 ...] [--set data.batch_rows=2 ...]
       [--steps 3] [--warmup 1] [--out bench/results/throughput.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import ast  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
try:
    import vdit  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT))

from vdit import configlib, flops  # noqa: E402
from vdit.data import pipeline  # noqa: E402
from vdit.train.dit_task import DiTTask  # noqa: E402

# (config spec, overrides) measured by default.
DEFAULT_RUNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("configs/default.py", ()),
    (
        "configs/default.py:B/2",
        (
            "data.row_len=1024",
            "data.max_tokens_per_sample=1024",
            "data.batch_rows=2",
            "data.synthetic.frame_choices=(4,)",
            "data.synthetic.image_fraction=0.0",
            # 4 frames at 2x2 patches: 256, 384, 384, 400 tokens per clip
            "data.synthetic.size_choices=((16, 16), (16, 24), (24, 16), (20, 20))",
        ),
    ),
)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path/to/config.py[:ARG]`` -> ``get_config(ARG)`` of that file."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.exists() and (ROOT / path).exists():
        file = ROOT / path
    module_spec = importlib.util.spec_from_file_location("vdit_bench_config", file)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def apply_overrides(c: ml_collections.ConfigDict, overrides: list[str] | tuple[str, ...]) -> None:
    """``a.b.c=VALUE`` (a Python literal, else a string) for each override, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, leaf = key.split(".")
        node = c
        for name in parents:
            node = node[name]
        if isinstance(node[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        node[leaf] = value


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------
def time_matmul(m: int, k: int, n: int, reps: int, seed: int = 0) -> dict[str, float]:
    """Median wall time and GFLOP/s of a jitted float32 ``(m, k) @ (k, n)``."""
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32)
    w = jax.random.normal(kw, (k, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b).lower(x, w).compile()
    jax.block_until_ready(f(x, w))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, w))
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"time_s": t, "gflops": 2.0 * m * k * n / t / 1e9}


def matmul_rates(cfg, rows: int, reps: int) -> dict[str, Any]:
    """Rates at the model's dense shapes and their FLOP-weighted combination."""
    d, f = cfg.width, int(cfg.width * cfg.mlp_ratio)
    # (name, (k, n), forward FLOPs per token spent in this shape)
    shapes = [
        ("D x D", (d, d), 2.0 * d * d * (1 + 6 * cfg.depth)),  # time_fc2; q, k, v, o; cross q, o
        ("D x F", (d, f), 2.0 * d * f * cfg.depth),
        ("F x D", (f, d), 2.0 * f * d * cfg.depth),
        ("D x 6D", (d, 6 * d), 2.0 * d * 6 * d),  # time_proj
    ]
    per_shape = []
    for name, (k, n), weight in shapes:
        r = time_matmul(rows, k, n, reps)
        per_shape.append(
            {"shape": f"({rows}, {k}) x ({k}, {n})", "name": name, "weight": weight, **r}
        )
    total = sum(s["weight"] for s in per_shape)
    weighted = total / sum(s["weight"] / s["gflops"] for s in per_shape)
    return {"shapes": per_shape, "weighted_gflops": weighted}


def run_config(spec: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    c = load_config(spec)
    apply_overrides(c, overrides)
    c = configlib.load(c, 1)
    devices = jax.devices()[:1]
    trainer = DiTTask(c, devices, data=False)
    cfg = trainer.model_cfg
    n_params = trainer.state.num_params()
    log(f"{spec} {' '.join(overrides)}: {n_params / 1e6:.1f}M params, building batches")

    data = iter(pipeline.build(configlib.pipeline_config(c)))
    t0 = time.perf_counter()
    batches = [next(data) for _ in range(args.warmup + args.steps)]
    host_s = (time.perf_counter() - t0) / len(batches)

    state = trainer.state.init()
    shardings = trainer.batch_shardings({k: np.ndim(batches[0][k]) for k in pipeline.DEVICE_KEYS})
    t0 = time.perf_counter()
    step = (
        trainer.jit_train_step(shardings)
        .lower(state, pipeline.to_global(batches[0], shardings))
        .compile()
    )
    compile_s = time.perf_counter() - t0
    log(f"  compiled in {compile_s:.1f}s; running {args.warmup} + {args.steps} steps")

    times, per_step, loss = [], [], float("nan")
    for i, b in enumerate(batches):
        gb = pipeline.to_global(b, shardings)
        t0 = time.perf_counter()
        state, metrics = step(state, gb)
        jax.block_until_ready((state, metrics))
        dt = time.perf_counter() - t0
        loss = float(metrics["loss"])
        if i < args.warmup:
            continue
        times.append(dt)
        f = flops.step_flops(cfg, b["segment_ids"], b["text_segment_ids"])
        tokens = int((b["segment_ids"] > 0).sum())
        per_step.append(
            {
                "time_s": dt,
                "tokens": tokens,
                "fill": tokens / b["segment_ids"].size,
                "samples": int((b["grid"][..., 0] > 0).sum()),
                **f,
            }
        )
        log(f"  step {i - args.warmup + 1}/{args.steps}: {dt:.2f}s")
    del state

    step_s = statistics.median(times)
    mean = lambda key: float(np.mean([s[key] for s in per_step]))
    rows, length = batches[0]["segment_ids"].shape
    log(f"  timing matmuls at M = {rows * length}")
    mm = matmul_rates(cfg, rows * length, args.matmul_reps)
    model_fps = mean("total_useful") / step_s
    executed_fps = mean("total_executed") / step_s
    return {
        "config": spec,
        "overrides": list(overrides),
        "variant": c.model.variant,
        "width": cfg.width,
        "depth": cfg.depth,
        "heads": cfg.heads,
        "attn_impl": cfg.attn_impl,
        "attn_block": cfg.attn_block,
        "remat": cfg.remat,
        "params": n_params,
        "rows": rows,
        "row_len": length,
        "text_len": int(batches[0]["text_segment_ids"].shape[1]),
        "host_s_per_batch": host_s,
        "compile_s": compile_s,
        "step_s": step_s,
        "step_times_s": times,
        "final_loss": loss,
        "samples_per_step": mean("samples"),
        "tokens_per_step": mean("tokens"),
        "tokens_per_s": mean("tokens") / step_s,
        "packing_fill": mean("fill"),
        "flops_per_step": {
            k: mean(k)
            for k in (
                "matmul",
                "matmul_useful",
                "attention_useful",
                "attention_executed",
                "recompute",
                "total_useful",
                "total_executed",
            )
        },
        "model_flops_per_s": model_fps,
        "executed_flops_per_s": executed_fps,
        "matmul": mm,
        "model_fraction_of_matmul_rate": model_fps / (mm["weighted_gflops"] * 1e9),
        "executed_fraction_of_matmul_rate": executed_fps / (mm["weighted_gflops"] * 1e9),
        "steps": per_step,
    }


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def print_tables(results: list[dict[str, Any]]) -> None:
    header = (
        "| config | D x depth | B x L | fill | step s | useful tok/s | model GFLOP/step "
        "| executed GFLOP/step | model GFLOP/s | matmul GFLOP/s | model / matmul | executed / matmul |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        f = r["flops_per_step"]
        print(
            f"| {r['variant']} | {r['width']} x {r['depth']} | {r['rows']} x {r['row_len']} "
            f"| {r['packing_fill']:.3f} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} "
            f"| {f['total_useful'] / 1e9:,.1f} | {f['total_executed'] / 1e9:,.1f} "
            f"| {r['model_flops_per_s'] / 1e9:,.1f} | {r['matmul']['weighted_gflops']:,.1f} "
            f"| {r['model_fraction_of_matmul_rate']:.2f} | {r['executed_fraction_of_matmul_rate']:.2f} |"
        )
    print("\nMatmul rate at the model's shapes (float32 forward, jitted `x @ w`):\n")
    print("| config | shape | share of model matmul FLOPs | GFLOP/s |")
    print("|---|---|---|---|")
    for r in results:
        total = sum(s["weight"] for s in r["matmul"]["shapes"])
        for s in r["matmul"]["shapes"]:
            print(
                f"| {r['variant']} | {s['name']}: {s['shape']} | {s['weight'] / total:.2f} "
                f"| {s['gflops']:,.1f} |"
            )
        print(f"| {r['variant']} | FLOP-weighted | 1.00 | {r['matmul']['weighted_gflops']:,.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help="config specs path[:ARG]; default: the default config and a B/2 run",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied to every config (repeatable)",
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    p.add_argument("--matmul-reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench/results/throughput.json"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")

    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    runs = DEFAULT_RUNS if args.configs is None else tuple((s, ()) for s in args.configs)
    results = [run_config(spec, [*extra, *args.overrides], args) for spec, extra in runs]

    print(
        f"\nbackend={jax.default_backend()}, 1 device ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs, median of {args.steps} steps after {args.warmup} warmup; "
        "model FLOPs = useful tokens and attention pairs (fwd + bwd, no recompute)\n"
    )
    print_tables(results)
    meta = {
        "steps": args.steps,
        "warmup": args.warmup,
        "matmul_reps": args.matmul_reps,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": load_before,  # 1/5/15-minute load: other work on the machine
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

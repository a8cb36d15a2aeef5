"""Where vdit's train step spends its time: forward, forward + backward, and the whole step
(backward, clip, AdamW, EMA), for config variants of the B/2-like model of bench/peer_dit.py.

    python bench/step_parts.py                                   # default, unrolled, dense xla
    python bench/step_parts.py --variant "" --variant "model.remat=full" --latent 5 16 16

Each `--variant` is a comma-separated list of config overrides KEY=VALUE ("" = as peer_dit runs
it: chunked attention at block 128, scanned blocks, no remat). All variants are compiled first,
then timed in turns (the order reversed every other round); the table gives medians. "grad/fwd"
is the forward + backward time over the forward time: about 3 where the backward runs at the
forward's FLOP rate (it has twice its FLOPs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import b2_batch, b2_task  # noqa: E402

from vdit.data import pipeline  # noqa: E402

PARTS = ("fwd", "grad", "step")


def build(variant: str, args) -> dict:
    """The three compiled calls of one variant, each a no-argument function that blocks."""
    task = b2_task(args.dtype, [o for o in variant.split(",") if o])
    b = b2_batch(tuple(args.latent), args.text, np.random.default_rng(0))
    shardings = task.batch_shardings({k: b[k].ndim for k in pipeline.DEVICE_KEYS})
    gb = pipeline.to_global(b, shardings)
    state = task.state.init()
    params = state["params"]
    t_tok = jnp.full(b["segment_ids"].shape, 0.5, jnp.float32)
    fwd = jax.jit(lambda p, x: task.denoise(p, x, x["patches"], t_tok)).lower(params, gb).compile()
    grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
    grad = jax.jit(lambda p, x: grad_fn(p, x, jnp.int32(0))).lower(params, gb).compile()
    step = task.jit_train_step(shardings).lower(state, gb).compile()
    holder = {"state": jax.tree.map(jnp.copy, state)}  # the step donates its state

    def run_step():
        holder["state"], m = step(holder["state"], gb)
        jax.block_until_ready(m["loss"])

    return {
        "fwd": lambda: jax.block_until_ready(fwd(params, gb)),
        "grad": lambda: jax.block_until_ready(grad(params, gb)),
        "step": run_step,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--latent", type=int, nargs=3, default=(5, 32, 32), metavar=("T", "H", "W"))
    ap.add_argument("--text", type=int, default=64, help="caption tokens")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant", action="append", default=None, help="overrides K=V,K=V")
    args = ap.parse_args(argv)
    variants = args.variant or ["", "model.scan_layers=0", "model.attn_impl=xla"]
    calls = {}
    for v in variants:
        calls[v] = build(v, args)
        for fn in calls[v].values():  # warm-up
            fn()
        print(f"# compiled {v or 'default'}", file=sys.stderr, flush=True)
    times = {(v, k): [] for v in variants for k in PARTS}
    for r in range(args.reps):
        for v in variants if r % 2 == 0 else variants[::-1]:
            for k in PARTS:
                t0 = time.perf_counter()
                calls[v][k]()
                times[(v, k)].append(time.perf_counter() - t0)
        print(f"# round {r + 1}/{args.reps}", file=sys.stderr, flush=True)
    t, h, w = args.latent
    print(f"B/2-like DiT, {args.dtype}, latent {t}x{h}x{w} = {t * h * w // 4} tokens, medians")
    print("| variant | fwd s | fwd+bwd s | step s | grad/fwd | step/fwd |")
    print("|---|---:|---:|---:|---:|---:|")
    for v in variants:
        m = {k: statistics.median(times[(v, k)]) for k in PARTS}
        print(
            f"| {v or 'default'} | {m['fwd']:.2f} | {m['grad']:.2f} | {m['step']:.2f} "
            f"| {m['grad'] / m['fwd']:.2f} | {m['step'] / m['fwd']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

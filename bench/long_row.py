"""Benchmark: one train step (forward + backward + update) of a DiT on a single very long packed row.

Shows that a row of `--row-len` tokens (default 65,536) trains on one CPU device with the chunked
attention kernel and rematerialisation: prints the compiled memory (arguments, temporaries), the
process's peak resident memory, and the step time, for each `--remat` policy asked for.

The row holds clips of `--clip-min`..`--clip-max` tokens (`--layout clips`, many short samples) or
one sample (`--layout single`, one long video: attention is then quadratic in the row length).

Usage: python bench/long_row.py [--row-len 65536] [--remat full none] [--out bench/results/long_row.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

try:
    from vdit.data import pipeline
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vdit.data import pipeline
from common import dit_task  # noqa: E402

from vdit.flops import executed_attention_flops_chunked, useful_attention_flops

TEXT = 16


def row_layout(length: int, layout: str, lo: int, hi: int, seed: int) -> list[int]:
    if layout == "single":
        return [length]
    rng = np.random.default_rng(seed)
    out, used = [], 0
    while used < length:
        n = min(int(rng.integers(lo, hi + 1)), length - used)
        out.append(n)
        used += n
    return out


def batch_for(lengths: list[int], length: int, channels: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = len(lengths)
    seg = np.repeat(np.arange(1, s + 1, dtype=np.int32), lengths)[None]
    positions = np.zeros((1, length, 3), np.int32)
    start = 0
    for n in lengths:  # each clip a (t, 16, 16)-token video, in raster order
        idx = np.arange(n)
        positions[0, start : start + n] = np.stack([idx // 256, idx // 16 % 16, idx % 16], -1)
        start += n
    tseg = np.repeat(np.arange(1, s + 1, dtype=np.int32), TEXT)[None]
    return {
        "patches": rng.standard_normal((1, length, channels * 4)).astype(np.float32),
        "segment_ids": seg,
        "positions": positions,
        "text": rng.integers(2, 200, tseg.shape).astype(np.int32),
        "text_segment_ids": tseg,
        "text_positions": np.tile(np.arange(TEXT, dtype=np.int32), (1, s)),
        "cond_mask": np.zeros((1, length), bool),
        "loss_mask": np.ones((1, length), bool),
        "grid": np.array([[[max(1, n // 256), 16, 16] for n in lengths]], np.int32),
    }


def run(args: argparse.Namespace, remat: str) -> dict:
    trainer = dit_task(
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        patch=2,
        channels=4,
        text_len=TEXT,
        attn_block=args.attn_block,
        remat=remat,
    )
    cfg = trainer.model_cfg
    lengths = row_layout(args.row_len, args.layout, args.clip_min, args.clip_max, args.seed)
    batch = batch_for(lengths, args.row_len, cfg.channels, args.seed)
    shardings = trainer.batch_shardings({k: batch[k].ndim for k in pipeline.DEVICE_KEYS})
    gb = pipeline.to_global(batch, shardings)
    state = trainer.state.init()
    t0 = time.perf_counter()
    step = trainer.jit_train_step(shardings).lower(state, gb).compile()
    compile_s = time.perf_counter() - t0
    mem = step.memory_analysis()
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, gb)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t0)
    heads, dim = cfg.heads, cfg.width // cfg.heads
    seg = batch["segment_ids"]
    return {
        "remat": remat,
        "row_len": args.row_len,
        "layout": args.layout,
        "segments": len(lengths),
        "compile_s": compile_s,
        "step_s": float(np.median(times)),
        "losses": losses,
        "finite": bool(np.isfinite(losses).all()),
        "argument_gib": mem.argument_size_in_bytes / 2**30,
        "temp_gib": mem.temp_size_in_bytes / 2**30,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "attention_executed_over_useful": executed_attention_flops_chunked(
            seg, seg, heads, dim, block_q=args.attn_block, block_kv=args.attn_block
        )
        / useful_attention_flops(seg, seg, heads, dim),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row-len", type=int, default=65536)
    p.add_argument("--layout", choices=["clips", "single"], default="clips")
    p.add_argument("--clip-min", type=int, default=256)
    p.add_argument("--clip-max", type=int, default=4096)
    p.add_argument("--remat", nargs="+", default=["full"])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--attn-block", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/long_row.json"))
    args = p.parse_args(argv)
    results = []
    for remat in args.remat:  # peak RSS is for the process so far: run the lighter policy first
        results.append(run(args, remat))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(
        "\n| row tokens | layout | samples | remat | compile s | step s | loss finite | "
        "args GiB | temp GiB | peak RSS GiB | attn executed/useful |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['row_len']:,} | {r['layout']} | {r['segments']} | {r['remat']} | "
            f"{r['compile_s']:.1f} | {r['step_s']:.1f} | {r['finite']} | {r['argument_gib']:.2f} | "
            f"{r['temp_gib']:.2f} | {r['peak_rss_gib']:.2f} | "
            f"{r['attention_executed_over_useful']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: vdit packing vs pad-to-max vs Open-Sora-style bucketing on one mixed video distribution.

The same samples (durations 1..129 frames, 144p..1080p, aspect ratios 9:16..21:9, about a third
images) go through three strategies with the same token budget per step (`--rows` x `--row-len`):

- **pack**: vdit's size policy (resize down to `--max-tokens`, never crop) and vdit's grain best-fit
  packer into rows of `--row-len` tokens (the real `vdit.data.packing.pack`).
- **pad**: the same size policy, each sample alone in a row padded to `--max-tokens` (MaxDiffusion).
- **bucket**: Open-Sora style. Each sample goes to the longest frame bucket it has enough frames for
  and the highest resolution it is at least as large as, among the buckets whose tokens fit
  `--max-tokens`; it is center-cropped to the nearest of 9 aspect ratios and cut to the bucket's
  frames; a bucket batch holds floor(budget / bucket tokens) samples; samples no bucket takes are
  dropped; an epoch's incomplete batches wait for a later epoch (counted, not lost).

Latent space: a causal VAE of (4, 8, 8) compression and 16 channels, 1x2x2 patches (one token per
4 frames of 16x16 pixels). "Pixels kept" is the share of each source's space-time extent that reaches
the model (cropping, trimming frames and dropping count as lost; resizing does not).

Useful tokens per second come from the real jitted vdit train step (`DiTTask.jit_train_step`) of a
small DiT on one device: every distinct batch shape a strategy produces is compiled and timed
(median of `--reps`), and an epoch's time is the sum over its steps. For bucketing the table also
gives the figure with 8 data-parallel ranks, where each rank draws its own bucket and the slowest
one sets every step's time.

"FLOP-bound vs pad" is what a step bound by FLOPs alone would give: executed FLOPs per useful
token (`vdit.flops.step_flops`) of pad over pack. Each sample attends only to itself in either
strategy, so attention costs the same per useful token and packing saves the padding's share of
the dense layers only: where attention dominates (long samples, a narrow model) the ceiling is
near 1 whatever the kernel; `--width` sets where the dense layers dominate.

A second table prints the attention cost of the packed rows: executed vs useful attention FLOPs
of the chunked kernel (block skipping) against dense attention.

Usage: python bench/packing.py [--samples 2000] [--width 128] [--flops-only]
       [--out bench/results/packing.json]
Wider layers: --heads, --mlp-dim and --remat full (a 16,384-token step of width 1536 fits 24 GiB);
--pad-attn-block times the padded rows at their own attention block in the same run (the
parameters are shared, only the compiled step differs). BUILD.md ("Packing") has the measured runs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

try:
    from vdit.data import packing, pipeline, size
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vdit.data import packing, pipeline, size
from common import dit_task  # noqa: E402

from vdit import flops
from vdit.flops import executed_attention_flops_chunked, useful_attention_flops
from vdit.train.dit_task import DiTTask

COMPRESSION = (4, 8, 8)
CHANNELS = 16
PATCH = (1, 2, 2)
SHORT_SIDES = (144, 240, 360, 480, 720, 1080)
# Open-Sora's aspect-ratio buckets (height / width), 9:16 portrait to 21:9 wide.
BUCKET_ARS = (16 / 9, 4 / 3, 1.0, 3 / 4, 2 / 3, 9 / 16, 1 / 2, 9 / 21, 2 / 5)
BUCKET_RES = {
    "144p": 144 * 256,
    "240p": 240 * 426,
    "360p": 360 * 640,
    "480p": 480 * 854,
    "720p": 720 * 1280,
    "1080p": 1080 * 1920,
}
BUCKET_FRAMES = (1, 17, 33, 65, 129)
TEXT_TOKENS = 16  # caption tokens per sample (kept small: text is not what is compared)


@dataclasses.dataclass(frozen=True)
class Source:
    frames: int
    height: int
    width: int


def distribution(n: int, seed: int, image_fraction: float) -> list[Source]:
    """Durations 1..129 frames, short side 144p..1080p, aspect (w/h) log-uniform in [9/16, 21/9]."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        frames = 1 if rng.random() < image_fraction else int(rng.integers(2, 130))
        short = int(rng.choice(SHORT_SIDES))
        ar = math.exp(rng.uniform(math.log(9 / 16), math.log(21 / 9)))  # width / height
        h, w = (short, round(short * ar)) if ar >= 1 else (round(short / ar), short)
        out.append(Source(frames, h, w))
    return out


def latent_tokens(frames: int, height: int, width: int) -> int:
    lt = 1 + (frames - 1) // COMPRESSION[0]
    return lt * (height // (COMPRESSION[1] * PATCH[1])) * (width // (COMPRESSION[2] * PATCH[2]))


# --------------------------------------------------------------------------------------------------
# Strategies: which samples, how many tokens each, how much of each source is kept
# --------------------------------------------------------------------------------------------------
def vdit_sizes(samples: list[Source], max_tokens: int) -> tuple[list[int], list[float]]:
    policy = size.SizePolicy(
        patch=PATCH,
        compression=COMPRESSION,
        max_tokens_per_sample=max_tokens,
        time_fit="resample",
        frame_stride=1,
        max_fps=0.0,
    )
    tokens, kept = [], []
    for s in samples:
        plan = policy.plan(s.frames, s.height, s.width)
        lt = policy.latent_frames(plan.frames)
        tokens.append(lt * (plan.height // 16) * (plan.width // 16))
        kept.append((plan.frame_indices(s.frames)[-1] + 1) / s.frames)  # time extent kept
    return tokens, kept


def pack_rows(tokens: list[int], row_len: int, max_samples: int, bins: int, num_rows: int):
    """Rows from vdit's real packer over the (repeated) samples: a list of per-row token counts."""
    elements = [
        {
            "patches": np.zeros((n, 1), np.float32),
            "positions": np.zeros((n, 3), np.int32),
            "cond_mask": np.zeros((n,), bool),
            "text": np.ones((TEXT_TOKENS,), np.int32),
            "grid": np.array([[n, 1, 1]], np.int32),
        }
        for n in tokens
    ]
    ds = grain.MapDataset.source(elements).repeat(None).to_iter_dataset()
    cfg = packing.PackingConfig(
        row_len=row_len,
        text_len=max_samples * TEXT_TOKENS,
        max_samples_per_row=max_samples,
        packing_bins=bins,
        seed=0,
    )
    it = iter(packing.pack(ds, cfg))
    rows = []
    for _ in range(num_rows):
        seg = next(it)["segment_ids"]
        rows.append([int((seg == s).sum()) for s in range(1, seg.max() + 1)])
    return rows


def nearest_ar(h: int, w: int) -> float:
    return min(BUCKET_ARS, key=lambda a: abs(math.log(a) - math.log(h / w)))


def bucket_shape(res: str, ar: float) -> tuple[int, int]:
    """Pixel (h, w) of a resolution bucket at an aspect ratio, on the 16-pixel token grid."""
    area = BUCKET_RES[res]
    h = math.sqrt(area * ar)
    return max(16, round(h / 16) * 16), max(16, round(area / h / 16) * 16)


def assign_bucket(s: Source, max_tokens: int):
    """(bucket key, tokens, pixels kept) or None when no bucket takes the sample."""
    ar = nearest_ar(s.height, s.width)
    for t in sorted(BUCKET_FRAMES, reverse=True):
        if s.frames < t:
            continue
        for res in sorted(BUCKET_RES, key=BUCKET_RES.get, reverse=True):
            if s.height * s.width < BUCKET_RES[res]:
                continue
            h, w = bucket_shape(res, ar)
            n = latent_tokens(t, h, w)
            if n > max_tokens:
                continue
            # Center crop to the bucket's aspect ratio, then the first t frames.
            crop = min(s.height, s.width * ar) * min(s.width, s.height / ar) / (s.height * s.width)
            return (res, t, round(ar, 4)), n, crop * t / s.frames
    return None


# --------------------------------------------------------------------------------------------------
# The real train step
# --------------------------------------------------------------------------------------------------
def make_trainer(args: argparse.Namespace, attn_block: int) -> DiTTask:
    return dit_task(
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        patch=PATCH[1],
        channels=CHANNELS,
        text_len=TEXT_TOKENS,
        attn_block=attn_block,
        steps=10_000,
        mlp_dim=args.mlp_dim,
        remat=args.remat,
    )


def contract_batch(rows: list[list[int]], row_len: int, max_samples: int, rng) -> dict:
    """Packed-batch contract arrays for rows of the given segment lengths."""
    b = len(rows)
    seg = np.zeros((b, row_len), np.int32)
    tseg = np.zeros((b, max_samples * TEXT_TOKENS), np.int32)
    grid = np.zeros((b, max_samples, 3), np.int32)
    for r, lengths in enumerate(rows):
        pos = 0
        for s, n in enumerate(lengths, start=1):
            seg[r, pos : pos + n] = s
            tseg[r, (s - 1) * TEXT_TOKENS : s * TEXT_TOKENS] = s
            grid[r, s - 1] = (n, 1, 1)
            pos += n
    p = PATCH[0] * PATCH[1] * PATCH[2] * CHANNELS
    positions = np.zeros((b, row_len, 3), np.int32)
    positions[..., 2] = np.arange(row_len)
    return {
        "patches": rng.standard_normal((b, row_len, p)).astype(np.float32) * (seg > 0)[..., None],
        "segment_ids": seg,
        "positions": positions,
        "text": np.where(tseg > 0, rng.integers(2, 200, tseg.shape), 0).astype(np.int32),
        "text_segment_ids": tseg,
        "text_positions": np.tile(np.arange(TEXT_TOKENS, dtype=np.int32), (b, max_samples)),
        "cond_mask": np.zeros((b, row_len), bool),
        "loss_mask": seg > 0,
        "grid": grid,
    }


class StepTimer:
    """The real train step, compiled once per batch shape; jobs are timed in interleaved rounds so a
    change of machine load during the run hits every strategy alike (median per job)."""

    def __init__(self, trainer: DiTTask):
        self.trainer = trainer
        self.state = trainer.state.init()
        self.compiled: dict[tuple[int, int, int], Any] = {}
        self.compile_s: list[float] = []
        self.jobs: list[tuple[Any, Any]] = []

    def add(
        self, rows: list[list[int]], row_len: int, max_samples: int, trainer: DiTTask | None = None
    ) -> int:
        """One job: a batch of these rows, stepped by `trainer` (default: the timer's own; another
        one must have the same parameters, e.g. differ only in its attention block)."""
        trainer = trainer or self.trainer
        batch = contract_batch(rows, row_len, max_samples, np.random.default_rng(len(self.jobs)))
        shardings = trainer.batch_shardings({k: batch[k].ndim for k in pipeline.DEVICE_KEYS})
        gb = pipeline.to_global(batch, shardings)
        key = (len(rows), row_len, max_samples, trainer.model_cfg.attn_block)
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = trainer.jit_train_step(shardings).lower(self.state, gb).compile()
            self.compile_s.append(time.perf_counter() - t0)
            log(f"  compiled {key} in {self.compile_s[-1]:.1f}s")
        self.jobs.append((self.compiled[key], gb))
        return len(self.jobs) - 1

    def run(self, rounds: int) -> list[float]:
        times: list[list[float]] = [[] for _ in self.jobs]
        for r in range(rounds + 1):  # round 0 warms up
            for i, (step, gb) in enumerate(self.jobs):
                t0 = time.perf_counter()
                self.state, m = step(self.state, gb)
                jax.block_until_ready(m)
                if r:
                    times[i].append(time.perf_counter() - t0)
            log(f"  round {r}/{rounds} done")
        return [statistics.median(t) for t in times]


class NoTimer(StepTimer):
    """--flops-only: the batches are built and counted but no step is compiled or run (times NaN)."""

    def add(
        self, rows: list[list[int]], row_len: int, max_samples: int, trainer: DiTTask | None = None
    ) -> int:
        self.jobs.append((None, None))
        return len(self.jobs) - 1

    def run(self, rounds: int) -> list[float]:
        return [float("nan")] * len(self.jobs)


# --------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    samples = distribution(args.samples, args.seed, args.image_fraction)
    budget = args.rows * args.row_len
    trainer = make_trainer(args, args.attn_block)
    pad_block = args.pad_attn_block or args.attn_block
    pad_trainer = trainer if pad_block == args.attn_block else make_trainer(args, pad_block)
    timer = NoTimer(trainer) if args.flops_only else StepTimer(trainer)

    # vdit packing: vdit's size policy and packer.
    tokens, kept = vdit_sizes(samples, args.max_tokens)
    num_rows = math.ceil(sum(tokens) / args.row_len)
    num_rows += (-num_rows) % args.rows
    rows = pack_rows(tokens, args.row_len, args.max_samples, args.bins, num_rows)
    steps = [rows[i : i + args.rows] for i in range(0, len(rows), args.rows)]
    pack_jobs = [timer.add(s, args.row_len, args.max_samples) for s in steps[: args.timed_steps]]

    # Pad to max: the same sizes, one sample per row of max_tokens.
    per_step = budget // args.max_tokens
    pad_steps = [tokens[i : i + per_step] for i in range(0, len(tokens), per_step)]
    pad_steps = [s for s in pad_steps if len(s) == per_step]
    pad_jobs = [
        timer.add([[n] for n in s], args.max_tokens, 1, pad_trainer)
        for s in pad_steps[: args.timed_steps]
    ]

    # Open-Sora-style buckets: per-bucket batches of floor(budget / tokens), drop_last.
    assigned = [assign_bucket(s, args.max_tokens) for s in samples]
    by_bucket: dict[Any, list[int]] = collections.defaultdict(list)
    for i, a in enumerate(assigned):
        if a is not None:
            by_bucket[a[0]].append(i)
    batches, incomplete = [], 0  # (batch size, tokens per sample)
    for idx in by_bucket.values():
        n = assigned[idx[0]][1]
        bs = max(1, budget // n)
        batches += [(bs, n)] * (len(idx) // bs)
        incomplete += len(idx) % bs  # left for a later epoch: deferred, not counted as lost
    shapes = sorted(set(batches))
    log(
        f"pack {len(steps)} steps, pad {len(pad_steps)}, bucket {len(batches)} of {len(shapes)} shapes"
    )
    bucket_jobs = {
        shape: timer.add([[shape[1]]] * shape[0], shape[1], 1)
        for shape in (shapes if args.time_buckets else [])
    }
    t = timer.run(args.reps)

    results: dict[str, dict[str, Any]] = {}
    useful = sum(map(sum, rows))
    pack_time = statistics.mean(t[j] for j in pack_jobs) * len(steps)
    results["pack"] = {
        "fill": useful / (len(rows) * args.row_len),
        "pixels_kept": float(np.mean(kept)),
        "dropped": 0,
        "steps": len(steps),
        "useful_tokens": useful,
        "epoch_s": pack_time,
        "useful_tokens_per_s": useful / pack_time,
    }
    pad_useful = sum(map(sum, pad_steps))
    pad_time = statistics.mean(t[j] for j in pad_jobs) * len(pad_steps)
    results["pad"] = {
        "fill": pad_useful / (len(pad_steps) * per_step * args.max_tokens),
        "pixels_kept": float(np.mean(kept)),
        "dropped": 0,
        "steps": len(pad_steps),
        "useful_tokens": pad_useful,
        "epoch_s": pad_time,
        "useful_tokens_per_s": pad_useful / pad_time,
    }
    # The FLOP-bound ceiling: executed FLOPs per useful token (vdit.flops, the chunked kernel's
    # visited blocks) of each strategy. Each sample attends only to itself in every strategy, so
    # attention costs the same per useful token; what packing saves is the padding's share of the
    # dense layers.
    rng = np.random.default_rng(0)

    def executed(steps_rows, row_len, max_samples, model_cfg):
        total = attention = useful_t = 0.0
        for srows in steps_rows:
            b = contract_batch(srows, row_len, max_samples, rng)
            f = flops.step_flops(model_cfg, b["segment_ids"], b["text_segment_ids"])
            total += f["total_executed"]
            attention += f["attention_executed"]
            useful_t += float((b["segment_ids"] > 0).sum())
        return total / useful_t, attention / total

    pack_fpt, pack_att = executed(steps, args.row_len, args.max_samples, trainer.model_cfg)
    pad_fpt, pad_att = executed(
        [[[n] for n in s] for s in pad_steps], args.max_tokens, 1, pad_trainer.model_cfg
    )
    for name, fpt, att in (("pack", pack_fpt, pack_att), ("pad", pad_fpt, pad_att)):
        results[name]["executed_flops_per_useful_token"] = fpt
        results[name]["attention_share_of_executed"] = att
    results["pack"]["flop_bound_vs_pad"] = pad_fpt / pack_fpt
    results["pad"]["flop_bound_vs_pad"] = 1.0
    shape_s = {shape: t[j] for shape, j in bucket_jobs.items()}
    b_useful = sum(bs * n for bs, n in batches)
    nan = float("nan")
    b_time = sum(shape_s[b] for b in batches) if args.time_buckets else nan
    # 8 data-parallel ranks: each global step takes 8 bucket batches; the slowest sets the time.
    order = np.random.default_rng(args.seed).permutation(len(batches))
    groups = [order[i : i + 8] for i in range(0, len(order) - 7, 8)]
    dp_useful = sum(batches[j][0] * batches[j][1] for g in groups for j in g)
    dp_time = (
        sum(8 * max(shape_s[batches[j]] for j in g) for g in groups)  # rank-seconds
        if args.time_buckets
        else nan
    )
    kept_b = [a[2] if a is not None else 0.0 for a in assigned]
    results["bucket"] = {
        "fill": b_useful / (len(batches) * budget),
        "pixels_kept": float(np.mean(kept_b)),
        "dropped": sum(a is None for a in assigned),
        "incomplete_batch_samples": incomplete,
        "steps": len(batches),
        "useful_tokens": b_useful,
        "epoch_s": b_time,
        "useful_tokens_per_s": b_useful / b_time,
        "useful_tokens_per_s_8_ranks": dp_useful / dp_time,
        "distinct_shapes": len(shapes),
        "buckets_used": len(by_bucket),
    }
    for name in ("pack", "pad"):  # every step has the same shape: no rank waits for another
        results[name]["useful_tokens_per_s_8_ranks"] = results[name]["useful_tokens_per_s"]

    # Attention cost of the packed rows (chunked, block skipping) vs dense.
    att = []
    for r in rows[: args.attention_rows]:
        seg = np.zeros((1, args.row_len), np.int32)
        pos = 0
        for s, n in enumerate(r, 1):
            seg[0, pos : pos + n] = s
            pos += n
        heads, dim = trainer.model_cfg.heads, trainer.model_cfg.width // trainer.model_cfg.heads
        u = useful_attention_flops(seg, seg, heads, dim)
        e = executed_attention_flops_chunked(
            seg, seg, heads, dim, block_q=args.attn_block, block_kv=args.attn_block
        )
        att.append((u, e, 2.0 * 2 * args.row_len**2 * heads * dim))
    return {
        "samples": args.samples,
        "budget_tokens": budget,
        "max_tokens": args.max_tokens,
        "row_len": args.row_len,
        "rows": args.rows,
        "model": dataclasses.asdict(trainer.model_cfg),
        "pad_attn_block": pad_block,
        "compile_s": timer.compile_s,
        "strategies": results,
        "attention": {
            "executed_over_useful_chunked": float(np.mean([e / u for u, e, _ in att])),
            "executed_over_useful_dense": float(np.mean([d / u for u, _, d in att])),
            "segments_per_row": float(np.mean([len(r) for r in rows])),
        },
        "flops_per_token": flops.matmul_flops_per_token(trainer.model_cfg),
        "platform": platform.platform(),
        "devices": str(jax.devices()[0]),
    }


def print_tables(r: dict[str, Any]) -> None:
    s = r["strategies"]
    print(
        f"\n{r['samples']} samples; {r['rows']} x {r['row_len']} = {r['budget_tokens']} tokens per "
        f"step; at most {r['max_tokens']} tokens per sample; model width {r['model']['width']}, "
        f"depth {r['model']['depth']}; attention block {r['model']['attn_block']} "
        f"(pad: {r['pad_attn_block']})\n"
    )
    print(
        "| strategy | fill | source pixels kept | samples dropped | steps | useful tok/s "
        "| vs pad | FLOP-bound vs pad | useful tok/s, 8 DP ranks |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("pack", "pad", "bucket"):
        x = s[name]
        drop = f"{x['dropped']}" + (
            f" (+{x['incomplete_batch_samples']} deferred: incomplete batches)"
            if "incomplete_batch_samples" in x
            else ""
        )
        print(
            f"| {name} | {x['fill']:.1%} | {x['pixels_kept']:.1%} | {drop} | {x['steps']} | "
            f"{x['useful_tokens_per_s']:,.0f} | "
            f"{x['useful_tokens_per_s'] / s['pad']['useful_tokens_per_s']:.2f}x | "
            + (f"{x['flop_bound_vs_pad']:.2f}x | " if "flop_bound_vs_pad" in x else "- | ")
            + f"{x['useful_tokens_per_s_8_ranks']:,.0f} |"
        )
    a = r["attention"]
    print(
        f"\nPacked rows hold {a['segments_per_row']:.1f} samples on average. Attention FLOPs "
        f"executed / useful: chunked {a['executed_over_useful_chunked']:.2f}, "
        f"dense {a['executed_over_useful_dense']:.2f}. Attention (with its backward) is "
        f"{s['pack']['attention_share_of_executed']:.0%} of a packed step's executed FLOPs "
        f"({s['pad']['attention_share_of_executed']:.0%} padded): each sample attends only to "
        "itself in every strategy, so packing saves only the padding's dense-layer FLOPs. "
        '"FLOP-bound vs pad" is the ratio a step bound by FLOPs alone would give (executed '
        "FLOPs per useful token, vdit.flops)."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--image-fraction", type=float, default=1 / 3)
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per sample at most")
    p.add_argument("--row-len", type=int, default=16384)
    p.add_argument("--rows", type=int, default=1, help="rows per step (budget = rows x row-len)")
    p.add_argument("--max-samples", type=int, default=64, help="samples per packed row at most")
    p.add_argument("--bins", type=int, default=64, help="packing bins")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument(
        "--mlp-dim", type=int, default=0, help="MLP hidden width (0: 4 x width; Wan2.1-1.3B: 8960)"
    )
    p.add_argument("--attn-block", type=int, default=128)
    p.add_argument(
        "--pad-attn-block",
        type=int,
        default=0,
        help="the pad strategy's attention block (0: --attn-block), to time each at its best",
    )
    p.add_argument(
        "--remat", default="none", help="model.remat (e.g. full: wide models fit the host's memory)"
    )
    p.add_argument("--timed-steps", type=int, default=3, help="pack/pad steps timed (shapes fixed)")
    p.add_argument("--reps", type=int, default=3, help="timing rounds over all batches (median)")
    p.add_argument(
        "--no-time-buckets",
        dest="time_buckets",
        action="store_false",
        help="report the buckets' fill, pixels and drops but do not time their shapes "
        "(one compile per shape); for wider models",
    )
    p.add_argument(
        "--flops-only",
        action="store_true",
        help="only the fills and the FLOP-bound ratios, no step timed (any --width, quickly)",
    )
    p.add_argument("--attention-rows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/packing.json"))
    args = p.parse_args(argv)
    r = run(args)
    print_tables(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

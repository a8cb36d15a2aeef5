"""Benchmark: dense vs chunked (block-skipping) segment attention, fwd+bwd.

For packed rows of ``L`` tokens (default 1k, 4k, 16k, 64k) and two layouts
(``clips``: many short clips of 256..1024 tokens; ``single``: one segment filling the row)
reports executed vs useful attention FLOPs, fwd+bwd wall time (median of ``--reps``) and the
compiled temp memory (``memory_analysis().temp_size_in_bytes``) of the jitted fwd+bwd.

Dense runs only where its compiled temp memory fits ``--dense-max-gib``; chunked timing is
skipped when the executed forward FLOPs exceed ``--time-max-tflop`` (kept so the default run
stays within a few minutes on a 2-core CPU). Prints a markdown table and writes JSON.

Usage: python bench/attention.py [--max-len 16384] [--out bench/results/attention.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    from vdit.flops import executed_attention_flops_chunked, useful_attention_flops
    from vdit.ops.attention import attention
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vdit.flops import executed_attention_flops_chunked, useful_attention_flops
    from vdit.ops.attention import attention

DEFAULT_LENGTHS = (1024, 4096, 16384, 65536)


def clip_layout(length: int, clip_min: int, clip_max: int, seed: int) -> np.ndarray:
    """One row of contiguous clips with random lengths in [clip_min, clip_max]."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((1, length), np.int32)
    pos, sid = 0, 1
    while pos < length:
        n = int(rng.integers(clip_min, clip_max + 1))
        seg[0, pos : pos + n] = sid
        pos += n
        sid += 1
    return seg


def single_layout(length: int) -> np.ndarray:
    return np.ones((1, length), np.int32)


def build_step(impl: str, seg: np.ndarray, block_q: int, block_kv: int):
    seg_j = jnp.asarray(seg)

    def loss(q: jax.Array, k: jax.Array, v: jax.Array, cot: jax.Array) -> jax.Array:
        out = attention(q, k, v, seg_j, seg_j, impl=impl, block_q=block_q, block_kv=block_kv)
        return jnp.sum(out.astype(jnp.float32) * cot)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def measure(
    impl: str,
    seg: np.ndarray,
    heads: int,
    head_dim: int,
    args: argparse.Namespace,
    run: bool,
    skip_note: str,
    max_temp_bytes: float | None,
) -> dict[str, Any]:
    """Compiles fwd+bwd, reports temp bytes and (if allowed) median wall time."""
    length = seg.shape[1]
    step = build_step(impl, seg, args.block_q, args.block_kv)
    spec = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)
    result: dict[str, Any] = {"temp_bytes": None, "time_s": None, "times_s": None, "note": ""}
    try:
        t0 = time.perf_counter()
        compiled = step.lower(spec, spec, spec, spec).compile()
        result["compile_s"] = time.perf_counter() - t0
        result["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception as e:  # noqa: BLE001 - report, do not crash the sweep
        result["note"] = f"compile failed: {type(e).__name__}"
        return result
    if max_temp_bytes is not None and result["temp_bytes"] > max_temp_bytes:
        result["note"] = "n/a (O(L^2) memory)"
        return result
    if not run:
        result["note"] = skip_note
        return result
    keys = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    q, k, v, cot = (jax.random.normal(key, spec.shape, spec.dtype) for key in keys)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, cot))
        times.append(time.perf_counter() - t0)
    result["times_s"] = times
    result["time_s"] = statistics.median(times)
    return result


def _fmt_time(r: dict[str, Any]) -> str:
    return f"{1e3 * r['time_s']:.0f}" if r["time_s"] is not None else r["note"]


def _fmt_mib(r: dict[str, Any]) -> str:
    return f"{r['temp_bytes'] / 2**20:,.0f}" if r["temp_bytes"] is not None else "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    p.add_argument("--max-len", type=int, default=None, help="drop lengths above this")
    p.add_argument("--layouts", nargs="+", default=["clips", "single"], choices=["clips", "single"])
    p.add_argument("--clip-min", type=int, default=256)
    p.add_argument("--clip-max", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-q", type=int, default=512)
    p.add_argument("--block-kv", type=int, default=512)
    p.add_argument(
        "--ratio-blocks",
        type=int,
        nargs="*",
        default=[128],
        help="extra block sizes for which only the chunked executed/useful ratio is reported",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-max-len", type=int, default=16384, help="never run dense above this")
    p.add_argument(
        "--dense-max-gib",
        type=float,
        default=6.0,
        help="run dense only if its compiled temp memory is below this",
    )
    p.add_argument(
        "--time-max-tflop",
        type=float,
        default=1.0,
        help="skip chunked timing when executed forward TFLOPs exceed this",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results/attention.json"))
    args = p.parse_args(argv)

    lengths = [n for n in args.lengths if args.max_len is None or n <= args.max_len]
    h, d = args.heads, args.head_dim
    records: list[dict[str, Any]] = []
    for length in lengths:
        for layout in args.layouts:
            if layout == "clips":
                seg = clip_layout(length, args.clip_min, args.clip_max, args.seed + length)
            else:
                seg = single_layout(length)
            useful = useful_attention_flops(seg, seg, h, d)
            dense_exec = 4 * h * d * length * length
            chunked_exec = executed_attention_flops_chunked(
                seg, seg, h, d, block_q=args.block_q, block_kv=args.block_kv
            )
            chunked = measure(
                "chunked",
                seg,
                h,
                d,
                args,
                run=chunked_exec <= args.time_max_tflop * 1e12,
                skip_note="skipped (> --time-max-tflop)",
                max_temp_bytes=None,
            )
            dense = measure(
                "xla",
                seg,
                h,
                d,
                args,
                run=length <= args.dense_max_len,
                skip_note="n/a (O(L^2) memory)",
                max_temp_bytes=args.dense_max_gib * 2**30,
            )
            rec = {
                "length": length,
                "layout": layout,
                "num_segments": int(seg.max()),
                "useful_flops": useful,
                "dense_executed_flops": dense_exec,
                "chunked_executed_flops": chunked_exec,
                "dense_executed_over_useful": dense_exec / useful,
                "chunked_executed_over_useful": chunked_exec / useful,
                "chunked_executed_over_useful_by_block": {
                    str(blk): executed_attention_flops_chunked(
                        seg, seg, h, d, block_q=blk, block_kv=blk
                    )
                    / useful
                    for blk in args.ratio_blocks
                },
                "chunked": chunked,
                "dense": dense,
            }
            records.append(rec)
            print(
                f"# L={length} {layout}: fwd+bwd ms chunked {_fmt_time(chunked)}, "
                f"dense {_fmt_time(dense)}",
                file=sys.stderr,
                flush=True,
            )

    extra = "".join(f"| chunked exec/useful @{blk} " for blk in args.ratio_blocks)
    header = (
        "| L | layout | segs | useful GFLOP | dense exec/useful | chunked exec/useful "
        f"{extra}| chunked fwd+bwd ms | dense fwd+bwd ms | chunked temp MiB | dense temp MiB |"
    )
    print(
        f"\nH={h}, D={d}, block_q={args.block_q}, block_kv={args.block_kv}, "
        f"backend={jax.default_backend()}, devices={jax.device_count()}, "
        f"median of {args.reps}; FLOPs are forward (QK^T + PV)\n"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in records:
        print(
            f"| {r['length']} | {r['layout']} | {r['num_segments']} "
            f"| {r['useful_flops'] / 1e9:,.1f} | {r['dense_executed_over_useful']:.2f} "
            f"| {r['chunked_executed_over_useful']:.2f} "
            + "".join(f"| {x:.2f} " for x in r["chunked_executed_over_useful_by_block"].values())
            + f"| {_fmt_time(r['chunked'])} "
            f"| {_fmt_time(r['dense'])} | {_fmt_mib(r['chunked'])} | {_fmt_mib(r['dense'])} |"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "heads": h,
        "head_dim": d,
        "block_q": args.block_q,
        "block_kv": args.block_kv,
        "reps": args.reps,
        "clip_min": args.clip_min,
        "clip_max": args.clip_max,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
    }
    args.out.write_text(json.dumps({"config": meta, "results": records}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

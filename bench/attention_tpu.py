"""Benchmark: splash vs chunked attention compiled ahead of time for a TPU topology (no TPU needed).

Compiles segment-masked attention forward + backward (bf16, one row per device, inside
``shard_map`` over the batch) for ``--topology`` with libtpu, and reports per implementation and
row length:

* analytic forward FLOPs (QK^T + PV) for two layouts of the row, ``clips`` (many short clips)
  and ``single`` (one segment): useful, and executed by each kernel. The chunked kernel visits
  only block pairs that can share a segment; splash computes every block pair (its static mask is
  full, segment ids only mask inside a block). These are the layout-dependent numbers: the
  compiled programs take the ids at run time and are the same for both layouts.
* what XLA reports for the compiled program: ``cost_analysis()`` flops and bytes accessed (it
  does not look inside the Mosaic kernel of splash, and counts the body of the chunked kernel's
  data-dependent loops once, so neither is the executed work), ``memory_analysis()`` temp bytes,
  and the compile time.

Usage: python bench/attention_tpu.py [--lengths 4096 16384] [--out bench/results/attention_tpu.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

try:
    from vdit.flops import (
        executed_attention_flops_chunked,
        executed_attention_flops_splash,
        useful_attention_flops,
    )
    from vdit.ops.attention import attention
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vdit.flops import (
        executed_attention_flops_chunked,
        executed_attention_flops_splash,
        useful_attention_flops,
    )
    from vdit.ops.attention import attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import clip_layout  # noqa: E402  (bench/attention.py: the same row layouts)

IMPLS = ("splash", "chunked")


def compile_step(impl: str, mesh, length: int, args: argparse.Namespace) -> dict[str, Any]:
    rows, h, d = mesh.size, args.heads, args.head_dim
    x = jax.ShapeDtypeStruct(
        (rows, length, h, d), jnp.bfloat16, sharding=NamedSharding(mesh, P("data"))
    )
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=NamedSharding(mesh, P("data")))
    fn = functools.partial(
        attention, impl=impl, block_q=args.block, block_kv=args.block, platform="tpu"
    )
    per_device = jax.shard_map(
        lambda q, k, v, seg: fn(q, k, v, seg, seg),
        mesh=mesh,
        in_specs=(P("data"),) * 4,
        out_specs=P("data"),
        check_vma=impl != "splash",
    )

    def loss(q, k, v, seg):
        return jnp.sum(per_device(q, k, v, seg).astype(jnp.float32) ** 2)

    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, ids).compile()
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "compile_s": seconds,
        "xla_flops": float(cost.get("flops", 0.0)),
        "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
        "mosaic_calls": compiled.as_text().count('custom_call_target="tpu_custom_call"'),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5p:2x2x1")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--heads", type=int, default=8, help="heads per device")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--clip-min", type=int, default=256)
    p.add_argument("--clip-max", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/attention_tpu.json"))
    args = p.parse_args(argv)

    # Compiling needs no exclusive TPU access; another process holding libtpu's lock file would
    # otherwise make the plugin initialisation abort.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    mesh = jax.sharding.Mesh(np.array(topo.devices), ("data",))
    h, d, blk = args.heads, args.head_dim, args.block
    records = []
    for length in args.lengths:
        layouts = {
            "clips": clip_layout(length, args.clip_min, args.clip_max, args.seed + length),
            "single": np.ones((1, length), np.int32),
        }
        flops = {}
        for name, seg in layouts.items():
            flops[name] = {
                "segments": int(seg.max()),
                "useful": useful_attention_flops(seg, seg, h, d),
                "splash": executed_attention_flops_splash(
                    seg, seg, h, d, block_q=blk, block_kv=blk
                ),
                "chunked": executed_attention_flops_chunked(
                    seg, seg, h, d, block_q=blk, block_kv=blk
                ),
            }
        for impl in IMPLS:
            compiled = compile_step(impl, mesh, length, args)
            records.append({"length": length, "impl": impl, "flops": flops, **compiled})
            print(
                f"# L={length} {impl}: compiled in {compiled['compile_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    print(
        f"\ntopology={args.topology} ({mesh.size} devices, one row each), H={h}, D={d}, "
        f"block={blk}, bf16, forward + backward; GFLOP columns: analytic forward per row\n"
    )
    header = (
        "| L | impl | clips: segs | clips: useful GFLOP | clips: executed GFLOP | "
        "single: executed GFLOP | XLA cost flops (G) | XLA bytes accessed (MiB) | "
        "temp MiB | Mosaic calls | compile s |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in records:
        c, s = r["flops"]["clips"], r["flops"]["single"]
        print(
            f"| {r['length']} | {r['impl']} | {c['segments']} | {c['useful'] / 1e9:,.1f} "
            f"| {c[r['impl']] / 1e9:,.1f} | {s[r['impl']] / 1e9:,.1f} "
            f"| {r['xla_flops'] / 1e9:,.2f} | {r['xla_bytes_accessed'] / 2**20:,.0f} "
            f"| {r['temp_bytes'] / 2**20:,.1f} | {r['mosaic_calls']} | {r['compile_s']:.1f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "topology": args.topology,
        "heads": h,
        "head_dim": d,
        "block": blk,
        "clip_min": args.clip_min,
        "clip_max": args.clip_max,
        "jax_version": jax.__version__,
    }
    args.out.write_text(json.dumps({"config": meta, "results": records}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

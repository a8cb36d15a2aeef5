"""Benchmark: time to lower and compile the real train step against model depth.

The blocks run under `nnx.scan` (``model.scan_layers=True``), so the compiled program holds one
block whatever the depth and compile time should barely grow with it. For each depth (same config
otherwise) the step is built from a fresh train state (`vdit.aot.build`) and lowered + compiled
``--runs`` times; the table gives the medians and the ratio to the first depth. ``--topology``
compiles for a TPU slice (compile-only devices, needs libtpu) instead of this process's devices.

Prints a markdown table and writes JSON (``--out``).

Usage: python bench/compile.py [--config configs/default.py:XL/2] [--set data.row_len=256 ...]
       [--depths 4 28] [--runs 3] [--topology local|v5p-8] [--out bench/results/compile.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
try:
    import vdit  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT))

from throughput import apply_overrides, load_config  # noqa: E402

from vdit import aot, configlib  # noqa: E402
from vdit.parallel import topology  # noqa: E402


def time_compile(c, devices) -> dict[str, float]:
    """Seconds to trace + lower and to compile the train step of the loaded config `c`."""
    built = aot.build(c, devices)  # a fresh train state and step: nothing cached between runs
    t0 = time.perf_counter()
    lowered = built.step.lower(built.state, built.batch)
    t1 = time.perf_counter()
    lowered.compile()
    return {"lower": t1 - t0, "compile": time.perf_counter() - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.py:XL/2")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[
            "data.row_len=256",
            "data.max_tokens_per_sample=256",
            "data.batch_rows=2",
            "data.text_len=64",
        ],
    )
    ap.add_argument("--depths", nargs="+", type=int, default=[4, 28])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--topology", default="local")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compile.json"))
    args = ap.parse_args()

    if args.topology == "local":
        devices = jax.devices()[:1]
    else:
        devices = topology.topology_devices(topology.parse_topology(args.topology))
    rows = []
    for depth in args.depths:
        c = load_config(args.config)
        apply_overrides(c, args.set)
        c.model.depth = depth
        c = configlib.load(c, len(devices), plan_only=True)
        times = [time_compile(c, devices) for _ in range(args.runs)]
        rows.append(
            {
                "depth": depth,
                "width": c.model.width,
                "scan_layers": c.model.scan_layers,
                "lower_s": statistics.median(t["lower"] for t in times),
                "compile_s": statistics.median(t["compile"] for t in times),
                "runs": times,
            }
        )
    base = rows[0]["lower_s"] + rows[0]["compile_s"]
    target = f"{len(devices)} x {devices[0].device_kind} ({args.topology})"
    print(
        f"train-step compile time vs depth, {args.config} {' '.join(args.set)}, on {target}, "
        f"median of {args.runs}\n"
    )
    print("| depth | width | scanned | lower (s) | compile (s) | total (s) | vs first |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        total = r["lower_s"] + r["compile_s"]
        print(
            f"| {r['depth']} | {r['width']} | {r['scan_layers']} | {r['lower_s']:.1f} | "
            f"{r['compile_s']:.1f} | {total:.1f} | {total / base:.2f} |"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"config": args.config, "set": args.set, "target": target, "rows": rows}, f, indent=1
        )


if __name__ == "__main__":
    main()

"""Benchmark: does a Wan2.1-14B-size DiT train at 81x720p on a v5p-8, and at how many samples per chip?

The model: 40 blocks of width 5120, 40 heads, MLP 13824 (mlp_ratio 2.7), precomputed text of width 4096
(512 tokens), patch 1x2x2 on 16 latent channels. One sample is 81 frames of 720x1280 pixels, a
21x90x160 latent (4x8x8 VAE): 21 x 45 x 80 = 75,600 tokens, one sample per row. Each setting (remat,
sequence parallelism, dtypes, rows, modulation per token or per timestep slot) is the real train step
compiled for the slice by libtpu on this host (`vdit.aot.report`, as `vdit compile`; no TPU needed),
and the table gives per-device bytes by part (state from shapes and shardings, the rest from XLA's
`memory_analysis()`, or the compiler's figure when it refuses) and the verdict.

Each compile runs in its own process (libtpu keeps compiled programs' memory; a refusal can leave it
in a bad state), one after another.

Usage: JAX_PLATFORMS=cpu python bench/memory_14b.py [--only NAME ...] [--out bench/results/memory_14b.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3

# The 14B-size model and the 81x720p sample, as config overrides of configs/latent.py.
BASE = {
    "model.width": 5120,
    "model.depth": 40,
    "model.heads": 40,
    "model.mlp_ratio": 2.7,  # 13824 / 5120
    "model.text.kind": "precomputed",
    "model.text.width": 4096,
    "model.text.max_len": 512,
    "data.text_len": 512,
    "data.row_len": 75_600,  # 21 x 45 x 80 tokens
    "data.max_tokens_per_sample": 75_600,
    "data.max_samples_per_row": 1,
    "model.attn_block": 512,
    "model.dtype": "bfloat16",
    "mesh.data": 1,
}
# Rules that shard parameters (embed) over fsdp and sequence together: with sequence parallelism the
# state is split over the whole slice, not only over the fsdp devices.
EMBED_FSDP_SEQ = "embed=fsdp+sequence"

# name -> (overrides, rules change): tried in this order.
SETTINGS: dict[str, dict] = {
    "token-mod, remat full, fsdp 4, 4 rows": {
        "model.remat": "full",
        "mesh.fsdp": 4,
        "data.batch_rows": 4,
    },
    "slot-mod, remat full, fsdp 4, 4 rows": {
        "model.remat": "full",
        "mesh.fsdp": 4,
        "data.batch_rows": 4,
        "model.modulation_slots": 3,
    },
    "slot-mod, remat full, fsdp 2 x seq 2, 2 rows": {
        "model.remat": "full",
        "mesh.fsdp": 2,
        "mesh.sequence": 2,
        "data.batch_rows": 2,
        "model.modulation_slots": 3,
        "rules": EMBED_FSDP_SEQ,
    },
    "token-mod, remat full, fsdp 2 x seq 2, 2 rows": {
        "model.remat": "full",
        "mesh.fsdp": 2,
        "mesh.sequence": 2,
        "data.batch_rows": 2,
        "rules": EMBED_FSDP_SEQ,
    },
    "slot-mod, remat full, fsdp 1 x seq 4, 1 row": {
        "model.remat": "full",
        "mesh.fsdp": 1,
        "mesh.sequence": 4,
        "data.batch_rows": 1,
        "model.modulation_slots": 3,
        "rules": EMBED_FSDP_SEQ,
    },
    "slot-mod, remat full, fsdp 2 x seq 2, 2 rows, bf16 params": {
        "model.remat": "full",
        "mesh.fsdp": 2,
        "mesh.sequence": 2,
        "data.batch_rows": 2,
        "model.modulation_slots": 3,
        "model.param_dtype": "bfloat16",
    },
    "slot-mod, remat full, fsdp 2 x seq 2, 2 rows, bf16 params, params over fsdp x seq": {
        "model.remat": "full",
        "mesh.fsdp": 2,
        "mesh.sequence": 2,
        "data.batch_rows": 2,
        "model.modulation_slots": 3,
        "model.param_dtype": "bfloat16",
        "rules": EMBED_FSDP_SEQ,
    },
    "token-mod, remat full, fsdp 2 x seq 2, 2 rows, bf16 params, params over fsdp x seq": {
        "model.remat": "full",
        "mesh.fsdp": 2,
        "mesh.sequence": 2,
        "data.batch_rows": 2,
        "model.param_dtype": "bfloat16",
        "rules": EMBED_FSDP_SEQ,
    },
}

CHILD = r"""
import json, sys
from vdit import aot
from vdit.configlib import default_rules
import importlib.util
spec = importlib.util.spec_from_file_location("latent", "{root}/configs/latent.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
c = m.get_config("XL/2")
over = json.loads(sys.argv[1])
rules = over.pop("rules", None)
for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
        node = node[p]
    node[last] = v
if rules == "{embed_seq}":
    c.sharding.rules = tuple(
        (n, ("fsdp", "sequence")) if n in ("embed", "text_embed") else (n, a)
        for n, a in default_rules()
    )
import os
if os.environ.get("OOM_DETAIL"):
    import jax
    from vdit import configlib
    from vdit.parallel.topology import parse_topology, topology_devices
    devs = topology_devices(parse_topology("v5p-8"))
    built = aot.build(configlib.load(c, len(devs), plan_only=True), devs)
    try:
        aot.compile_step(built)
    except Exception as e:
        print(str(e)[:20000])
    sys.exit(0)
r = aot.compile_report(c, "v5p-8")
print("RESULT " + json.dumps(r))
"""


def run_one(overrides: dict) -> dict:
    code = CHILD.format(root=ROOT, embed_seq=EMBED_FSDP_SEQ)
    p = subprocess.run(
        [sys.executable, "-c", code, json.dumps({**BASE, **overrides})],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"failed": " | ".join(tail)}


def row(name: str, r: dict) -> str:
    if "failed" in r:
        return f"| {name} | | | | | | | | failed: {r['failed'][:200]} |"
    b = r["bytes_per_device"]
    g = lambda k: f"{b.get(k, 0) / GiB:.1f}"
    rows = r.get("notes") and r["notes"]
    hbm = r["chip"]["hbm_per_device"]
    fits = b["total"] <= hbm
    verdict = f"fits ({b['total'] / GiB:.1f} of {hbm / GiB:.0f})" if fits else "does NOT fit"
    if "compile_error" in r:
        verdict += " (compiler refused)"
    spc = r["tokens_per_step"] / 75_600 / r["chip"]["chips"]
    return (
        f"| {name} | {spc:.2f} | {g('params')} | {g('opt_state')} | {g('ema')} | {g('arguments')} "
        f"| {g('temporaries')} | {g('total')} | {verdict}{' ' + str(rows) if rows else ''} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="names of settings to run (default: all)")
    p.add_argument("--out", type=Path, default=Path("bench/results/memory_14b.json"))
    args = p.parse_args(argv)
    names = [n for n in SETTINGS if not args.only or any(o in n for o in args.only)]
    results = {}
    print(
        "| setting | samples/chip | params | opt_state | ema | arguments | temporaries | total "
        "| verdict |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in names:
        results[name] = run_one(SETTINGS[name])
        print(row(name, results[name]), flush=True)
    print("GiB per device (v5p-8: 4 chips, 95 GiB HBM each); 75,600 tokens per sample")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": SETTINGS, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

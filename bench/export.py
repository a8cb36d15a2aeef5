"""`vdit export`: time, file sizes and peak host memory, for the default model and B/2.

    python bench/export.py                          # default (Ti/4) and B/2, float32 and bfloat16
    python bench/export.py --models=default --max_file_mb=16

Each model is built with random init (nothing is downloaded) in pixel space (configs/default.py)
and saved as a checkpoint holding its EMA parameters only (what `vdit export` reads). Every export
then runs in a fresh process on 8 CPU devices, so that, as on an accelerator host, the restored
parameters are sharded (fsdp=8) and every tensor written is gathered into a new host buffer.
Memory is the process's resident set (VmRSS / VmHWM): `restore` is the peak growth while the
parameters are read (they live in host memory on a CPU), `write` the peak growth above that while
the safetensors files are written (the peak is reset in between). Streaming shows as a write peak
near the largest file, against the whole model for one unsharded file (the `1 file` rows). Times
are wall clock, noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import procmem  # noqa: E402  (bench/, on sys.path when run as a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"default": None, "B/2": "B/2"}


def make(variant: str | None, workdir: str) -> dict:
    """A checkpoint of a randomly initialised model (its EMA parameters only) in `workdir`."""
    import jax
    from flax import nnx

    from bench.common import default_config
    from vdit import configlib
    from vdit.models.dit import VideoDiT
    from vdit.train.checkpoint import Checkpointer

    c = configlib.load(default_config(variant), 1)
    cfg = configlib.model_config(c)
    params = jax.jit(
        lambda: nnx.to_pure_dict(nnx.state(VideoDiT(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    )()
    with Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1) as ckpt:
        ckpt.save(0, {"ema": params}, config=c, force=True)
    leaves = jax.tree.leaves(params)
    return {
        "n_params": sum(x.size for x in leaves),
        "param_bytes": sum(x.nbytes for x in leaves),
        "variant": c.model.variant,
    }


def run_export(workdir: str, out: str, fmt: str, dtype: str, max_file_mb: int) -> dict:
    """One export in this (fresh) process: its time, files and memory growth by phase."""
    from vdit.export import tensors
    from vdit.export.writer import export

    marks: dict[str, int] = {}
    write = tensors.write

    def measured_write(*args, **kwargs):
        marks["restore"] = procmem.status("VmHWM") - marks["start"]
        marks["before_write"] = procmem.status("VmRSS")
        procmem.reset_peak()
        index = write(*args, **kwargs)
        marks["write"] = procmem.status("VmHWM") - marks["before_write"]
        return index

    tensors.write = measured_write  # the writer calls it through the module
    procmem.reset_peak()
    marks["start"] = procmem.status("VmRSS")
    t0 = time.perf_counter()
    summary = export(
        workdir, out, fmt=fmt, dtype=dtype, max_file_bytes=max_file_mb << 20, platforms=("cpu",)
    )
    seconds = time.perf_counter() - t0
    if "restore" not in marks:  # orbax: one phase
        marks["restore"] = procmem.status("VmHWM") - marks["start"]
    sizes = [
        os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors")
    ]
    return {
        **summary,
        "seconds": seconds,
        "restore_growth": marks["restore"],
        "write_growth": marks.get("write"),
        "largest_file": max(sizes, default=0),
        "safetensors_files": len(sizes),
    }


def _child(args: list[str]) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # sharded parameters
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"bench/export.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="default,B/2", help="comma-separated: default, B/2")
    p.add_argument("--max_file_mb", type=int, default=64, help="safetensors file size cap (MiB)")
    p.add_argument("--out", default="bench/results/export.json", help="the rows as JSON")
    p.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        sys.path.insert(0, ROOT)
        kind, *rest = a.child
        if kind == "make":
            variant, workdir = rest
            result = make(None if variant == "default" else variant, workdir)
        else:
            workdir, out, fmt, dtype, mb = rest
            result = run_export(workdir, out, fmt, dtype, int(mb))
        print(json.dumps(result))
        return

    rows = []
    for model in a.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            workdir = os.path.join(tmp, "run")
            info = _child(["make", model, workdir])
            cases = [
                ("safetensors", "float32", a.max_file_mb),
                ("safetensors", "bfloat16", a.max_file_mb),
                ("safetensors", "float32", 1 << 20),  # one file
                ("orbax", "float32", a.max_file_mb),
                ("orbax", "bfloat16", a.max_file_mb),
            ]
            if model == "default":
                cases.append(("stablehlo", "float32", a.max_file_mb))
            for i, (fmt, dtype, mb) in enumerate(cases):
                out = os.path.join(tmp, f"out{i}")
                r = _child(["export", workdir, out, fmt, dtype, str(mb)])
                rows.append({"model": f"{model} ({info['variant']})", **info, "cap_mb": mb, **r})

    mib = 1 << 20
    print(
        "| model | params | format | dtype | files | largest MiB | total MiB | export s "
        "| restore peak MiB | write peak MiB | write / largest file |"
    )
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        one = " (1 file)" if r["cap_mb"] >= 1 << 20 else ""
        files = r["safetensors_files"] if r["format"] != "orbax" else r["files"]
        largest = f"{r['largest_file'] / mib:.1f}" if r["largest_file"] else "-"
        w = r["write_growth"]
        write = "-" if w is None else f"{w / mib:.1f}"
        ratio = "-" if w is None or not r["largest_file"] else f"{w / r['largest_file']:.2f}"
        print(
            f"| {r['model']} | {r['n_params']:,} | {r['format']}{one} | {r['dtype']} | {files} "
            f"| {largest} | {r['bytes'] / mib:.1f} | {r['seconds']:.2f} "
            f"| {r['restore_growth'] / mib:.1f} | {write} | {ratio} |"
        )
    print(
        f"\nsafetensors files capped at {a.max_file_mb} MiB (a larger tensor has a file of its own) "
        "unless '1 file'; f32 parameter bytes: "
        + ", ".join(sorted({f"{r['model']} {r['param_bytes'] / mib:.1f} MiB" for r in rows}))
    )
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Causal VAE encode / decode vs video length: throughput and peak memory of the full pass against the
chunked one (`encode_chunked` / `decode_chunked`, causal caches carried from chunk to chunk).

    python bench/vae_scaling.py            # configs/vae.py, 32x32, 17..257 frames (~5 min, 2 cores)
    python bench/vae_scaling.py --size 64 64 --lengths 17 33 65 129
    python bench/vae_scaling.py --base-channels=64 --blocks-per-level=2 --lengths 17 65

Every (length, encode|decode, full|chunked) runs in its own subprocess on one CPU device, so its
memory figures are its own. In each: build the network (seed 0), compile and run once (warm-up),
then time `--reps` calls (median; compile excluded). Memory, two ways:

- `XLA`: from the compiled executables' `memory_analysis()`: full = temp + arguments + outputs of
  the one jitted pass; chunked = the largest of its jitted steps (temp + arguments + outputs, i.e.
  one chunk's working set with the parameters and carried caches) + the whole input + twice the
  whole output (the per-chunk outputs and their concatenation), since the loop holds those too.
- `RSS`: the process's resident-set high-water mark during the timed calls minus its resident set
  just before them. After the warm-up the allocator's free pages are handed back (glibc
  `malloc_trim`) and the peak is reset (/proc/self/clear_refs, Linux), so neither compile memory
  nor pages cached by the warm-up hide the run's own; `rss_max_bytes` in the JSON is `ru_maxrss`
  of the whole process (imports, compiles and all).

Throughput is frames/s: pixel frames of the video (after dropping the trailing frames no latent frame
sees) per second, for encode and decode alike. Timings on a shared CPU are noisy: the two modes of a
length run back to back and the table reports their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MIB = 2**20


def load_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vae_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# ----------------------------------------------------------------------------------------------------
# One configuration (runs in a subprocess)
# ----------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Resets VmHWM to the current resident set (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Collects garbage and hands the allocator's free pages back (glibc), so that the resident set
    before the timed calls is what is live, not what the warm-up and the compiles left cached."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _xla_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )


def worker(spec: dict) -> dict:
    t_build = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from vdit import configlib
    from vdit.models import vae, vae_chunked

    c = load_config(spec["config"])
    if spec["base_channels"]:
        c.vae.base_channels = spec["base_channels"]
    if spec["blocks_per_level"]:
        c.vae.blocks_per_level = spec["blocks_per_level"]
    cfg = configlib.vae_config(configlib.load(c))
    model = vae.CausalVAE3D(cfg, rngs=nnx.Rngs(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    h, w = spec["size"]
    ct, ch, cw = cfg.compression
    t_lat = cfg.latent_frames(spec["frames"])
    frames = cfg.pixel_frames(t_lat)  # what the VAE keeps
    rng = np.random.default_rng(0)
    if spec["op"] == "encode":
        x = jnp.asarray(rng.uniform(-1, 1, (1, frames, h, w, 3)), jnp.float32)
        full_fn, step_fn = vae.encode_full, vae_chunked._encode_step
        chunk = spec["chunk_frames"]
        run_chunked = lambda v: vae_chunked.encode_chunked(model, v, chunk)
    else:
        x = jnp.asarray(
            rng.standard_normal((1, t_lat, h // ch, w // cw, cfg.latent_channels)), jnp.float32
        )
        full_fn, step_fn = vae.decode_full, vae_chunked._decode_step
        chunk = spec["chunk_latents"]
        run_chunked = lambda v: vae_chunked.decode_chunked(model, v, chunk)

    build_s = time.perf_counter() - t_build
    t0 = time.perf_counter()
    if spec["mode"] == "full":
        compiled = full_fn.lower(model, x).compile()
        xla = _xla_bytes(compiled)
        run = lambda: full_fn(model, x)
    else:
        # the distinct step shapes of the loop: the first frame (no cache), then chunks with caches
        n = x.shape[1]
        bounds = vae_chunked._chunks(n, chunk)
        step_peaks, prev, seen = [], None, {}
        for start, stop in bounds:
            key = (stop - start, prev is None)
            sl = jax.ShapeDtypeStruct((1, stop - start, *x.shape[2:]), x.dtype)
            if key not in seen:
                seen[key] = _xla_bytes(step_fn.lower(model, sl, prev).compile())
                step_peaks.append(
                    {"frames": stop - start, "first": prev is None, "bytes": seen[key]}
                )
            prev = step_fn.eval_shape(model, sl, prev)[-1]
        if spec["op"] == "encode":  # mean and logvar
            out_bytes = 2 * t_lat * (h // ch) * (w // cw) * cfg.latent_channels * 4
        else:
            out_bytes = frames * h * w * cfg.in_channels * 4
        xla = max(p["bytes"] for p in step_peaks) + x.size * x.dtype.itemsize + 2 * out_bytes
        run = lambda: run_chunked(x)
    jax.block_until_ready(run())  # warm-up (and, for chunked, the compiles)
    compile_s = time.perf_counter() - t0

    _trim()
    reset = _reset_peak()
    base = _status_kib("VmRSS")
    times = []
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    hwm = _status_kib("VmHWM")
    med = statistics.median(times)
    return {
        **spec,
        "frames_kept": frames,
        "latent_frames": t_lat,
        "params": n_params,
        "times": times,
        "median_s": med,
        "frames_per_s": frames / med,
        "import_and_build_s": build_s,
        "warmup_and_compile_s": compile_s,
        "xla_bytes": xla,
        "chunk_steps": None if spec["mode"] == "full" else step_peaks,
        "rss_base_bytes": None if base is None else base * 1024,
        "rss_run_peak_bytes": None if (hwm is None or not reset) else hwm * 1024,
        "rss_delta_bytes": None
        if (hwm is None or base is None or not reset)
        else (hwm - base) * 1024,
        "rss_max_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "devices": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
    }


# ----------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------
def run_one(spec: dict, cache_dir: str) -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    # one compilation cache for the sweep: the chunk steps have the same shapes at every length
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"worker failed for {spec}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt_mib(b) -> str:
    return "n/a" if b is None else f"{b / MIB:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "vae.py"))
    ap.add_argument("--base-channels", type=int, default=0, help="override vae.base_channels")
    ap.add_argument("--blocks-per-level", type=int, default=0, help="override vae.blocks_per_level")
    ap.add_argument("--lengths", type=int, nargs="+", default=[17, 33, 65, 129, 257])
    ap.add_argument("--size", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    ap.add_argument("--chunk-frames", type=int, default=16, help="pixel frames per encode chunk")
    ap.add_argument("--chunk-latents", type=int, default=4, help="latent frames per decode chunk")
    ap.add_argument("--ops", nargs="+", default=["encode", "decode"], choices=["encode", "decode"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "vae_scaling.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    t_start = time.perf_counter()
    cache_dir = tempfile.mkdtemp(prefix="vae-scaling-cache-")
    rows = []
    for frames in args.lengths:
        for op in args.ops:
            pair = {}
            for mode in ("full", "chunked"):
                spec = {
                    "config": args.config,
                    "base_channels": args.base_channels,
                    "blocks_per_level": args.blocks_per_level,
                    "frames": frames,
                    "size": list(args.size),
                    "chunk_frames": args.chunk_frames,
                    "chunk_latents": args.chunk_latents,
                    "op": op,
                    "mode": mode,
                    "reps": args.reps,
                }
                pair[mode] = run_one(spec, cache_dir)
                rows.append(pair[mode])
                r = pair[mode]
                print(
                    f"# {op} {mode:7s} {r['frames_kept']:4d} frames: {r['frames_per_s']:7.1f} "
                    f"frames/s, XLA {fmt_mib(r['xla_bytes'])} MiB, RSS delta "
                    f"{fmt_mib(r['rss_delta_bytes'])} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    total = time.perf_counter() - t_start

    r0 = rows[0]
    print(
        f"VAE {args.config.split(os.sep)[-1]} ({r0['params']:,} parameters), "
        f"{args.size[0]}x{args.size[1]}, batch 1, float32, one CPU device ({r0['devices']}, "
        f"{r0['cpu_count']} cores); chunks: {args.chunk_frames} pixel frames (encode), "
        f"{args.chunk_latents} latent frames (decode); median of {args.reps} after a warm-up; "
        f"sweep {total:.0f} s\n"
    )
    print(
        "| op | frames | full frames/s | chunked frames/s | chunked / full speed "
        "| full XLA MiB | chunked XLA MiB | full RSS MiB | chunked RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    by = {(r["op"], r["frames"], r["mode"]): r for r in rows}
    for op in args.ops:
        for frames in args.lengths:
            f, k = by[(op, frames, "full")], by[(op, frames, "chunked")]
            print(
                f"| {op} | {f['frames_kept']} | {f['frames_per_s']:.1f} | {k['frames_per_s']:.1f} "
                f"| {k['frames_per_s'] / f['frames_per_s']:.2f} | {fmt_mib(f['xla_bytes'])} "
                f"| {fmt_mib(k['xla_bytes'])} | {fmt_mib(f['rss_delta_bytes'])} "
                f"| {fmt_mib(k['rss_delta_bytes'])} |"
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "seconds": total, "rows": rows}, fh, indent=1)
    shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

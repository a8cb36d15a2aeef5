"""Mapping Wan2.1's VAE (AutoencoderKLWan, base 96: 126.9M parameters, random weights, nothing
downloaded) into vdit and back: time and peak host memory of each direction.

    python bench/wan_vae_mapping.py                     # both directions, each in a fresh process
    python bench/wan_vae_mapping.py --direction=import  # one direction in this process (to run it
                                                        # under /usr/bin/time -v, say)
    python bench/wan_vae_mapping.py --parity            # the full-size mapped model against
                                                        # diffusers' (needs torch, diffusers)

import: `params_from_diffusers` of a {diffusers name: float32 array} state dict (what the
safetensors reader hands over) -> vdit's nnx trees; export: `params_to_diffusers` of vdit's host
parameters -> the state dict. Memory is the process's resident set (Linux /proc/self/status):
`before` with the source tensors made (and jax, flax imported), `peak growth` the rise of the peak
above it during the mapping (the peak is reset first), which holds the output: one copy of the
model. Times are wall clock (median of --repeats), noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import procmem  # noqa: E402  (bench/, on sys.path when run as a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(direction: str, repeats: int) -> dict:
    import numpy as np

    sys.path.insert(0, ROOT)
    from vdit.export.tensors import nest
    from vdit.interop import wan_vae

    t0 = time.perf_counter()
    c = wan_vae.vae_config_from_diffusers({})  # AutoencoderKLWan's defaults: Wan2.1's VAE
    table = wan_vae.mapping(c)
    t_table = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    if direction == "import":
        source = {d: rng.standard_normal(s, dtype=np.float32) for d, (_, _, _, s) in table.items()}
        fn = lambda: wan_vae.params_from_diffusers(source, c)
    else:
        flat = {v: rng.standard_normal(s, dtype=np.float32) for v, _, s, _ in table.values()}
        params = nest(flat)
        buffers = {"latent_mean": np.zeros(16, np.float32), "latent_std": np.ones(16, np.float32)}
        fn = lambda: wan_vae.params_to_diffusers(params, buffers, c)
    times, growth = [], []
    for _ in range(repeats):
        before = procmem.status("VmRSS")
        procmem.reset_peak()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        growth.append(procmem.status("VmHWM") - before)
        del out
    return {
        "direction": direction,
        "tensors": len(table),
        "parameters": sum(int(np.prod(s)) for _, _, s, _ in table.values()),
        "table_s": t_table,
        "seconds": statistics.median(times),
        "before_mb": before / 2**20,
        "peak_growth_mb": max(growth) / 2**20,
    }


def parity(frames: int, size: int) -> list[tuple[str, float, float]]:
    """(what, max abs error, relative error) of the full-size random AutoencoderKLWan (gammas and
    biases perturbed) mapped into vdit: encode of `frames` x `size` x `size` random pixels, and the
    decode of diffusers' posterior mean (its decoder output before the clamp of `decode`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import AutoencoderKLWan
    from flax import nnx

    sys.path.insert(0, ROOT)
    from vdit import configlib
    from vdit.interop import wan_vae
    from vdit.models import vae

    torch.manual_seed(0)
    ref = AutoencoderKLWan().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("gamma", "bias")):
                p.add_(0.1 * torch.randn_like(p))
    c = wan_vae.vae_config_from_diffusers(dict(ref.config))
    params, buffers = wan_vae.params_from_diffusers(
        {k: v.numpy() for k, v in ref.state_dict().items()}, c
    )
    abstract = nnx.eval_shape(lambda: vae.CausalVAE3D(configlib.vae_config(c), rngs=nnx.Rngs(0)))
    graphdef, p, b = nnx.split(abstract, nnx.Param, vae.LatentStat)
    nnx.replace_by_pure_dict(p, jax.tree.map(jnp.asarray, params))
    nnx.replace_by_pure_dict(b, jax.tree.map(jnp.asarray, buffers))
    model = nnx.merge(graphdef, p, b)
    cf = lambda a: np.asarray(a).transpose(0, 4, 1, 2, 3)  # (B, T, H, W, C) -> (B, C, T, H, W)
    x = np.random.default_rng(0).uniform(-1, 1, (1, frames, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(cf(x).copy())).latent_dist
        ref.clear_cache()
        h, out = ref.post_quant_conv(post.mean), []
        for i in range(post.mean.shape[2]):  # diffusers' decode loop, without its clamp
            ref._conv_idx = [0]
            out.append(ref.decoder(h[:, :, i : i + 1], ref._feat_map, ref._conv_idx, i == 0))
        raw = torch.cat(out, 2).numpy()
    mean, logvar = vae.encode_full(model, jnp.asarray(x))
    video = vae.decode_full(model, jnp.asarray(post.mean.numpy().transpose(0, 2, 3, 4, 1)))

    def err(a, b):
        d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
        return float(d), float(d / np.abs(b).max())

    return [
        (f"encode {frames}x{size}x{size}, posterior mean", *err(cf(mean), post.mean.numpy())),
        ("encode, log-variance", *err(cf(logvar), post.logvar.numpy())),
        ("decode of the mean, before the clamp", *err(cf(video), raw)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--direction", choices=("import", "export"), default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="", help="write the rows here too")
    ap.add_argument("--parity", action="store_true", help="the full-size model vs diffusers'")
    ap.add_argument("--frames", type=int, default=5, help="--parity: video frames (1 + 4k)")
    ap.add_argument("--size", type=int, default=32, help="--parity: height = width (x 8)")
    args = ap.parse_args()
    if args.parity:
        print("| full-size AutoencoderKLWan (random) | max abs | rel |")
        print("|---|---|---|")
        for what, a, r in parity(args.frames, args.size):
            print(f"| {what} | {a:.1e} | {r:.1e} |")
        return
    if args.direction:
        print(json.dumps(run(args.direction, args.repeats)))
        return
    rows = []
    for direction in ("import", "export"):
        cmd = [sys.executable, os.path.abspath(__file__), f"--direction={direction}"]
        cmd.append(f"--repeats={args.repeats}")
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(
        "| direction | tensors | parameters | model MB (f32) | time s (median) | "
        "name table s | RSS before MB | peak growth MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['direction']} | {r['tensors']} | {r['parameters']:,} | "
            f"{r['parameters'] * 4 / 2**20:.0f} | {r['seconds']:.2f} | {r['table_s']:.2f} | "
            f"{r['before_mb']:.0f} | {r['peak_growth_mb']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

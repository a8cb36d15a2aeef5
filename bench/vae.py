"""Reconstruction quality of the causal VAE on held-out procedural videos and on camera pans across
held-out real photographs: trained vs untrained vs a trivial baseline at the same compression.

    python bench/vae.py                       # trains configs/vae.py briefly, then prints the table
    python bench/vae.py --steps=600 --workdir=runs/vae-bench
    python bench/vae.py --workdir=runs/vae    # evaluate an existing run (trains on if short of --steps)
    python bench/vae.py --source=synthetic    # train on procedural videos only (default: mixed)

Held-out sets: `synthetic` (procedural samples of a seed training never uses) and `pan` (camera pans
across the scikit-image photos of `vdit.data.pan.HELDOUT`, which training never sees; the trained
model's pans come from the other photos when `--source` is `pan` or `mixed`).

Rows:
- `vae (trained, EMA)`: configs/vae.py trained `--steps` steps on this machine (decode of the mean)
- `vae (untrained)`: the same network at initialisation
- `pool + nearest` / `pool + trilinear`: average-pool each latent cell (the first frame alone, then
  groups of ct frames, 8x8 pixels: the VAE's 4x8x8 causal grid) and upsample it back by repetition
  or by trilinear interpolation. It keeps 3 numbers per latent cell where the VAE keeps 16.

To keep compiles few on a CPU the run trains and evaluates on one frame count and size plus images
(`--frames`, `--size`); PSNR (dB, on [-1, 1] with peak-to-peak 2) and SSIM (11x11 Gaussian) are
averaged over `--samples` held-out samples (a seed the training never sees).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vdit import configlib  # noqa: E402
from vdit.data import vae_data  # noqa: E402
from vdit.models import vae  # noqa: E402
from vdit.ops.quality import psnr, ssim  # noqa: E402
from vdit.train.load import load  # noqa: E402
from vdit.train.loop import train_and_evaluate  # noqa: E402
from vdit.train.vae_task import reconstruct, vae_data_config  # noqa: E402


def load_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vae_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def pool_baseline(video: np.ndarray, comp: tuple[int, int, int], mode: str) -> np.ndarray:
    """Causal average pooling to the latent grid and back. video (1, T, H, W, 3), T = 1 + k ct."""
    ct, ch, cw = comp
    x = jnp.asarray(video)
    b, t, h, w, c = x.shape
    first = x[:, :1]
    groups = [first] + ([x[:, 1:].reshape(b, (t - 1) // ct, ct, h, w, c).mean(2)] if t > 1 else [])
    lat = jnp.concatenate(groups, 1)
    lat = lat.reshape(b, lat.shape[1], h // ch, ch, w // cw, cw, c).mean((3, 5))  # (B, t, h, w, C)
    if mode == "nearest":
        up = jnp.repeat(jnp.repeat(lat, ch, 2), cw, 3)
        return np.asarray(jnp.concatenate([up[:, :1], jnp.repeat(up[:, 1:], ct, 1)], 1))
    # trilinear: the first latent frame stands for pixel frame 0, latent frame j >= 1 for the centre
    # of its group of frames; resize in space, then interpolate in time between those centres
    up = jax.image.resize(lat, (b, lat.shape[1], h, w, c), "linear")
    centres = np.concatenate([[0.0], 1 + np.arange(lat.shape[1] - 1) * ct + (ct - 1) / 2])
    frames = np.arange(t, dtype=np.float64)
    i1 = np.clip(np.searchsorted(centres, frames), 1, max(len(centres) - 1, 1))
    if len(centres) == 1:
        return np.asarray(jnp.repeat(up, t, 1))
    i0 = i1 - 1
    a = np.clip((frames - centres[i0]) / (centres[i1] - centres[i0]), 0.0, 1.0)
    a = jnp.asarray(a, jnp.float32)[None, :, None, None, None]
    return np.asarray(up[:, i0] * (1 - a) + up[:, i1] * a)


def scores(recons, videos) -> tuple[float, float]:
    p = [float(psnr(r, v[:, : r.shape[1]])) for r, v in zip(recons, videos, strict=True)]
    s = [float(ssim(r, v[:, : r.shape[1]])) for r, v in zip(recons, videos, strict=True)]
    return float(np.mean(p)), float(np.mean(s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "vae.py"))
    ap.add_argument("--workdir", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--size", type=int, nargs=2, default=(32, 32))
    ap.add_argument("--samples", type=int, default=16, help="held-out samples per set")
    ap.add_argument(
        "--source",
        default="mixed",
        choices=("synthetic", "pan", "mixed"),
        help="training data (data.source of configs/vae.py)",
    )
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "vae.json"))
    args = ap.parse_args()

    c = load_config(args.config)
    c.data.frame_choices = (args.frames,)
    c.data.size_choices = (tuple(args.size),)
    c.data.max_pixels = max(c.data.max_pixels, args.frames * args.size[0] * args.size[1])
    c.train.steps = args.steps
    c.train.eval_every = args.steps
    c.train.checkpoint_every = args.steps
    c.train.progress = False
    c.data.source = args.source
    workdir = args.workdir or tempfile.mkdtemp(prefix="vae-bench-")
    t0 = time.perf_counter()
    last = train_and_evaluate(c, workdir)
    train_s = time.perf_counter() - t0

    c = configlib.load(c)
    dcfg = dataclasses.replace(vae_data_config(c), source="pan")
    sets = vae_data.heldout_sets(dcfg, args.samples, c.data.eval_seed + 7)
    trained = load(workdir).model()
    untrained = vae.CausalVAE3D(configlib.vae_config(c), rngs=nnx.Rngs(c.seed))
    comp = trained.cfg.compression
    rows = []
    for name, fn in [
        (
            "vae (trained, EMA)",
            lambda v: np.asarray(reconstruct(trained, jnp.asarray(v))),
        ),
        ("vae (untrained)", lambda v: np.asarray(reconstruct(untrained, jnp.asarray(v)))),
        ("pool + nearest", lambda v: pool_baseline(trained.check_video(v), comp, "nearest")),
        ("pool + trilinear", lambda v: pool_baseline(trained.check_video(v), comp, "trilinear")),
    ]:
        row = {"method": name}
        for set_name, videos in sets.items():
            p, s_ = scores([fn(v) for v in videos], videos)
            row[f"{set_name}_psnr"], row[f"{set_name}_ssim"] = p, s_
        rows.append(row)

    videos = sets["synthetic"]
    n_img = sum(v.shape[1] == 1 for v in videos)
    print(
        f"held-out per set: {len(videos)} samples ({n_img} images, {len(videos) - n_img} videos "
        f"of {args.frames} frames), {args.size[0]}x{args.size[1]}; compression {comp}, "
        f"{trained.cfg.latent_channels} latent channels; trained {args.steps} steps on "
        f"data.source={args.source} in {train_s:.0f} s (train-batch PSNR at the end "
        f"{last.get('psnr', float('nan')):.2f} dB)\n"
    )
    print(
        "| method | synthetic PSNR (dB) | synthetic SSIM | photo pans PSNR (dB) | photo pans SSIM |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['synthetic_psnr']:.2f} | {r['synthetic_ssim']:.3f} | "
            f"{r['pan_psnr']:.2f} | {r['pan_ssim']:.3f} |"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "train_seconds": train_s, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

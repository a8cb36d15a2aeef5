"""vdit's causal VAE (JAX, jitted) vs diffusers' AutoencoderKLWan (the Wan2.1 VAE, PyTorch eager) at
matched size on this CPU: train-step time and encode time.

    pip install -e '.[bench]'       # torch and diffusers (see BUILD.md for the CPU-only torch wheel)
    python bench/vae_torch.py                   # base 32, 17 frames at 32x32 (~5 min on 2 cores)
    python bench/vae_torch.py --frames 33                   # a longer video (~7 min)
    python bench/vae_torch.py --frames 17 33 --size 64 64   # larger: several times slower

Both networks are randomly initialised (no weights are downloaded) at the same shape: 4x8x8
compression to `--latent-channels`, channels `base * (1, 2, 4, 4)`, `--blocks` ResNet blocks per
encoder level (decoder: one more), a per-frame spatial attention in the mid blocks, RMS norms, causal
3x3x3 convolutions, zero padding before the first frame. What still differs is each design's own
choice and shows in the parameter counts: Wan downsamples with a 2D strided conv plus a (3,1,1) time
conv and halves the channels in each decoder upsampling, where vdit uses one 3x3x3 strided conv and
keeps the channels; Wan adds 1x1 quant / post-quant convs.

- train step: encode, posterior sample, decode, L1 reconstruction + 1e-4 KL, backward, global-norm
  clip 1.0, AdamW (lr 1e-3, betas 0.9 / 0.99, no weight decay) and a 0.99 EMA of the parameters.
  vdit: `VAETask.jit_train_step` (configs/vae.py with the widths above; also skips NaN steps).
  Wan: the same loss on `encode(x).latent_dist.sample()` -> `decode(z).sample` in eager mode (its
  encode / decode run their own causal chunk loops, 4 frames / 1 latent frame at a time),
  `torch.nn.utils.clip_grad_norm_`, `torch.optim.AdamW(foreach=True)`, `torch._foreach_lerp_` EMA.
- encode: the posterior mean of the same video; vdit jitted (`jax.jit` of `model.encode`), Wan
  `encode` under `torch.no_grad()`.

Timings alternate vdit / torch call by call after one warm-up each (vdit's compile excluded, and
reported); the table gives medians and the ratio torch / vdit (> 1: vdit faster). Both run on the
same cores: torch with `--threads` intra-op threads (default: all cores), XLA's CPU backend with its
default pool of one thread per core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

try:
    import torch
    from diffusers import AutoencoderKLWan
except ImportError as e:  # the bench extra is optional
    raise SystemExit(
        f"bench/vae_torch.py needs torch and diffusers ({e}); install them with "
        "pip install -e '.[bench]'"
    ) from None

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from vdit import configlib  # noqa: E402
from vdit.models import vae  # noqa: E402
from vdit.train.vae_task import VAETask  # noqa: E402

KL_WEIGHT = 1e-4


def load_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vae_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def vdit_config(args):
    c = load_config(args.config)
    c.vae.base_channels = args.base_channels
    c.vae.latent_channels = args.latent_channels
    c.vae.channel_mults = (1, 2, 4, 4)
    c.vae.temporal_down = (False, True, True)
    c.vae.blocks_per_level = args.blocks
    c.vae.mid_attention = True
    c.vae.norm = "rms"
    c.vae.temporal_kernel = 3
    c.vae.pad_mode = "zeros"
    c.loss.l1_weight, c.loss.l2_weight, c.loss.kl_weight = 1.0, 0.0, KL_WEIGHT
    c.loss.sample_posterior = True
    c.optim.lr, c.optim.b1, c.optim.b2 = 1e-3, 0.9, 0.99
    c.optim.weight_decay, c.optim.grad_clip, c.optim.ema_decay = 0.0, 1.0, 0.99
    c.mesh.data = 1
    return configlib.load(c, 1)


def wan_model(args) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=args.base_channels,
        z_dim=args.latent_channels,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=args.blocks,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
    )


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TorchStep:
    """One optimizer step of the Wan VAE, the loss and update of vdit's VAE trainer."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, foreach=True
        )
        self.ema = [p.detach().clone() for p in self.params]

    def __call__(self, x: torch.Tensor) -> float:
        post = self.model.encode(x).latent_dist
        recon = self.model.decode(post.sample()).sample
        l1 = (recon - x[:, :, : recon.shape[2]]).abs().mean()
        kl = 0.5 * torch.mean(post.mean.square() + post.logvar.exp() - 1.0 - post.logvar)
        loss = l1 + KL_WEIGHT * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - 0.99)
        return float(loss.detach())


def timed(fn, name: str = "") -> float:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    if name:
        print(f"# {name}: {dt:.2f} s", file=sys.stderr, flush=True)
    return dt


def bench_shape(args, frames: int, trainer, step_fn, enc_fn, enc_state, wan, tstep) -> dict:
    h, w = args.size
    rng = np.random.default_rng(frames)
    video = rng.uniform(-1, 1, (args.batch, frames, h, w, 3)).astype(np.float32)
    xj = jax.device_put(jnp.asarray(video), trainer.batch_sharding(video.shape))
    xt = torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3)))  # (B, C, T, H, W)

    holder = {"state": trainer.state.init()}  # the step donates its state

    def vdit_step():
        holder["state"], metrics = step_fn(holder["state"], xj)
        jax.block_until_ready(metrics["loss"])

    vdit_enc = lambda: jax.block_until_ready(enc_fn(enc_state, xj))

    def torch_enc():
        with torch.no_grad():
            wan.encode(xt).latent_dist.mean.sum().item()

    tag = f"{frames} frames, first call of"
    compile_step = timed(vdit_step, f"{tag} vdit step")  # the first call compiles
    compile_enc = timed(vdit_enc, f"{tag} vdit encode")
    warm_torch_step = timed(lambda: tstep(xt), f"{tag} Wan step")
    warm_torch_enc = timed(torch_enc, f"{tag} Wan encode")
    res = {"vdit_step": [], "torch_step": [], "vdit_encode": [], "torch_encode": []}
    for i in range(args.reps):
        # alternate which goes first, so a slow phase of a shared machine hits both
        pairs = [("vdit_step", vdit_step), ("torch_step", lambda: tstep(xt))]
        for name, fn in pairs if i % 2 == 0 else pairs[::-1]:
            res[name].append(timed(fn, f"{frames} frames, {name}"))
    for i in range(args.reps):
        pairs = [("vdit_encode", vdit_enc), ("torch_encode", torch_enc)]
        for name, fn in pairs if i % 2 == 0 else pairs[::-1]:
            res[name].append(timed(fn, f"{frames} frames, {name}"))
    med = {k: statistics.median(v) for k, v in res.items()}
    return {
        "frames": frames,
        "shape": [args.batch, frames, h, w, 3],
        "times": res,
        "median_s": med,
        "step_ratio_torch_over_vdit": med["torch_step"] / med["vdit_step"],
        "encode_ratio_torch_over_vdit": med["torch_encode"] / med["vdit_encode"],
        "vdit_step_first_call_s": compile_step,
        "vdit_encode_first_call_s": compile_enc,
        "torch_step_first_call_s": warm_torch_step,
        "torch_encode_first_call_s": warm_torch_enc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "vae.py"))
    ap.add_argument("--base-channels", type=int, default=32)
    ap.add_argument("--latent-channels", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=2, help="ResNet blocks per encoder level")
    ap.add_argument("--frames", type=int, nargs="+", default=[17])
    ap.add_argument("--size", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "vae_torch.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    c = vdit_config(args)
    trainer = VAETask(c, jax.devices()[:1])
    step_fn = trainer.jit_train_step()
    graphdef, enc_state = nnx.split(vae.CausalVAE3D(trainer.model_cfg, rngs=nnx.Rngs(c.seed)))
    enc_fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)[0])
    leaves = jax.tree.leaves(trainer.state.abstract["params"])
    n_vdit = sum(int(np.prod(x.shape)) for x in leaves)
    n_vdit_enc = sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state.abstract["params"]["encoder"])
    )
    wan = wan_model(args)
    n_wan = count(wan)
    n_wan_enc = count(wan.encoder) + count(wan.quant_conv)
    tstep = TorchStep(wan)

    rows = [
        bench_shape(args, f, trainer, step_fn, enc_fn, enc_state, wan, tstep) for f in args.frames
    ]

    ct, ch, cw = trainer.model_cfg.compression
    print(
        f"matched size: base {args.base_channels} x (1, 2, 4, 4), {args.blocks} blocks per level, "
        f"{ct}x{ch}x{cw} to {args.latent_channels} channels, mid attention; parameters: vdit "
        f"{n_vdit:,} (encoder {n_vdit_enc:,}), Wan {n_wan:,} (encoder + quant conv "
        f"{n_wan_enc:,}); batch {args.batch}, {args.size[0]}x{args.size[1]}, float32; "
        f"torch {torch.__version__} eager, {torch.get_num_threads()} threads; jax "
        f"{jax.__version__} jitted, XLA CPU ({os.cpu_count()} cores); median of {args.reps}, "
        f"interleaved\n"
    )
    print(
        "| frames | vdit step (s) | Wan step (s) | step torch/vdit | vdit encode (s) "
        "| Wan encode (s) | encode torch/vdit | vdit compile step / encode (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["median_s"]
        print(
            f"| {r['frames']} | {m['vdit_step']:.2f} | {m['torch_step']:.2f} "
            f"| {r['step_ratio_torch_over_vdit']:.2f} | {m['vdit_encode']:.3f} "
            f"| {m['torch_encode']:.3f} | {r['encode_ratio_torch_over_vdit']:.2f} "
            f"| {r['vdit_step_first_call_s']:.0f} / {r['vdit_encode_first_call_s']:.0f} |"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(
            {
                "args": vars(args),
                "params": {
                    "vdit": n_vdit,
                    "wan": n_wan,
                    "vdit_encoder": n_vdit_enc,
                    "wan_encoder": n_wan_enc,
                },
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "jax": jax.__version__,
                "cpu_count": os.cpu_count(),
                "rows": rows,
            },
            fh,
            indent=1,
        )


if __name__ == "__main__":
    main()

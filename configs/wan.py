"""Wan2.1's text-to-video DiT as a vdit config: fine-tune open weights with packing, export them back.

    vdit import  --config=configs/wan.py --from=Wan2.1-T2V-1.3B-Diffusers \\
                 --out=imports/wan13b                                         # diffusers -> vdit
    vdit train   --config=configs/wan.py:1.3B --workdir=runs/wan13b \\
                 --config.train.init_from=imports/wan13b \\
                 --config.data.latents.path=data/latents                      # packed fine-tuning
    vdit export  --workdir=runs/wan13b --out=exports/wan13b --format=diffusers   # vdit -> diffusers
    vdit compile --config=configs/wan.py:14B --topology=v5p-8                  # memory on a slice

The argument after ':' picks the size: "1.3B" (Wan2.1-T2V-1.3B: 30 blocks, width 1536, 12 heads,
MLP 8960), "14B" (40 blocks, width 5120, 40 heads, MLP 13824), or "tiny" (2 blocks of width 64, for
tests; pixel space with the identity autoencoder so that it trains on prepared records on a CPU).
The block is vdit's own with Wan2.1's options: affine LayerNorm before cross-attention
(`model.cross_norm="layer"`), RMSNorm on q and k over the whole width, the 3D RoPE split t=44,
h=w=42 of a 128-dim head, a tanh-GELU MLP of `model.mlp_dim`, and precomputed text embeddings
(umT5-XXL, 4096 wide; vdit/data/text_embeddings.py has the format). Everything else is
configs/default.py, overridable with --config.FIELD=VALUE.

Latents are those of Wan2.1's VAE (16 channels, 4x in time and 8x8 in space): 81 frames of 1280x720
are 21x90x160 latents, 75600 tokens at patch 1x2x2; a row holds one such video or several smaller
ones, each with its own caption embedding (at most `model.text.max_len` = 512 tokens).
"""

import importlib.util
import os

import ml_collections

# (width, depth, heads, MLP hidden) of each size
SIZES = {
    "tiny": (64, 2, 4, 160),
    "1.3B": (1536, 30, 12, 8960),
    "14B": (5120, 40, 40, 13824),
}
DEFAULT_VARIANT = "1.3B"


def _default():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    spec = importlib.util.spec_from_file_location("vdit_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or DEFAULT_VARIANT
    if size not in SIZES:
        raise ValueError(f"configs/wan.py:{size}: not one of {', '.join(SIZES)}")
    width, depth, heads, mlp = SIZES[size]
    c = _default().get_config("mu/2")  # "mu/2": the spatial patch 2; the sizes are set below
    m = c.model
    m.width, m.depth, m.heads = width, depth, heads
    m.mlp_dim = mlp  # F: the MLP hidden width (Wan's ffn_dim)
    m.patch_t = 1  # patch (1, 2, 2)
    m.qk_norm = True  # Wan's qk_norm="rms_norm_across_heads": RMSNorm over the whole width
    m.cross_norm = "layer"  # Wan's cross_attn_norm=True: affine LayerNorm before cross-attention
    m.pos_embed = "none"  # Wan2.1 has RoPE only (no absolute position embedding)
    m.rope_theta = 10_000.0
    m.text.kind = "precomputed"  # caption embeddings in the records (umT5-XXL for Wan2.1)
    m.text.width = 4096  # E: Wan's text_dim
    m.text.max_len = 512  # caption tokens per sample (Wan's text length)
    c.data.caption_dropout = 0.1  # caption dropout -> the folder's text_null.npy embedding

    if size == "tiny":  # pixel space, small enough to train and compare on a CPU
        m.text.width = 32
        m.text.max_len = 16
        c.data.text_len = 64
        c.sample.grid_shape = (4, 16, 16)
        return c

    m.dtype = "bfloat16"  # compute dtype
    m.param_dtype = "float32"  # parameters and optimizer state
    m.remat = "full"  # recompute each block in the backward pass (75600-token rows)
    m.attn_impl = "auto"  # splash on TPU
    m.attn_block = 512

    c.autoencoder.kind = "latent"  # Wan2.1's VAE latents (`vdit encode`)
    c.autoencoder.compression = (4, 8, 8)
    c.autoencoder.channels = 16
    c.data.source = "latents"
    c.data.latents.path = ""  # the folder `vdit encode` wrote (required to train)
    c.data.latents.sample_posterior = False  # Wan trains on the posterior mean
    c.data.row_len = 75600  # one 81x1280x720 video (21x45x80 patches), or several smaller ones
    c.data.max_tokens_per_sample = 75600
    c.data.text_len = 2048  # caption tokens per row (up to 4 captions of 512)
    c.data.max_samples_per_row = 16
    c.data.batch_rows = 8  # global rows per step (scaled to the slice by `vdit compile`)
    c.data.min_side = 0

    # Wan samples 480p with shift 3 and 720p with shift 5: the shift grows with sqrt(tokens)
    c.flow.shift_ref_tokens = 32760  # 81x832x480 (21x30x52 patches)
    c.flow.shift_at_ref = 3.0
    c.flow.shift_max = 5.0

    c.optim.lr = 1e-5  # fine-tuning
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.999
    c.train.steps = 2000
    c.train.checkpoint_every = 250
    c.train.init_from = ""  # a `vdit import` directory (the open weights)

    c.sample.steps = 50
    c.sample.cfg_scale = 5.0
    c.sample.grid_prompts = ("a red fox runs through snow",)
    c.sample.grid_shape = (81, 480, 832)  # pixels: 21x60x104 latents

    c.mesh.data = 1
    c.mesh.fsdp = -1  # the parameters, optimizer state and rows over every device
    return c

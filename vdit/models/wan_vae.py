"""Wan2.1's video VAE (diffusers' `AutoencoderKLWan`) as the encoder and decoder of `CausalVAE3D`
(`VAEConfig(arch="wan")`; vdit/interop/wan_vae.py maps its weights from and to diffusers).

Channels last: videos (B, T, H, W, C). The module tree follows diffusers' names, so that a weight's
name differs only where nnx needs it to (`resample.1` -> `spatial`, `upsamplers.0` -> `upsampler`,
`quant_conv` inside the encoder, `post_quant_conv` inside the decoder):

    encoder: conv_in -> down_blocks (per level `blocks_per_level` ResBlocks, then a Resample on all
             levels but the last) -> mid_block (ResBlock, attention, ResBlock) -> RMSNorm, SiLU,
             conv_out (2Z) -> quant_conv (1x1x1)
    decoder: post_quant_conv (1x1x1) -> conv_in -> mid_block -> up_blocks (blocks_per_level + 1
             ResBlocks, then a Resample on all levels but the last, which halves the channels)
             -> RMSNorm, SiLU, conv_out

What the layers compute, as diffusers does (its encode and decode run chunk by chunk with feature
caches: the first frame alone, then 4 frames at a time; one latent frame at a time):
- Causal 3x3x3 convolutions pad the past side with two zero frames (`pad_mode="zeros"`).
- RMSNorm is `x / max(|x|_2, 1e-12) * sqrt(C) * gamma` over the channels of each pixel.
- Attention is single-head over the pixels of each frame (scale 1/sqrt(C)).
- Spatial downsampling: per-frame 3x3 convolution of stride 2 after zero padding on the bottom and
  right only. Time downsampling (after it): the first frame passes unchanged, then a (3, 1, 1)
  convolution of stride 2 without padding over the frames (frame k >= 1 sees frames 2k-2 .. 2k).
- Time upsampling: the first latent frame passes unchanged; the others go through a causal (3, 1, 1)
  convolution (zero padded, as if they began the video) to 2C channels, the two halves being the two
  output frames; then spatial nearest x2 and a per-frame 3x3 convolution to C/2 channels.
So a full call equals diffusers' chunked one, and with `vae_layers.ConvCache` any chunking does too.
diffusers clamps decoded pixels to [-1, 1]; `decode` here does not (training needs the gradient),
clip where pixels are shown.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from vdit.models import layers
from vdit.models.vae_layers import CausalConv3d, ConvCache, _normal, conv_kw

if TYPE_CHECKING:
    from vdit.models.vae import VAEConfig


class RMSNorm(nnx.Module):
    """Wan's RMS norm over the channels of a pixel: x / max(|x|_2, 1e-12) * sqrt(C) * scale."""

    def __init__(self, dim: int, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("vae_out",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., C)
        xf = x.astype(jnp.float32)
        sq = jnp.sum(jnp.square(xf), -1, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.maximum(sq, 1e-24)) * math.sqrt(x.shape[-1])
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class FrameConv(nnx.Module):
    """A 3x3 convolution of each frame alone (diffusers' Conv2d over B*T), explicit spatial padding."""

    def __init__(
        self, cin: int, cout: int, padding, stride: int, cfg: VAEConfig, *, rngs: nnx.Rngs
    ):
        shape = (3, 3, cin, cout)
        pdt = jnp.dtype(cfg.param_dtype)
        self.kernel = nnx.Param(
            _normal(rngs.params(), shape, 9 * cin, pdt),
            out_sharding=(None, None, "vae_in", "vae_out"),
        )
        self.bias = nnx.Param(jnp.zeros((cout,), pdt), out_sharding=("vae_out",))
        self.padding = tuple(tuple(p) for p in padding)
        self.stride = stride
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, T, H, W, C)
        b, t = x.shape[:2]
        y = jax.lax.conv_general_dilated(
            x.reshape(b * t, *x.shape[2:]).astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, t, *y.shape[1:])


class ResBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = conv_kw(cfg, rngs)
        pdt = jnp.dtype(cfg.param_dtype)
        self.norm1 = RMSNorm(cin, pdt)
        self.conv1 = CausalConv3d(cin, cout, (3, 3, 3), **kw)
        self.norm2 = RMSNorm(cout, pdt)
        self.conv2 = CausalConv3d(cout, cout, (3, 3, 3), **kw)
        self.conv_shortcut = CausalConv3d(cin, cout, (1, 1, 1), **kw) if cin != cout else None

    def __call__(self, x: jax.Array, cache: ConvCache | None) -> jax.Array:
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = self.conv1(jax.nn.silu(self.norm1(x)), cache)
        h = self.conv2(jax.nn.silu(self.norm2(h)), cache)
        return h + skip


class Attention(nnx.Module):
    """Single-head self-attention over the pixels of each frame, with a residual."""

    def __init__(self, dim: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.norm = RMSNorm(dim, jnp.dtype(cfg.param_dtype))
        self.to_qkv = layers.dense(dim, 3 * dim, ("vae_in", "vae_out"), **kw)
        self.proj = layers.dense(dim, dim, ("vae_in", "vae_out"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, T, H, W, C)
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # (N, Q, C) each
        s = jnp.einsum("nqc,nkc->nqk", q, k).astype(jnp.float32) / math.sqrt(c)
        o = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(s, -1).astype(v.dtype), v)
        return x + self.proj(o).reshape(x.shape)


class MidBlock(nnx.Module):
    def __init__(self, dim: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResBlock(dim, dim, cfg, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([Attention(dim, cfg, rngs=rngs)])

    def __call__(self, x: jax.Array, cache: ConvCache | None) -> jax.Array:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


RESAMPLE_MODES = ("down2d", "down3d", "up2d", "up3d")


class Resample(nnx.Module):
    """Halve H, W (and T: "down3d") or double them (and T: "up3d"; the channels halve on the way up)."""

    def __init__(self, dim: int, mode: str, cfg: VAEConfig, *, rngs: nnx.Rngs):
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"resample mode {mode!r} is not one of {RESAMPLE_MODES}")
        self.mode = mode
        kw = conv_kw(cfg, rngs)
        if mode.startswith("up"):
            self.spatial = FrameConv(dim, dim // 2, ((1, 1), (1, 1)), 1, cfg, rngs=rngs)
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), **kw) if mode == "up3d" else None
        else:
            self.spatial = FrameConv(dim, dim, ((0, 1), (0, 1)), 2, cfg, rngs=rngs)
            self.time_conv = (
                CausalConv3d(dim, dim, (3, 1, 1), (2, 1, 1), **kw) if mode == "down3d" else None
            )

    def __call__(self, x: jax.Array, cache: ConvCache | None) -> jax.Array:
        if self.mode == "up3d":
            x = self._time_up(x, cache)
        if self.mode.startswith("up"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest x2
        x = self.spatial(x)
        if self.mode == "down3d":
            x = self._time_down(x, cache)
        return x

    def _time_down(self, x: jax.Array, cache: ConvCache | None) -> jax.Array:
        """Frame 0 as it is (at the start of the video), then frames (2k-2, 2k-1, 2k) -> frame k."""
        first = cache is None or cache.first

        def joined(prev):
            return x if prev is None else jnp.concatenate([prev.astype(x.dtype), x], axis=1)

        xs = joined(None) if cache is None else cache.exchange(joined)
        if cache is not None:
            cache.new.append(xs[:, xs.shape[1] - 1 :])  # the next window starts at the last frame
        y = self.time_conv.conv(xs) if xs.shape[1] >= 3 else None
        if not first:
            if y is None:
                raise ValueError(
                    f"a later chunk of {x.shape[1]} frames reaches no time-downsampling window; "
                    "chunks after the first need a multiple of the temporal compression"
                )
            return y
        head = x[:, :1]
        return head if y is None else jnp.concatenate([head.astype(y.dtype), y], axis=1)

    def _time_up(self, x: jax.Array, cache: ConvCache | None) -> jax.Array:
        """Frame 0 as it is (at the start of the video); every later frame -> two frames."""
        first = cache is None or cache.first
        head, rest = (x[:, :1], x[:, 1:]) if first else (None, x)

        def padded(prev):
            if prev is None:  # the frames after the first begin a zero-padded causal sequence
                prev = jnp.zeros((rest.shape[0], 2, *rest.shape[2:]), rest.dtype)
            return jnp.concatenate([prev.astype(rest.dtype), rest], axis=1)

        xs = padded(None) if cache is None else cache.exchange(padded)
        if cache is not None:
            cache.new.append(xs[:, xs.shape[1] - 2 :])
        if xs.shape[1] < 3:  # no frame after the first
            return head
        y = self.time_conv.conv(xs)  # (B, t, H, W, 2C): channel j * C + c is frame 2t + j
        b, t, h, w, c2 = y.shape
        y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)
        y = y.reshape(b, 2 * t, h, w, c2 // 2)
        return y if head is None else jnp.concatenate([head.astype(y.dtype), y], axis=1)


class UpBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, blocks: int, mode: str | None, cfg: VAEConfig, *, rngs):
        res = []
        for _ in range(blocks):
            res.append(ResBlock(cin, cout, cfg, rngs=rngs))
            cin = cout
        self.resnets = nnx.List(res)
        self.upsampler = Resample(cout, mode, cfg, rngs=rngs) if mode else None

    def __call__(self, x: jax.Array, cache: ConvCache | None) -> jax.Array:
        for block in self.resnets:
            x = block(x, cache)
        return x if self.upsampler is None else self.upsampler(x, cache)


class Encoder(nnx.Module):
    """(B, T, H, W, 3) -> moments (B, t, h, w, 2Z): mean and log-variance, after quant_conv."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = conv_kw(cfg, rngs)
        mults = tuple(cfg.channel_mults)
        dims = [cfg.base_channels * m for m in (1, *mults)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], (3, 3, 3), **kw)
        blocks: list[nnx.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.blocks_per_level):
                blocks.append(ResBlock(cin, cout, cfg, rngs=rngs))
                cin = cout
            if i < len(mults) - 1:
                mode = "down3d" if cfg.temporal_down[i] else "down2d"
                blocks.append(Resample(cout, mode, cfg, rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], cfg, rngs=rngs)
        self.norm_out = RMSNorm(dims[-1], jnp.dtype(cfg.param_dtype))
        z2 = 2 * cfg.latent_channels
        self.conv_out = CausalConv3d(dims[-1], z2, (3, 3, 3), **kw)
        self.quant_conv = CausalConv3d(z2, z2, (1, 1, 1), **kw)

    def __call__(self, x: jax.Array, cache: ConvCache | None = None) -> jax.Array:
        h = self.conv_in(x, cache)
        for block in self.down_blocks:
            h = block(h, cache)
        h = self.mid_block(h, cache)
        h = self.conv_out(jax.nn.silu(self.norm_out(h)), cache)
        return self.quant_conv(h)


class Decoder(nnx.Module):
    """(B, t, h, w, Z) -> (B, 1 + (t - 1) * ct, h * ch, w * cw, 3), not clamped."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = conv_kw(cfg, rngs)
        mults = tuple(cfg.channel_mults)
        dims = [cfg.base_channels * m for m in (mults[-1], *mults[::-1])]
        tup = tuple(cfg.temporal_down)[::-1]
        z = cfg.latent_channels
        self.post_quant_conv = CausalConv3d(z, z, (1, 1, 1), **kw)
        self.conv_in = CausalConv3d(z, dims[0], (3, 3, 3), **kw)
        self.mid_block = MidBlock(dims[0], cfg, rngs=rngs)
        ups = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                cin //= 2  # the previous level's upsampling halved the channels
            mode = None
            if i < len(mults) - 1:
                mode = "up3d" if tup[i] else "up2d"
            ups.append(UpBlock(cin, cout, cfg.blocks_per_level + 1, mode, cfg, rngs=rngs))
        self.up_blocks = nnx.List(ups)
        self.norm_out = RMSNorm(dims[-1], jnp.dtype(cfg.param_dtype))
        self.conv_out = CausalConv3d(dims[-1], cfg.in_channels, (3, 3, 3), **kw)

    def __call__(self, z: jax.Array, cache: ConvCache | None = None) -> jax.Array:
        h = self.conv_in(self.post_quant_conv(z), cache)
        h = self.mid_block(h, cache)
        for block in self.up_blocks:
            h = block(h, cache)
        return self.conv_out(jax.nn.silu(self.norm_out(h)), cache)

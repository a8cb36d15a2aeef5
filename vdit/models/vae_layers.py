"""The causal VAE's building blocks: causal 3D convolutions (with the cache that makes chunked runs
exact), norms, ResNet blocks, per-frame attention, the mid block and causal upsampling.

Every temporal convolution pads on the past side only, so no output frame depends on a later input
frame (see vdit/models/vae.py for the network they make).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdit.models import layers

if TYPE_CHECKING:
    from vdit.models.vae import VAEConfig


# ----------------------------------------------------------------------------------------------------
# Causal convolution with a carried cache
# ----------------------------------------------------------------------------------------------------
class ConvCache:
    """The temporal state of every causal convolution, in call order, for one chunk.

    `prev` holds what the previous chunk left (None: this is the first chunk, pad the past side);
    the convolutions append what the next chunk needs to `new`. The call order of a network is fixed, so
    the lists line up from chunk to chunk; both are pytrees of arrays, so a chunk step can be jitted.
    """

    def __init__(self, prev: Sequence[jax.Array] | None = None):
        self.prev = None if prev is None else list(prev)
        self.new: list[jax.Array] = []

    @property
    def first(self) -> bool:
        return self.prev is None

    def exchange(self, tail: Callable[[jax.Array | None], jax.Array]) -> jax.Array:
        """Hands this layer's previous state to `tail`, which returns its padded input."""
        prev = None if self.prev is None else self.prev[len(self.new)]
        return tail(prev)


def _normal(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    """LeCun-normal values N(0, 1/fan_in). Outside a trace they are drawn by numpy, seeded by the key's
    bits: building the model eagerly then compiles no random-number kernel per parameter shape (on CPU
    these compiles cost far more than the whole draw). Traced (eval_shape, jit) they come from jax."""
    std = 1.0 / math.sqrt(fan_in)
    if isinstance(key, jax.core.Tracer):
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * std, dtype)


class CausalConv3d(nnx.Module):
    """3D convolution, channels last, causal in time, zero "same" padding in space."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel=(3, 3, 3),
        stride=(1, 1, 1),
        *,
        pad_mode: str = "replicate",
        zero: bool = False,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kt = kernel[0]
        if kt < stride[0]:
            raise ValueError(f"temporal kernel {kt} is shorter than its stride {stride[0]}")
        shape = (*kernel, cin, cout)
        value = (
            jnp.zeros(shape, param_dtype)
            if zero
            else _normal(rngs.params(), shape, math.prod(shape[:-1]), param_dtype)
        )
        self.kernel = nnx.Param(value, out_sharding=(None, None, None, "vae_in", "vae_out"))
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype), out_sharding=("vae_out",))
        self.ksize = tuple(kernel)
        self.stride = tuple(stride)
        self.pad_mode = pad_mode
        self.dtype = dtype

    def __call__(self, x: jax.Array, cache: ConvCache | None = None) -> jax.Array:
        kt = self.ksize[0]
        st = self.stride[0]
        x = x.astype(self.dtype)
        if kt > 1:

            def padded(prev):
                if prev is None:
                    first = x[:, :1] if self.pad_mode == "replicate" else jnp.zeros_like(x[:, :1])
                    prev = jnp.repeat(first, kt - 1, axis=1)
                return jnp.concatenate([prev.astype(x.dtype), x], axis=1)

            x = padded(None) if cache is None else cache.exchange(padded)
            if cache is not None:
                # frames the next chunk's first output window reaches back to
                cache.new.append(x[:, x.shape[1] - (kt - st) :])
        return self.conv(x)

    def conv(self, x: jax.Array) -> jax.Array:
        """The convolution of an input already padded in time (valid in time, "same" in space)."""
        kh, kw = self.ksize[1:]
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=self.stride,
            padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return y + self.bias[...].astype(self.dtype)


# ----------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------
class Norm(nnx.Module):
    """RMSNorm over channels per pixel, or GroupNorm per frame (statistics over H, W and a group)."""

    def __init__(self, dim: int, kind: str, groups: int, param_dtype=jnp.float32):
        self.kind = kind
        if kind == "rms":
            self.rms = layers.RMSNorm(dim, "vae_out", param_dtype=param_dtype)
        else:
            self.groups = math.gcd(groups, dim)
            self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("vae_out",))
            self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("vae_out",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, T, H, W, C)
        if self.kind == "rms":
            return self.rms(x)
        b, t, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(b, t, h, w, self.groups, c // self.groups)
        mean = xf.mean((2, 3, 5), keepdims=True)
        var = jnp.square(xf - mean).mean((2, 3, 5), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(x.shape)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class ResBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = conv_kw(cfg, rngs)
        k = (cfg.temporal_kernel, 3, 3)
        self.norm1 = Norm(cin, cfg.norm, cfg.groups, jnp.dtype(cfg.param_dtype))
        self.conv1 = CausalConv3d(cin, cout, k, **kw)
        self.norm2 = Norm(cout, cfg.norm, cfg.groups, jnp.dtype(cfg.param_dtype))
        self.conv2 = CausalConv3d(cout, cout, k, **kw)
        self.skip = CausalConv3d(cin, cout, (1, 1, 1), **kw) if cin != cout else None

    def __call__(self, x: jax.Array, cache: ConvCache | None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)), cache)
        h = self.conv2(jax.nn.silu(self.norm2(h)), cache)
        return h + (x if self.skip is None else self.skip(x))


class FrameAttention(nnx.Module):
    """Single-head self-attention over the pixels of each frame (causal in time: frames never mix)."""

    def __init__(self, dim: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.norm = Norm(dim, cfg.norm, cfg.groups, jnp.dtype(cfg.param_dtype))
        self.qkv = layers.dense(dim, 3 * dim, ("vae_in", "vae_out"), **kw)
        self.out = layers.dense(dim, dim, ("vae_in", "vae_out"), zero=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b * t, h * w, 3 * c), 3, axis=-1)
        s = jnp.einsum("nqc,nkc->nqk", q, k).astype(jnp.float32) / math.sqrt(c)
        o = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(s, -1).astype(v.dtype), v)
        return x + self.out(o).reshape(x.shape)


class MidBlock(nnx.Module):
    def __init__(self, dim: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.res1 = ResBlock(dim, dim, cfg, rngs=rngs)
        self.attn = FrameAttention(dim, cfg, rngs=rngs) if cfg.mid_attention else None
        self.res2 = ResBlock(dim, dim, cfg, rngs=rngs)

    def __call__(self, x, cache):
        x = self.res1(x, cache)
        if self.attn is not None:
            x = self.attn(x)
        return self.res2(x, cache)


class Upsample(nnx.Module):
    """Nearest x2 in space (and in time, every frame but the very first), then a causal conv."""

    def __init__(self, dim: int, temporal: bool, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.temporal = temporal
        self.conv = CausalConv3d(dim, dim, (cfg.temporal_kernel, 3, 3), **conv_kw(cfg, rngs))

    def __call__(self, x, cache):
        if self.temporal:
            first = cache is None or cache.first
            rep = jnp.repeat(x, 2, axis=1)
            x = rep[:, 1:] if first else rep  # the first frame of the video stays one frame
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return self.conv(x, cache)


def conv_kw(cfg: VAEConfig, rngs: nnx.Rngs) -> dict:
    return dict(
        pad_mode=cfg.pad_mode,
        rngs=rngs,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
    )

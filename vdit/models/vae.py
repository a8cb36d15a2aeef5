"""CausalVAE3D: a causal 3D convolutional video autoencoder (the compression network of the DiT).

Videos are (B, T, H, W, 3) in [-1, 1], channels last. Every temporal convolution is causal: its input
is padded on the past side only (with copies of the first frame, or zeros), so an output frame never
depends on a later input frame. The first frame is therefore encoded alone and an image is a one-frame
video: T pixel frames give 1 + (T - 1) // ct latent frames, and t latent frames decode to
1 + (t - 1) * ct pixel frames (ct = 2 ** number of time-downsampling levels).

Layout (SD/Wan-style): conv_in -> per level `blocks_per_level` ResNet blocks then a downsampling
convolution (stride 2 in space, and 2 in time on the levels flagged in `temporal_down`) -> a mid block
(ResNet, optional per-frame spatial attention, ResNet) -> norm, SiLU, conv_out to (mean, logvar). The
decoder mirrors it with nearest-neighbour upsampling followed by a convolution; temporal upsampling
repeats every frame but the first, so it stays causal.

Long videos: `encode_chunked` / `decode_chunked` run the network over consecutive groups of frames and
carry each causal convolution's cache (the last k - s frames of its padded input) from one group to the
next, which gives exactly the full result. `encode_tiled` / `decode_tiled` split space into overlapping
tiles and blend them; with per-pixel RMSNorm and no attention (the defaults) the only difference to the
full result comes from the zero padding at tile borders inside the receptive field.

Parameters carry logical axis names (`vae_in`, `vae_out` for convolution channels), as the DiT's do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdit.models import layers

NORMS = ("rms", "group")
PAD_MODES = ("replicate", "zeros")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # pixel channels
    latent_channels: int = 16  # z channels
    base_channels: int = 16  # channels of the first level
    channel_mults: tuple[int, ...] = (1, 2, 4, 4)  # per level; len - 1 spatial x2 downsamplings
    blocks_per_level: int = 1  # ResNet blocks per encoder level (the decoder has one more)
    temporal_down: tuple[bool, ...] = (False, True, True)  # which downsamplings also halve time
    norm: str = "rms"  # "rms" (per pixel over channels) | "group" (per frame over H, W, channels)
    groups: int = 8  # GroupNorm groups (norm="group"); clipped to a divisor of the channels
    mid_attention: bool = False  # per-frame spatial self-attention in the mid blocks
    temporal_kernel: int = 3  # kt of the causal convolutions
    pad_mode: str = "replicate"  # past-side padding of the first chunk: "replicate" | "zeros"
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        """Every check on these fields; a message starts with the field it names."""
        mults = tuple(self.channel_mults)
        if not mults or min(mults) < 1:
            raise ValueError(f"channel_mults: {mults} must be a non-empty tuple of positive ints")
        if len(self.temporal_down) != len(mults) - 1:
            raise ValueError(
                f"temporal_down: {tuple(self.temporal_down)} has {len(self.temporal_down)} "
                f"entries, need one per downsampling (len(channel_mults) - 1 = {len(mults) - 1})"
            )
        for field in ("in_channels", "latent_channels", "base_channels", "blocks_per_level"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}: {getattr(self, field)} must be >= 1")
        if self.groups < 1:
            raise ValueError(f"groups: {self.groups} must be >= 1")
        if self.norm not in NORMS:
            raise ValueError(f"norm: {self.norm!r} is not one of {NORMS}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode: {self.pad_mode!r} is not one of {PAD_MODES}")
        if self.temporal_kernel < 2:
            raise ValueError(
                f"temporal_kernel: {self.temporal_kernel} must be >= 2 (a strided time "
                "downsampling needs a kernel of at least its stride)"
            )

    @property
    def compression(self) -> tuple[int, int, int]:
        """(ct, ch, cw): pixel frames per latent frame after the first, pixels per latent pixel."""
        s = 2 ** (len(self.channel_mults) - 1)
        return 2 ** sum(bool(d) for d in self.temporal_down), s, s

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.compression[0]

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.compression[0]


class LatentStat(nnx.Variable):
    """Per-channel latent statistics (not trained): DiT training normalises z to (z - mean) / std."""


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
        kt, kh, kw = self.ksize
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
        y = jax.lax.conv_general_dilated(
            x,
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
        kw = _conv_kw(cfg, rngs)
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
        self.conv = CausalConv3d(dim, dim, (cfg.temporal_kernel, 3, 3), **_conv_kw(cfg, rngs))

    def __call__(self, x, cache):
        if self.temporal:
            first = cache is None or cache.first
            rep = jnp.repeat(x, 2, axis=1)
            x = rep[:, 1:] if first else rep  # the first frame of the video stays one frame
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return self.conv(x, cache)


def _conv_kw(cfg: VAEConfig, rngs: nnx.Rngs) -> dict:
    return dict(
        pad_mode=cfg.pad_mode,
        rngs=rngs,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
    )


# ----------------------------------------------------------------------------------------------------
# Encoder, decoder, the VAE
# ----------------------------------------------------------------------------------------------------
class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = _conv_kw(cfg, rngs)
        k = (cfg.temporal_kernel, 3, 3)
        chans = [cfg.base_channels * m for m in cfg.channel_mults]
        self.conv_in = CausalConv3d(cfg.in_channels, chans[0], k, **kw)
        blocks, downs = [], []
        cin = chans[0]
        for i, c in enumerate(chans):
            for _ in range(cfg.blocks_per_level):
                blocks.append(ResBlock(cin, c, cfg, rngs=rngs))
                cin = c
            if i < len(chans) - 1:
                st = 2 if cfg.temporal_down[i] else 1
                downs.append(CausalConv3d(c, c, k, (st, 2, 2), **kw))
        self.blocks = nnx.List(blocks)
        self.downs = nnx.List(downs)
        self.mid = MidBlock(chans[-1], cfg, rngs=rngs)
        self.norm_out = Norm(chans[-1], cfg.norm, cfg.groups, jnp.dtype(cfg.param_dtype))
        self.conv_out = CausalConv3d(chans[-1], 2 * cfg.latent_channels, k, **kw)
        self.per_level = cfg.blocks_per_level

    def __call__(self, x, cache=None):
        h = self.conv_in(x, cache)
        for i, block in enumerate(self.blocks):
            h = block(h, cache)
            level, j = divmod(i, self.per_level)
            if j == self.per_level - 1 and level < len(self.downs):
                h = self.downs[level](h, cache)
        h = self.mid(h, cache)
        return self.conv_out(jax.nn.silu(self.norm_out(h)), cache)


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = _conv_kw(cfg, rngs)
        k = (cfg.temporal_kernel, 3, 3)
        chans = [cfg.base_channels * m for m in cfg.channel_mults][::-1]
        tdown = list(cfg.temporal_down)[::-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, chans[0], k, **kw)
        self.mid = MidBlock(chans[0], cfg, rngs=rngs)
        blocks, ups = [], []
        cin = chans[0]
        for i, c in enumerate(chans):
            for _ in range(cfg.blocks_per_level + 1):
                blocks.append(ResBlock(cin, c, cfg, rngs=rngs))
                cin = c
            if i < len(chans) - 1:
                ups.append(Upsample(c, tdown[i], cfg, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.ups = nnx.List(ups)
        self.norm_out = Norm(chans[-1], cfg.norm, cfg.groups, jnp.dtype(cfg.param_dtype))
        self.conv_out = CausalConv3d(chans[-1], cfg.in_channels, k, **kw)
        self.per_level = cfg.blocks_per_level + 1

    def __call__(self, z, cache=None):
        h = self.mid(self.conv_in(z, cache), cache)
        for i, block in enumerate(self.blocks):
            h = block(h, cache)
            level, j = divmod(i, self.per_level)
            if j == self.per_level - 1 and level < len(self.ups):
                h = self.ups[level](h, cache)
        return self.conv_out(jax.nn.silu(self.norm_out(h)), cache)


class CausalVAE3D(nnx.Module):
    """encode(video) -> (mean, logvar); decode(latent) -> video. Videos (B, T, H, W, 3) in [-1, 1]."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        z = cfg.latent_channels
        self.latent_mean = LatentStat(jnp.zeros((z,), jnp.float32))
        self.latent_std = LatentStat(jnp.ones((z,), jnp.float32))

    # --- shapes -------------------------------------------------------------------------------
    def check_video(self, video: jax.Array) -> jax.Array:
        """Validates (B, T, H, W, C) and drops the trailing frames no latent frame sees."""
        ct, ch, cw = self.cfg.compression
        if video.ndim != 5 or video.shape[-1] != self.cfg.in_channels:
            raise ValueError(
                f"expected a (B, T, H, W, {self.cfg.in_channels}) video, got {video.shape}"
            )
        _, t, h, w, _ = video.shape
        if h % ch or w % cw:
            raise ValueError(
                f"video size {h}x{w} is not a multiple of the spatial compression {ch}x{cw}"
            )
        return video[:, : self.cfg.pixel_frames(self.cfg.latent_frames(t))]

    # --- full --------------------------------------------------------------------------------
    def encode(
        self, video: jax.Array, cache: ConvCache | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(B, T, H, W, 3) -> mean, logvar (B, 1 + (T-1)//ct, H/ch, W/cw, Z).

        With a `cache` of a later chunk the frames continue the video: a multiple of ct of them."""
        if cache is None or cache.first:
            video = self.check_video(video)
        moments = self.encoder(video, cache).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, self.cfg.logvar_min, self.cfg.logvar_max)

    def decode(self, z: jax.Array, cache: ConvCache | None = None) -> jax.Array:
        """(B, t, h, w, Z) -> (B, 1 + (t-1)*ct, h*ch, w*cw, 3)."""
        return self.decoder(z, cache).astype(jnp.float32)

    def __call__(self, video: jax.Array, key: jax.Array | None = None):
        """Reconstruction with a posterior sample (or the mean without `key`); returns (recon, mean,
        logvar)."""
        mean, logvar = self.encode(video)
        z = mean if key is None else sample_posterior(key, mean, logvar)
        return self.decode(z), mean, logvar

    # --- latent normalisation ----------------------------------------------------------------
    def normalize(self, z: jax.Array) -> jax.Array:
        return (z - self.latent_mean[...]) / self.latent_std[...]

    def denormalize(self, z: jax.Array) -> jax.Array:
        return z * self.latent_std[...] + self.latent_mean[...]


def sample_posterior(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The training objective of the VAE (the config's `loss` section): l1 * |x - x'| + l2 *
    (x - x')^2 + kl * KL, each a mean over elements, and the optional adversarial term."""

    l1_weight: float
    l2_weight: float
    kl_weight: float
    sample_posterior: bool  # decode a posterior sample (False: the mean, an autoencoder)
    disc_weight: float  # > 0: adversarial term -disc_weight * mean D(recon); 0: no discriminator
    disc_start: int  # step from which the adversarial term applies and the discriminator trains
    disc_adaptive: bool  # scale disc_weight by |grad rec| / |grad adv| at the last layer

    def __post_init__(self):
        for field in ("l1_weight", "l2_weight", "kl_weight", "disc_weight", "disc_start"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field}: {getattr(self, field)} must be >= 0")
        if self.l1_weight == 0 and self.l2_weight == 0:
            raise ValueError(
                "l1_weight: l1_weight and l2_weight are both 0: nothing to reconstruct"
            )


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element, averaged."""
    return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


# ----------------------------------------------------------------------------------------------------
# Chunked (time) and tiled (space) encode / decode
# ----------------------------------------------------------------------------------------------------
@nnx.jit
def _encode_step(model: CausalVAE3D, x, prev):
    cache = ConvCache(prev)
    mean, logvar = model.encode(x, cache)
    return mean, logvar, cache.new


@nnx.jit
def _decode_step(model: CausalVAE3D, z, prev):
    cache = ConvCache(prev)
    return model.decode(z, cache), cache.new


def encode_chunked(model: CausalVAE3D, video: jax.Array, chunk_frames: int):
    """`model.encode` over the first frame, then groups of `chunk_frames` pixel frames (a multiple of
    ct), carrying the causal caches: equal to the full encode, with memory bounded by the chunk."""
    ct = model.cfg.compression[0]
    if chunk_frames < 1 or chunk_frames % ct:
        raise ValueError(f"chunk_frames={chunk_frames} must be a positive multiple of ct={ct}")
    x = model.check_video(video)
    means, logvars, prev = [], [], None
    for start, stop in _chunks(x.shape[1], chunk_frames):
        m, lv, prev = _encode_step(model, x[:, start:stop], prev)
        means.append(m)
        logvars.append(lv)
    return jnp.concatenate(means, 1), jnp.concatenate(logvars, 1)


def decode_chunked(model: CausalVAE3D, z: jax.Array, chunk_latents: int) -> jax.Array:
    """`model.decode` over the first latent frame, then groups of `chunk_latents` latent frames."""
    if chunk_latents < 1:
        raise ValueError(f"chunk_latents={chunk_latents} must be >= 1")
    outs, prev = [], None
    for start, stop in _chunks(z.shape[1], chunk_latents):
        y, prev = _decode_step(model, z[:, start:stop], prev)
        outs.append(y)
    return jnp.concatenate(outs, 1)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[0, 1), then [1, 1 + size), ... up to n."""
    return [(0, 1)] + [(s, min(s + size, n)) for s in range(1, n, size)]


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    return list(range(0, size - tile, stride)) + [size - tile]


def blend_ramp(n: int, overlap: int, left: bool, right: bool) -> np.ndarray:
    """Weights (n,) of one tile along one axis: on a side shared with a neighbour, the outer quarter of
    the overlap gets 0 (the values nearest the tile border, where its zero padding is felt), the middle
    half a linear ramp, the rest 1."""
    w = np.ones(n, np.float32)
    if overlap <= 0:
        return w
    margin = overlap // 4
    ramp = np.clip((np.arange(overlap) - margin + 1) / (overlap - 2 * margin + 1), 0.0, 1.0)
    if left:
        w[:overlap] = np.minimum(w[:overlap], ramp)
    if right:
        w[n - overlap :] = np.minimum(w[n - overlap :], ramp[::-1])
    return w


def _tiled(fn, x: jax.Array, in_tile: tuple[int, int], in_overlap: tuple[int, int], scale: int):
    """Applies `fn` to overlapping spatial tiles of x (B, T, H, W, C) and blends the outputs, whose
    spatial size is the input's times `scale` (a fraction for the encoder)."""
    h, w = x.shape[2:4]
    acc = weight = None
    ys, xs = _tile_starts(h, in_tile[0], in_overlap[0]), _tile_starts(w, in_tile[1], in_overlap[1])
    for y0 in ys:
        for x0 in xs:
            th, tw = min(in_tile[0], h), min(in_tile[1], w)
            outs = fn(x[:, :, y0 : y0 + th, x0 : x0 + tw])
            oh, ow = outs[0].shape[2:4]
            wy = blend_ramp(oh, int(in_overlap[0] * scale), y0 > 0, y0 + th < h)
            wx = blend_ramp(ow, int(in_overlap[1] * scale), x0 > 0, x0 + tw < w)
            wt = jnp.asarray(wy[:, None] * wx[None, :])[None, None, :, :, None]
            oy, ox = int(y0 * scale), int(x0 * scale)
            if acc is None:
                full = (int(h * scale), int(w * scale))
                acc = [jnp.zeros(o.shape[:2] + full + o.shape[4:], o.dtype) for o in outs]
                weight = jnp.zeros((1, 1, *full, 1), jnp.float32)
            acc = [
                a.at[:, :, oy : oy + oh, ox : ox + ow].add(o * wt)
                for a, o in zip(acc, outs, strict=True)
            ]
            weight = weight.at[:, :, oy : oy + oh, ox : ox + ow].add(wt)
    return [a / weight for a in acc]


def encode_tiled(
    model: CausalVAE3D,
    video: jax.Array,
    tile: tuple[int, int],
    overlap: tuple[int, int],
    chunk_frames: int | None = None,
):
    """Encode overlapping spatial tiles (`tile`, `overlap` in latent pixels) and blend the moments;
    each tile is encoded whole or, with `chunk_frames`, chunked in time."""
    _, ch, cw = model.cfg.compression
    _check_tiling(tile, overlap)
    x = model.check_video(video)
    fn = (
        (lambda v: encode_chunked(model, v, chunk_frames))
        if chunk_frames
        else (lambda v: _encode_full(model, v))
    )
    mean, logvar = _tiled(
        fn, x, (tile[0] * ch, tile[1] * cw), (overlap[0] * ch, overlap[1] * cw), 1.0 / ch
    )
    return mean, logvar


def decode_tiled(
    model: CausalVAE3D,
    z: jax.Array,
    tile: tuple[int, int],
    overlap: tuple[int, int],
    chunk_latents: int | None = None,
) -> jax.Array:
    """Decode overlapping latent tiles (`tile`, `overlap` in latent pixels) and blend the videos."""
    _, ch, _ = model.cfg.compression
    _check_tiling(tile, overlap)
    fn = (
        (lambda v: (decode_chunked(model, v, chunk_latents),))
        if chunk_latents
        else (lambda v: (_decode_full(model, v),))
    )
    return _tiled(fn, z, tuple(tile), tuple(overlap), float(ch))[0]


def _check_tiling(tile, overlap):
    if min(tile) < 1 or min(overlap) < 0 or any(o >= t for o, t in zip(overlap, tile, strict=True)):
        raise ValueError(
            f"tile {tuple(tile)} and overlap {tuple(overlap)}: need tile >= 1 and "
            "0 <= overlap < tile"
        )


@nnx.jit
def _encode_full(model: CausalVAE3D, x):
    return model.encode(x)


@nnx.jit
def _decode_full(model: CausalVAE3D, z):
    return model.decode(z)


# ----------------------------------------------------------------------------------------------------
# Latent statistics
# ----------------------------------------------------------------------------------------------------
def latent_statistics(model: CausalVAE3D, videos) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the posterior means over `videos` (an iterable of (B, T, H, W, 3)
    arrays of any sizes), weighting every latent pixel equally. Returns float32 arrays (Z,)."""
    z = model.cfg.latent_channels
    n, s1, s2 = 0, np.zeros(z, np.float64), np.zeros(z, np.float64)
    for v in videos:
        mean, _ = _encode_full(model, jnp.asarray(v, jnp.float32))
        m = np.asarray(mean, np.float64).reshape(-1, z)
        n += m.shape[0]
        s1 += m.sum(0)
        s2 += np.square(m).sum(0)
    if n == 0:
        raise ValueError("latent_statistics needs at least one video")
    mu = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mu * mu, 0.0))
    return mu.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def set_latent_statistics(model: CausalVAE3D, mean, std) -> None:
    """Stores the statistics in the model (they are saved with it)."""
    model.latent_mean[...] = jnp.asarray(mean, jnp.float32)
    model.latent_std[...] = jnp.asarray(std, jnp.float32)

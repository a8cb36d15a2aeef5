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

`VAEConfig.arch="wan"` swaps in the encoder and decoder of Wan2.1's VAE (diffusers'
`AutoencoderKLWan`, vdit/models/wan_vae.py), which fixes `norm`, `pad_mode`, `mid_attention` and
`temporal_kernel` (`WAN_FIXED`); everything above (chunking, tiling, statistics, training) serves it
unchanged. Its weights map to and from diffusers by vdit/interop/wan_vae.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdit.models import wan_vae
from vdit.models.vae_layers import (
    CausalConv3d,
    ConvCache,
    MidBlock,
    Norm,
    ResBlock,
    Upsample,
    conv_kw,
)

NORMS = ("rms", "group")
PAD_MODES = ("replicate", "zeros")
ARCHS = ("vdit", "wan")
# the fields whose value the Wan architecture fixes (arch="wan"), and that value
WAN_FIXED = {"norm": "rms", "pad_mode": "zeros", "mid_attention": True, "temporal_kernel": 3}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    # "vdit": this file's network | "wan": diffusers' AutoencoderKLWan (Wan2.1's VAE,
    # vdit/models/wan_vae.py), whose weights vdit/interop/wan_vae.py maps both ways
    arch: str = "vdit"
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
    # the latent statistics' values at creation (the LatentStat buffers, which VAE training then
    # recomputes): () = mean 0, std 1; an imported VAE's (diffusers' latents_mean / latents_std)
    latent_mean: tuple[float, ...] = ()
    latent_std: tuple[float, ...] = ()

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
        if self.arch not in ARCHS:
            raise ValueError(f"arch: {self.arch!r} is not one of {ARCHS}")
        if self.arch == "wan":
            for field, value in WAN_FIXED.items():
                if getattr(self, field) != value:
                    raise ValueError(
                        f"{field}: {getattr(self, field)!r} is not Wan's; arch='wan' needs "
                        f"{field}={value!r}"
                    )
        for field in ("latent_mean", "latent_std"):
            n = len(getattr(self, field))
            if n not in (0, self.latent_channels):
                raise ValueError(
                    f"{field}: {n} values, need one per latent channel "
                    f"({self.latent_channels}) or none"
                )
        if any(s <= 0 for s in self.latent_std):
            raise ValueError(f"latent_std: {tuple(self.latent_std)} must all be > 0")

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
# Encoder, decoder, the VAE
# ----------------------------------------------------------------------------------------------------
class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = conv_kw(cfg, rngs)
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
        kw = conv_kw(cfg, rngs)
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
        arch = wan_vae if cfg.arch == "wan" else None
        self.encoder = (arch.Encoder if arch else Encoder)(cfg, rngs=rngs)
        self.decoder = (arch.Decoder if arch else Decoder)(cfg, rngs=rngs)
        z = cfg.latent_channels
        mean = jnp.asarray(cfg.latent_mean, jnp.float32) if cfg.latent_mean else jnp.zeros((z,))
        std = jnp.asarray(cfg.latent_std, jnp.float32) if cfg.latent_std else jnp.ones((z,))
        self.latent_mean = LatentStat(mean.astype(jnp.float32))
        self.latent_std = LatentStat(std.astype(jnp.float32))

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


@nnx.jit
def encode_full(model: CausalVAE3D, x):
    return model.encode(x)


@nnx.jit
def decode_full(model: CausalVAE3D, z):
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
        mean, _ = encode_full(model, jnp.asarray(v, jnp.float32))
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

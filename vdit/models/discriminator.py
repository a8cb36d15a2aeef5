"""A patch discriminator for adversarial VAE training (PatchGAN, Isola et al. 2017).

`layers` convolutions of spatial stride 2 (3x3, LeakyReLU 0.2), channels `channels * 2**i`
(capped at 8x), then a 3x3 convolution to one logit per patch: videos (B, T, H, W, 3) ->
logits (B, T, ceil(H / 2**layers), ceil(W / 2**layers)). Time is never strided. With
`temporal_kernel=1` every frame is judged on its own (a 2D PatchGAN per frame); with a larger one
the convolutions are the VAE's causal 3D ones, so a patch's logit also sees the preceding frames
(motion). No normalisation layers: the logits of a sample depend on that sample alone. The
convolutions reuse `vae_layers.CausalConv3d` (host-drawn init, `vae_in` / `vae_out` sharding names).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vdit.models.vae_layers import CausalConv3d


@dataclasses.dataclass(frozen=True)
class DiscConfig:
    """The config's `disc` section: the network and its optimizer (a constant-rate Adam)."""

    channels: int = 32  # channels of the first convolution
    layers: int = 3  # stride-2 convolutions
    temporal_kernel: int = 1  # 1: per frame (2D); > 1: causal 3D convolutions
    lr: float = 1e-4  # constant learning rate of its Adam
    b1: float = 0.5
    b2: float = 0.9
    grad_clip: float = 1.0  # global-norm clip of its gradients
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for field in ("channels", "layers", "temporal_kernel"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}: {getattr(self, field)} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr: {self.lr} must be > 0")
        for field in ("b1", "b2"):
            if not 0 <= getattr(self, field) < 1:
                raise ValueError(f"{field}: {getattr(self, field)} is not in [0, 1)")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip: {self.grad_clip} must be > 0")


class PatchDiscriminator(nnx.Module):
    def __init__(self, cfg: DiscConfig, *, rngs: nnx.Rngs):
        kt = cfg.temporal_kernel
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        chans = [3] + [cfg.channels * min(2**i, 8) for i in range(cfg.layers)]
        self.convs = nnx.List(
            [
                CausalConv3d(a, b, (kt, 3, 3), (1, 2, 2), **kw)
                for a, b in zip(chans[:-1], chans[1:], strict=True)
            ]
        )
        self.out = CausalConv3d(chans[-1], 1, (kt, 3, 3), (1, 1, 1), **kw)

    def __call__(self, video: jax.Array) -> jax.Array:
        x = video
        for conv in self.convs:
            x = jax.nn.leaky_relu(conv(x), 0.2)
        return self.out(x)[..., 0].astype(jnp.float32)


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """The discriminator's hinge loss: mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))

"""Rectified flow on packed rows.

Convention: x_t = (1 - t) * x_0 + t * noise, t = 0 is data and t = 1 is noise; the model predicts the
velocity v = noise - x_0. Each sample (segment) draws its own t from a logit-normal, then shifts it
toward noise by a factor that grows with the sample's token count (larger videos need more noise to
destroy the same information; SD3 / Wan-style resolution shift, here per sample in a packed row).
Conditioning tokens (``cond_mask``) stay clean: their t is 0, they are not noised and not in the loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    logit_mean: float = 0.0  # logit-normal location
    logit_std: float = 1.0  # logit-normal scale
    shift_ref_tokens: int = 256  # a sample of this many tokens gets shift_at_ref
    shift_at_ref: float = 3.0  # time shift at the reference size (configs/default.py: flow)
    shift_max: float = 4.0  # cap on the shift (very long videos)


def time_shift(t: jax.Array, num_tokens: jax.Array, cfg: FlowConfig) -> jax.Array:
    """Shift t toward 1 by s = shift_at_ref * sqrt(n / n_ref), clipped to [1, shift_max] (SD3 eq. 23)."""
    n = jnp.maximum(num_tokens.astype(jnp.float32), 1.0)
    s = jnp.clip(cfg.shift_at_ref * jnp.sqrt(n / cfg.shift_ref_tokens), 1.0, cfg.shift_max)
    return s * t / (1.0 + (s - 1.0) * t)


def grid_tokens(grid: jax.Array, patch: tuple[int, int, int]) -> jax.Array:
    """Tokens of a full (undropped) sample from its latent grid (..., 3) and the patch size."""
    return jnp.prod(grid, axis=-1) // (patch[0] * patch[1] * patch[2])


def sample_segment_times(
    rng: jax.Array, grid: jax.Array, patch: tuple[int, int, int], cfg: FlowConfig
) -> jax.Array:
    """Per-sample t, shifted by each sample's own token count. grid (B, S, 3) -> (B, S).

    The shift is a function of the sample's full latent grid, so it is the same whether the sample is
    packed, alone, or has tokens dropped. Unused sample slots (grid 0) get a value nothing reads.
    """
    u = cfg.logit_mean + cfg.logit_std * jax.random.normal(rng, grid.shape[:2])
    t = jax.nn.sigmoid(u)
    return time_shift(t, grid_tokens(grid, patch), cfg)


def gather_segments(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Per-segment values (B, S) -> per-token values (B, L); padding tokens get 0."""
    idx = jnp.clip(segment_ids - 1, 0, values.shape[1] - 1)
    out = jnp.take_along_axis(values, idx, axis=1)
    return jnp.where(segment_ids > 0, out, 0)


def noise_tokens(x0, noise, t_tok, cond_mask):
    """x_t and target velocity. x0, noise (B, L, P); t_tok (B, L); cond tokens stay clean."""
    t_tok = jnp.where(cond_mask, 0.0, t_tok)
    xt = (1.0 - t_tok[..., None]) * x0 + t_tok[..., None] * noise
    return xt, noise - x0, t_tok


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean over patch values, averaged over the tokens in `mask`. Returns (loss, token count)."""
    per_token = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), -1)
    count = mask.sum()
    loss = jnp.sum(jnp.where(mask, per_token, 0.0)) / jnp.maximum(count, 1)
    return loss, count


def inverse_time_shift(t_shifted: np.ndarray, num_tokens: int, cfg: FlowConfig) -> np.ndarray:
    """The unshifted t of `time_shift`'s output (numpy): t = t' / (s - (s - 1) t')."""
    n = max(float(num_tokens), 1.0)
    s = float(np.clip(cfg.shift_at_ref * np.sqrt(n / cfg.shift_ref_tokens), 1.0, cfg.shift_max))
    t_shifted = np.asarray(t_shifted, np.float64)
    return t_shifted / (s - (s - 1.0) * t_shifted)

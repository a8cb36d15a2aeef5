"""Dense reference attention (``impl="xla"``): einsum + segment mask, O(L^2) memory.

It defines the semantics the other implementations match: scores scaled by ``1/sqrt(D)``, a
softmax in float32 over the keys with the query's nonzero segment id, and exactly zero for a
query without any allowed key.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Precision = Any  # None, a jax.lax.Precision, a string such as "highest", or a pair of those.

# Finite stand-in for -inf: keeps max/exp free of inf - inf for rows without allowed keys.
MASK_VALUE = -1e30


def attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    precision: Precision,
) -> jax.Array:
    """``(B, Lq, H, D)`` attention of checked inputs with int32 ids ``(B, Lq)``, ``(B, Lk)``."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum(
        "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32, precision=precision
    )  # (B, H, Lq, Lk)
    s = s * scale
    mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)  # (B, Lq, Lk)
    mask = mask[:, None]  # (B, 1, Lq, Lk)
    s = jnp.where(mask, s, MASK_VALUE)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))  # (B, H, Lq, 1)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)  # (B, H, Lq, Lk)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum(
        "bhqk,bkhd->bqhd", p, v.astype(jnp.float32), precision=precision
    )  # (B, Lq, H, D)
    return out.astype(q.dtype)

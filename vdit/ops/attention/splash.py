"""Splash attention (``impl="splash"``): the Pallas TPU kernel with the segment ids as its mask.

``jax.experimental.pallas.ops.tpu.splash_attention`` with a full (non-causal) static mask and
the segment ids as its ``SegmentIds``. On other platforms it runs in Pallas interpret mode
(slow; for tests).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from vdit.ops.attention.blocks import round_up

# The splash kernel's blocks (and so the padded sequence lengths) are multiples of the TPU lane
# width: its segment-id masks are tiled over 128 lanes in both the forward and the dk/dv kernels.
SPLASH_ALIGN = 128


def splash_blocks(block_q: int, block_kv: int, lq: int, lk: int) -> tuple[int, int]:
    """Block sizes the splash kernel uses for sequence lengths ``lq``, ``lk``.

    Each block is rounded up to a multiple of :data:`SPLASH_ALIGN` (128) and clipped to its
    sequence length rounded up to 128; the sequences are then padded to block multiples.
    """
    out = []
    for block, length in ((block_q, lq), (block_kv, lk)):
        block = int(block)
        if block <= 0:
            raise ValueError(f"block sizes must be positive; got {block}")
        out.append(min(round_up(block, SPLASH_ALIGN), round_up(max(length, 1), SPLASH_ALIGN)))
    return out[0], out[1]


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, lq: int, lk: int, bq: int, bk: int, interpret: bool) -> Any:
    """A splash MHA kernel for one example: q ``(heads, lq, D)``, k, v ``(heads, lk, D)``.

    Cached: building the block tables walks every block pair in numpy (seconds for 32k tokens
    in blocks of 128), and every trace of a layer would otherwise redo it.
    """
    # Imported here: the Pallas TPU modules are only needed when this implementation is used.
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )

    mask = splash_mask.MultiHeadMask(tuple(splash_mask.FullMask((lq, lk)) for _ in range(heads)))
    sizes = splash.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=bq,
        block_kv_dq=bk,
    )
    # The mask-info tables are built with numpy; evaluate their conversion eagerly so that the
    # kernel holds constants, not values of the trace it was built in.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def _has_key(q_seg: jax.Array, kv_seg: jax.Array) -> jax.Array:
    """``(B, Lq)`` bool: the query's nonzero id occurs among the row's key ids."""
    sorted_kv = jnp.sort(kv_seg, axis=-1)
    idx = jax.vmap(jnp.searchsorted)(sorted_kv, q_seg)
    idx = jnp.minimum(idx, kv_seg.shape[1] - 1)
    return (jnp.take_along_axis(sorted_kv, idx, axis=-1) == q_seg) & (q_seg != 0)


def attention_splash(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    block_q: int,
    block_kv: int,
    *,
    interpret: bool,
    same_ids: bool,
) -> jax.Array:
    """Splash attention per example (``vmap`` over the batch), heads first inside the kernel.

    * The kernel does not scale scores: q is multiplied by ``1/sqrt(D)`` before it (in float32,
      then cast back to the input dtype). Matmuls take the input dtype and accumulate in float32.
    * The sequences are padded to block multiples with id 0 (see :func:`splash_blocks`).
    * ``SegmentIds`` only allows pairs with equal ids, so padding (id 0) would attend padding.
      A query row without any allowed key gets a uniform average from the kernel (its masked
      scores all equal the finite mask value) instead of zero. Both are overwritten: the output
      of padding queries and of queries whose segment has no keys is set to zero after the
      kernel, which also zeroes their cotangent, so they add nothing to any gradient.
      Finding segments without keys takes a sort of the key ids (:func:`_has_key`); it is skipped
      when ``same_ids`` (the caller passed one array as both q and kv ids: self-attention).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = splash_blocks(block_q, block_kv, lq, lk)
    pq, pk = round_up(lq, bq) - lq, round_up(lk, bk) - lk
    scale = 1.0 / math.sqrt(d)
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)

    def heads_first(x: jax.Array, pad: int) -> jax.Array:  # (B, L, H, D) -> (B, H, L + pad, D)
        return jnp.pad(jnp.transpose(x, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, pad), (0, 0)))

    qh, kh, vh = heads_first(qs, pq), heads_first(k, pk), heads_first(v, pk)
    q_ids = jnp.pad(q_seg, ((0, 0), (0, pq)))
    kv_ids = jnp.pad(kv_seg, ((0, 0), (0, pk)))
    kernel = _splash_kernel(h, lq + pq, lk + pk, bq, bk, interpret)

    def one(qi, ki, vi, q_id, kv_id):
        return kernel(qi, ki, vi, segment_ids=SegmentIds(q=q_id, kv=kv_id))

    out = jax.vmap(one)(qh, kh, vh, q_ids, kv_ids)  # (B, H, Lq_pad, D)
    out = jnp.transpose(out[:, :, :lq], (0, 2, 1, 3))  # (B, Lq, H, D)
    valid = (q_seg != 0) if same_ids else _has_key(q_seg, kv_seg)  # (B, Lq)
    return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)

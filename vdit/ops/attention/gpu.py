"""GPU flash attention (``impl="gpu"``): a Pallas Triton kernel that honours segment ids.

A fused forward kernel and two fused backward kernels (``dq``; ``dk, dv``), written with
``jax.experimental.pallas`` for its Triton lowering (the GPU backend). They follow the chunked
kernel's rule (:mod:`.chunked`, :mod:`.blocks`): a query block visits only the key-block range
``[lo, hi)`` that can share a nonzero segment id with it (computed outside the kernel, one pair of
integers per block, read as the bounds of the kernel's loop), and inside a block the mask is
``q_id == kv_id != 0``. A query without any allowed key (padding, or a segment without keys in
cross-attention) outputs exactly zero and gets a zero gradient.

Why not the kernels that ship with JAX: ``jax.experimental.pallas.ops.gpu.attention.mha`` takes
one ``segment_ids`` array for both sides (self-attention only: no cross-attention to text), lets
padding (id 0) attend padding, visits every key block of the row and needs ``Lq`` and ``Lk`` cut
into the same number of backward blocks. ``jax.nn.dot_product_attention``
with ``implementation="cudnn"`` expresses per-row lengths (``query_seq_lengths``), not several
segments in a row, and a dense ``mask`` makes it O(L^2) again.

Triton wants power-of-two tiles: blocks are rounded up to a power of two (at least 16, at most
the sequence length rounded up to a power of two) and the head dimension is zero-padded to a
power of two of at least 16 (zeros change no score and no output). Sequences are padded to block
multiples with id 0. Scores, softmax statistics and accumulators are float32; the matmuls take
the input dtype (bf16 on accelerators; float32 inputs may run as TF32, Triton's default) and
accumulate in float32.

Off GPU (``interpret=True``) the same kernels run in Pallas interpret mode: slow, for tests.
The block sizes are untuned (no GPU was available when this was written).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from vdit.ops.attention.blocks import block_ranges, round_up
from vdit.ops.attention.reference import MASK_VALUE

# Smallest tile side: Triton's dot needs at least 16 along every dimension.
GPU_MIN_BLOCK = 16


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def gpu_blocks(block_q: int, block_kv: int, lq: int, lk: int) -> tuple[int, int]:
    """Block sizes the GPU kernel uses for sequence lengths ``lq``, ``lk``.

    Each block is rounded up to a power of two of at least :data:`GPU_MIN_BLOCK` and clipped to
    its sequence length rounded up to a power of two (of at least 16); the sequences are then
    padded to block multiples.
    """
    out = []
    for block, length in ((block_q, lq), (block_kv, lk)):
        block = int(block)
        if block <= 0:
            raise ValueError(f"block sizes must be positive; got {block}")
        cap = _pow2(max(length, GPU_MIN_BLOCK))
        out.append(min(_pow2(max(block, GPU_MIN_BLOCK)), cap))
    return out[0], out[1]


def attention_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    block_q: int,
    block_kv: int,
    *,
    interpret: bool,
) -> jax.Array:
    """``(B, Lq, H, D)`` attention of checked inputs with int32 ids ``(B, Lq)``, ``(B, Lk)``."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = gpu_blocks(block_q, block_kv, lq, lk)
    dp = _pow2(max(d, GPU_MIN_BLOCK))
    pq, pk = round_up(lq, bq) - lq, round_up(lk, bk) - lk

    def pad(x: jax.Array, extra: int) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, dp - d)))

    out = _flash(
        pad(q, pq),
        pad(k, pk),
        pad(v, pk),
        jnp.pad(q_seg, ((0, 0), (0, pq))),
        jnp.pad(kv_seg, ((0, 0), (0, pk))),
        bq,
        bk,
        1.0 / math.sqrt(d),
        interpret,
    )
    return out[:, :lq, :, :d]


# ----------------------------------------------------------------------------------------------
# custom_vjp over block-padded inputs (sequence lengths multiples of the blocks, head dim pow2)
# ----------------------------------------------------------------------------------------------


def _ranges(
    row_seg: jax.Array, block_row: int, col_seg: jax.Array, block_col: int
) -> tuple[jax.Array, jax.Array]:
    """``(B, n_row)`` int32 ``lo, hi``: the column blocks each row block visits."""
    b = row_seg.shape[0]
    return block_ranges(row_seg.reshape(b, -1, block_row), col_seg.reshape(b, -1, block_col))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, q_seg, kv_seg, bq, bk, scale, interpret):
    out, _ = _forward(q, k, v, q_seg, kv_seg, bq, bk, scale, interpret)
    return out


def _flash_fwd(q, k, v, q_seg, kv_seg, bq, bk, scale, interpret):
    out, lse = _forward(q, k, v, q_seg, kv_seg, bq, bk, scale, interpret)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(bq, bk, scale, interpret, res, dout):
    q, k, v, q_seg, kv_seg, out, lse = res
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, out, lse, dout, bq, bk, scale, interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Kernels. Refs of one (row, head): q (Lq, Dp), k / v (Lk, Dp), ids (L,), lse / delta (Lq,);
# the block being produced is the grid's first index.
# ----------------------------------------------------------------------------------------------


def _mask(q_ids: jax.Array, kv_ids: jax.Array) -> jax.Array:
    """``(bq, bk)`` allowed pairs: same nonzero segment id."""
    return (q_ids[:, None] == kv_ids[None, :]) & (q_ids[:, None] != 0)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``(m, k) @ (k, n)`` accumulated in float32 (Triton's default precision for the dtype)."""
    return plgpu.dot(a, b)


def _forward_kernel(
    lo_ref, hi_ref, q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, lse_ref, *, scale, bk
):
    q = q_ref[...]  # (bq, Dp)
    q_ids = q_ids_ref[...]  # (bq,)
    bq, dp = q.shape

    def body(j, carry):
        m, l, acc = carry  # (bq,), (bq,), (bq, Dp) float32
        kv = pl.ds(j * bk, bk)
        k, v, kv_ids = k_ref[kv, :], v_ref[kv, :], kv_ids_ref[kv]
        mask = _mask(q_ids, kv_ids)
        s = jnp.where(mask, _dot(q, k.T) * scale, MASK_VALUE)  # (bq, bk)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return m_new, l, acc

    init = (
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, dp), jnp.float32),
    )
    m, l, acc = lax.fori_loop(lo_ref[()], hi_ref[()], body, init)
    has_keys = l > 0
    l_safe = jnp.where(has_keys, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, m + jnp.log(l_safe), 0.0)


def _dq_kernel(
    lo_ref,
    hi_ref,
    q_ref,
    k_ref,
    v_ref,
    q_ids_ref,
    kv_ids_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    scale,
    bk,
):
    q, do = q_ref[...], do_ref[...]  # (bq, Dp)
    q_ids, lse, delta = q_ids_ref[...], lse_ref[...], delta_ref[...]  # (bq,)

    def body(j, dq):
        kv = pl.ds(j * bk, bk)
        k, v, kv_ids = k_ref[kv, :], v_ref[kv, :], kv_ids_ref[kv]
        mask = _mask(q_ids, kv_ids)
        s = _dot(q, k.T) * scale
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)  # (bq, bk)
        ds = p * (_dot(do, v.T) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo_ref[()], hi_ref[()], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    lo_ref,
    hi_ref,
    q_ref,
    k_ref,
    v_ref,
    q_ids_ref,
    kv_ids_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    scale,
    bq,
):
    k, v = k_ref[...], v_ref[...]  # (bk, Dp)
    kv_ids = kv_ids_ref[...]  # (bk,)

    def body(i, carry):
        dk, dv = carry  # (bk, Dp) float32
        qs = pl.ds(i * bq, bq)
        q, do, q_ids = q_ref[qs, :], do_ref[qs, :], q_ids_ref[qs]
        lse, delta = lse_ref[qs], delta_ref[qs]
        mask = _mask(q_ids, kv_ids)
        s = _dot(q, k.T) * scale
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)  # (bq, bk)
        dv = dv + _dot(p.astype(do.dtype).T, do)
        ds = p * (_dot(do, v.T) - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype).T, q)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo_ref[()], hi_ref[()], body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_calls: grid (block, row, head)
# ----------------------------------------------------------------------------------------------


def _specs(lq: int, lk: int, dp: int):
    """BlockSpecs of whole-row operands of grid ``(block, row, head)``."""
    row = lambda length: pl.BlockSpec((None, length, None, dp), lambda i, b, h: (b, 0, h, 0))
    ids = lambda length: pl.BlockSpec((None, length), lambda i, b, h: (b, 0))
    per_q = pl.BlockSpec((None, None, lq), lambda i, b, h: (b, h, 0))  # lse / delta (B, H, Lq)
    bound = pl.BlockSpec((None, None), lambda i, b, h: (b, i))  # lo / hi (B, n_blocks)
    return row, ids, per_q, bound


def _compiler_params(dp: int):
    return plgpu.CompilerParams(num_warps=4 if dp <= 64 else 8, num_stages=2)


def _forward(q, k, v, q_seg, kv_seg, bq, bk, scale, interpret):
    b, lq, h, dp = q.shape
    lk = k.shape[1]
    lo, hi = _ranges(q_seg, bq, kv_seg, bk)  # (B, nq)
    row, ids, _, bound = _specs(lq, lk, dp)
    q_block = pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale, bk=bk),
        grid=(lq // bq, b, h),
        in_specs=[
            bound,
            bound,
            q_block,
            row(lk),
            row(lk),
            pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
            ids(lk),
        ],
        out_specs=[q_block, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, lq), jnp.float32),
        ],
        compiler_params=_compiler_params(dp),
        interpret=interpret,
        name="vdit_gpu_attention_fwd",
    )(lo, hi, q, k, v, q_seg, kv_seg)
    return out, lse


def _backward(q, k, v, q_seg, kv_seg, out, lse, dout, bq, bk, scale, interpret):
    b, lq, h, dp = q.shape
    lk = k.shape[1]
    dout = dout.astype(q.dtype)
    delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))
    row, ids, per_q, bound = _specs(lq, lk, dp)
    params = _compiler_params(dp)

    q_block = pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))
    lo, hi = _ranges(q_seg, bq, kv_seg, bk)  # (B, nq): key blocks of each query block
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, bk=bk),
        grid=(lq // bq, b, h),
        in_specs=[
            bound,
            bound,
            q_block,
            row(lk),
            row(lk),
            pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
            ids(lk),
            q_block,
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="vdit_gpu_attention_dq",
    )(lo, hi, q, k, v, q_seg, kv_seg, dout, lse, delta)

    kv_block = pl.BlockSpec((None, bk, None, dp), lambda j, b, h: (b, j, h, 0))
    lo, hi = _ranges(kv_seg, bk, q_seg, bq)  # (B, nk): query blocks of each key block
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bq=bq),
        grid=(lk // bk, b, h),
        in_specs=[
            bound,
            bound,
            row(lq),
            kv_block,
            kv_block,
            ids(lq),
            pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
            row(lq),
            per_q,
            per_q,
        ],
        out_specs=[kv_block, kv_block],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        compiler_params=params,
        interpret=interpret,
        name="vdit_gpu_attention_dkv",
    )(lo, hi, q, k, v, q_seg, kv_seg, dout, lse, delta)
    return dq, dk, dv

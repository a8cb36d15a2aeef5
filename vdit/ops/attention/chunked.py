"""Chunked attention (``impl="chunked"``): blockwise online softmax in plain JAX, O(L * block).

A flash-attention style kernel with a ``jax.custom_vjp``: memory is O(L * block) in forward and
backward. Block pairs that cannot share a nonzero segment are skipped (see
:mod:`vdit.ops.attention.blocks`).

Work items ``(batch row, query block)`` are processed sequentially with ``lax.map`` and each
runs a ``lax.fori_loop`` with data-dependent bounds (a while loop). The loop is never
vmapped (that would turn it into a max-trip-count masked loop). Heads are processed
together inside a block. The backward pass (FlashAttention-2 style) recomputes the scores
per block pair: a ``dq`` pass over query blocks (key-block ranges as in forward) and a
``dk, dv`` pass over key blocks using the symmetric ranges of query blocks.

Notes:
* Calling it under ``jax.vmap`` would batch the dynamic loops and lose the skipping; fold extra
  dimensions into the batch dimension instead.
* With batch-sharded inputs under plain ``jit`` the result is correct, but the SPMD partitioner
  cannot split the sequential loop over (row, block) work items: it all-gathers q/k/v and every
  device computes every row. For data-parallel efficiency call it inside ``jax.shard_map`` over
  the batch axes (rows are independent, so this is exact); the loops are shard_map-safe.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from vdit.ops.attention.blocks import block_ranges, pad_to_blocks
from vdit.ops.attention.reference import MASK_VALUE, Precision


def attention_chunked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    block_q: int,
    block_kv: int,
    precision: Precision,
) -> jax.Array:
    lq = q.shape[1]
    q, k, v, q_seg, kv_seg, bq, bk = pad_to_blocks(q, k, v, q_seg, kv_seg, block_q, block_kv)
    out = _flash(q, k, v, q_seg, kv_seg, bq, bk, precision)  # (B, Lq_pad, H, D)
    return out[:, :lq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    block_q: int,
    block_kv: int,
    precision: Precision,
) -> jax.Array:
    out, _, _ = flash_forward(q, k, v, q_seg, kv_seg, block_q, block_kv, precision)
    return out


def _flash_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    block_q: int,
    block_kv: int,
    precision: Precision,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    out, lse, _ = flash_forward(q, k, v, q_seg, kv_seg, block_q, block_kv, precision)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(
    block_q: int,
    block_kv: int,
    precision: Precision,
    res: tuple[jax.Array, ...],
    dout: jax.Array,
) -> tuple[jax.Array | None, ...]:
    q, k, v, q_seg, kv_seg, out, lse = res
    delta = delta_of(out, dout)
    dq, _ = flash_dq(q, k, v, q_seg, kv_seg, dout, lse, delta, block_q, block_kv, precision)
    dk, dv, _ = flash_dkv(q, k, v, q_seg, kv_seg, dout, lse, delta, block_q, block_kv, precision)
    return _sum_like(dq, q), _sum_like(dk, k), _sum_like(dv, v), None, None


def _varying_axes(x: jax.Array) -> set[Any]:
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # newer jax; older ones expose `vma`
    return set(mat.varying if mat is not None else getattr(aval, "vma", None) or ())


def _sum_like(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """Sums a cotangent over the mesh axes it varies over but its primal does not.

    Inside ``shard_map`` with sequence parallelism, keys and values are the same on every device of
    the `sequence` axis (all-gathered) while each device's queries differ, so each device holds a
    partial gradient of the shared keys and values: their sum is the gradient.
    """
    extra = _varying_axes(grad) - _varying_axes(primal)
    return lax.psum(grad, tuple(sorted(extra, key=str))) if extra else grad


_flash.defvjp(_flash_fwd, _flash_bwd)


def _scores(q_blk: jax.Array, k_blk: jax.Array, scale: float, precision: Precision) -> jax.Array:
    """``(bq, H, D) x (bk, H, D) -> (H, bq, bk)`` float32 scaled scores."""
    s = jnp.einsum(
        "qhd,khd->hqk", q_blk, k_blk, preferred_element_type=jnp.float32, precision=precision
    )
    return s * scale


def _pair_mask(q_seg_blk: jax.Array, kv_seg_blk: jax.Array) -> jax.Array:
    """``(bq,), (bk,) -> (1, bq, bk)`` allowed (query, key) pairs."""
    mask = (q_seg_blk[:, None] == kv_seg_blk[None, :]) & (q_seg_blk[:, None] != 0)
    return mask[None]


def _vary_like(init: tuple[jax.Array, ...], *refs: jax.Array) -> tuple[jax.Array, ...]:
    """Marks loop-carry inits as varying over the mesh axes ``refs`` vary over.

    Inside ``shard_map`` the carries of a loop must keep their type across iterations; the body
    makes them device-varying as soon as it touches the (varying) inputs, so the constant inits
    have to be cast up front. Outside ``shard_map`` this is a no-op.
    """
    axes: set[Any] = set()
    for ref in refs:
        axes |= _varying_axes(ref)
    if not axes:
        return init
    names = tuple(sorted(axes, key=str))
    return tuple(lax.pcast(x, names, to="varying") for x in init)


def _take(blocks: jax.Array, index: jax.Array) -> jax.Array:
    return lax.dynamic_index_in_dim(blocks, index, axis=0, keepdims=False)


def flash_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    bq: int,
    bk: int,
    precision: Precision,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns output ``(B, Lq, H, D)``, logsumexp ``(B * nq, H, bq)`` and #visited pairs."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    nq, nk = lq // bq, lk // bk
    scale = 1.0 / math.sqrt(d)
    q_blocks = q.reshape(b * nq, bq, h, d)
    q_seg_blocks = q_seg.reshape(b * nq, bq)
    k_blocks = k.reshape(b * nk, bk, h, d)
    v_blocks = v.reshape(b * nk, bk, h, d)
    kv_seg_blocks = kv_seg.reshape(b * nk, bk)
    lo, hi = block_ranges(q_seg.reshape(b, nq, bq), kv_seg.reshape(b, nk, bk))  # (B, nq)
    rows = jnp.repeat(jnp.arange(b, dtype=jnp.int32), nq)  # (B * nq,)

    def one_q_block(
        xs: tuple[jax.Array, ...],
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        q_blk, q_seg_blk, row, lo_i, hi_i = xs  # (bq, H, D), (bq,), (), (), ()

        def body(j: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            m, l, acc, count = carry  # (H, bq), (H, bq), (H, bq, D), ()
            idx = row * nk + j
            k_blk = _take(k_blocks, idx)  # (bk, H, D)
            v_blk = _take(v_blocks, idx)  # (bk, H, D)
            mask = _pair_mask(q_seg_blk, _take(kv_seg_blocks, idx))  # (1, bq, bk)
            s = jnp.where(mask, _scores(q_blk, k_blk, scale, precision), MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # (H, bq)
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)  # (H, bq, bk)
            alpha = jnp.exp(m - m_new)  # (H, bq)
            l = alpha * l + jnp.sum(p, axis=-1)
            pv = jnp.einsum("hqk,khd->hqd", p, v_blk.astype(jnp.float32), precision=precision)
            acc = alpha[..., None] * acc + pv
            return m_new, l, acc, count + 1

        init = _vary_like(
            (
                jnp.full((h, bq), MASK_VALUE, jnp.float32),
                jnp.zeros((h, bq), jnp.float32),
                jnp.zeros((h, bq, d), jnp.float32),
                jnp.zeros((), jnp.int32),
            ),
            *xs,
            k_blocks,
            v_blocks,
            kv_seg_blocks,
        )
        m, l, acc, count = lax.fori_loop(lo_i, hi_i, body, init)
        has_keys = l > 0
        l_safe = jnp.where(has_keys, l, 1.0)
        out_blk = jnp.transpose(acc / l_safe[..., None], (1, 0, 2))  # (bq, H, D)
        lse_blk = jnp.where(has_keys, m + jnp.log(l_safe), 0.0)  # (H, bq)
        return out_blk.astype(q.dtype), lse_blk, count

    out, lse, counts = lax.map(
        one_q_block, (q_blocks, q_seg_blocks, rows, lo.reshape(-1), hi.reshape(-1))
    )
    return out.reshape(b, lq, h, d), lse, jnp.sum(counts)


def delta_of(out: jax.Array, dout: jax.Array) -> jax.Array:
    """``rowsum(dO * O)`` as ``(B, Lq, H)`` float32."""
    return jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)


def flash_dq(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    dout: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    bq: int,
    bk: int,
    precision: Precision,
) -> tuple[jax.Array, jax.Array]:
    """dq, iterating over query blocks and their key-block ranges."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    nq, nk = lq // bq, lk // bk
    scale = 1.0 / math.sqrt(d)
    k_blocks = k.reshape(b * nk, bk, h, d)
    v_blocks = v.reshape(b * nk, bk, h, d)
    kv_seg_blocks = kv_seg.reshape(b * nk, bk)
    delta_blocks = jnp.transpose(delta.reshape(b * nq, bq, h), (0, 2, 1))  # (B * nq, H, bq)
    lo, hi = block_ranges(q_seg.reshape(b, nq, bq), kv_seg.reshape(b, nk, bk))  # (B, nq)
    rows = jnp.repeat(jnp.arange(b, dtype=jnp.int32), nq)

    def one_q_block(xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        q_blk, do_blk, lse_blk, delta_blk, q_seg_blk, row, lo_i, hi_i = xs

        def body(j: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            dq, count = carry  # (bq, H, D) f32, ()
            idx = row * nk + j
            k_blk = _take(k_blocks, idx)  # (bk, H, D)
            v_blk = _take(v_blocks, idx)  # (bk, H, D)
            mask = _pair_mask(q_seg_blk, _take(kv_seg_blocks, idx))  # (1, bq, bk)
            s = jnp.where(mask, _scores(q_blk, k_blk, scale, precision), MASK_VALUE)
            p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)  # (H, bq, bk)
            dp = jnp.einsum(
                "qhd,khd->hqk",
                do_blk,
                v_blk,
                preferred_element_type=jnp.float32,
                precision=precision,
            )  # (H, bq, bk)
            ds = p * (dp - delta_blk[..., None])
            dq = dq + jnp.einsum("hqk,khd->qhd", ds, k_blk.astype(jnp.float32), precision=precision)
            return dq, count + 1

        init = _vary_like(
            (jnp.zeros((bq, h, d), jnp.float32), jnp.zeros((), jnp.int32)),
            *xs,
            k_blocks,
            v_blocks,
            kv_seg_blocks,
        )
        dq, count = lax.fori_loop(lo_i, hi_i, body, init)
        return (dq * scale).astype(q.dtype), count

    dq, counts = lax.map(
        one_q_block,
        (
            q.reshape(b * nq, bq, h, d),
            dout.reshape(b * nq, bq, h, d),
            lse,
            delta_blocks,
            q_seg.reshape(b * nq, bq),
            rows,
            lo.reshape(-1),
            hi.reshape(-1),
        ),
    )
    return dq.reshape(b, lq, h, d), jnp.sum(counts)


def flash_dkv(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    dout: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    bq: int,
    bk: int,
    precision: Precision,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dk, dv, iterating over key blocks and their (symmetric) query-block ranges."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    nq, nk = lq // bq, lk // bk
    scale = 1.0 / math.sqrt(d)
    q_blocks = q.reshape(b * nq, bq, h, d)
    do_blocks = dout.reshape(b * nq, bq, h, d)
    q_seg_blocks = q_seg.reshape(b * nq, bq)
    delta_blocks = jnp.transpose(delta.reshape(b * nq, bq, h), (0, 2, 1))  # (B * nq, H, bq)
    lo, hi = block_ranges(kv_seg.reshape(b, nk, bk), q_seg.reshape(b, nq, bq))  # (B, nk)
    rows = jnp.repeat(jnp.arange(b, dtype=jnp.int32), nk)

    def one_kv_block(xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
        k_blk, v_blk, kv_seg_blk, row, lo_j, hi_j = xs  # (bk, H, D), (bk, H, D), (bk,), ...

        def body(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            dk, dv, count = carry  # (bk, H, D) f32 x 2, ()
            idx = row * nq + i
            q_blk = _take(q_blocks, idx)  # (bq, H, D)
            do_blk = _take(do_blocks, idx)  # (bq, H, D)
            lse_blk = _take(lse, idx)  # (H, bq)
            delta_blk = _take(delta_blocks, idx)  # (H, bq)
            mask = _pair_mask(_take(q_seg_blocks, idx), kv_seg_blk)  # (1, bq, bk)
            s = jnp.where(mask, _scores(q_blk, k_blk, scale, precision), MASK_VALUE)
            p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)  # (H, bq, bk)
            do32 = do_blk.astype(jnp.float32)
            dv = dv + jnp.einsum("hqk,qhd->khd", p, do32, precision=precision)
            dp = jnp.einsum(
                "qhd,khd->hqk",
                do_blk,
                v_blk,
                preferred_element_type=jnp.float32,
                precision=precision,
            )  # (H, bq, bk)
            ds = p * (dp - delta_blk[..., None])
            dk = dk + jnp.einsum("hqk,qhd->khd", ds, q_blk.astype(jnp.float32), precision=precision)
            return dk, dv, count + 1

        init = _vary_like(
            (
                jnp.zeros((bk, h, d), jnp.float32),
                jnp.zeros((bk, h, d), jnp.float32),
                jnp.zeros((), jnp.int32),
            ),
            *xs,
            q_blocks,
            do_blocks,
            q_seg_blocks,
            lse,
            delta_blocks,
        )
        dk, dv, count = lax.fori_loop(lo_j, hi_j, body, init)
        return (dk * scale).astype(k.dtype), dv.astype(v.dtype), count

    dk, dv, counts = lax.map(
        one_kv_block,
        (
            k.reshape(b * nk, bk, h, d),
            v.reshape(b * nk, bk, h, d),
            kv_seg.reshape(b * nk, bk),
            rows,
            lo.reshape(-1),
            hi.reshape(-1),
        ),
    )
    return dk.reshape(b, lk, h, d), dv.reshape(b, lk, h, d), jnp.sum(counts)

"""Chunked attention (``impl="chunked"``): blockwise online softmax in plain JAX, O(L * block).

A flash-attention style kernel with a ``jax.custom_vjp``: memory is O(L * block) in forward and
backward. Block pairs that cannot share a nonzero segment are skipped (see
:mod:`vdit.ops.attention.blocks`).

Work items ``(batch row, query block)`` are processed sequentially with ``lax.map`` and each
runs a ``lax.fori_loop`` with data-dependent bounds (a while loop). The loop is never
vmapped (that would turn it into a max-trip-count masked loop). Heads are processed
together inside a block. The backward pass (FlashAttention-2 style) recomputes the scores
per block pair: a ``dq`` pass over query blocks (key-block ranges as in forward) and a
``dk, dv`` pass over key blocks using the symmetric ranges of query blocks. All three passes
read their blocks and block ranges from one :class:`~vdit.ops.attention.blocks.BlockedView`.

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
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from vdit.ops.attention.blocks import BlockedView, pad_to_blocks
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
    """``(B, Lq, H, D)`` attention of checked inputs with int32 ids ``(B, Lq)``, ``(B, Lk)``."""
    lq = q.shape[1]
    q, k, v, q_seg, kv_seg, bq, bk = pad_to_blocks(q, k, v, q_seg, kv_seg, block_q, block_kv)
    out = _flash(q, k, v, q_seg, kv_seg, bq, bk, precision)  # (B, Lq_pad, H, D)
    return out[:, :lq]


# ----------------------------------------------------------------------------------------------
# custom_vjp over block-padded inputs
# ----------------------------------------------------------------------------------------------


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
    view = BlockedView.of(q, k, v, q_seg, kv_seg, block_q, block_kv)
    out, _, _ = flash_forward(view, precision)
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
    view = BlockedView.of(q, k, v, q_seg, kv_seg, block_q, block_kv)
    out, lse, _ = flash_forward(view, precision)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(
    block_q: int,
    block_kv: int,
    precision: Precision,
    res: tuple[jax.Array, ...],
    dout: jax.Array,
) -> tuple[jax.Array | None, ...]:
    q, k, v, q_seg, kv_seg, out, lse = res
    view = BlockedView.of(q, k, v, q_seg, kv_seg, block_q, block_kv)
    (dq, dk, dv), _ = flash_backward(view, out, lse, dout, precision)
    return _sum_like(dq, q), _sum_like(dk, k), _sum_like(dv, v), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# The three passes over one blocked view
# ----------------------------------------------------------------------------------------------


def flash_forward(
    view: BlockedView, precision: Precision
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns output ``(B, Lq, H, D)``, logsumexp ``(B * nq, H, bq)`` and #visited pairs."""
    h, d, bq, nk, scale = view.heads, view.head_dim, view.bq, view.nk, view.scale
    rows, lo, hi = view.kv_ranges()  # (B * nq,) each

    def one_q_block(
        xs: tuple[jax.Array, ...],
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        q_blk, q_seg_blk, row, lo_i, hi_i = xs  # (bq, H, D), (bq,), (), (), ()

        def body(j: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            m, l, acc, count = carry  # (H, bq), (H, bq), (H, bq, D), ()
            idx = row * nk + j
            k_blk = _take(view.k, idx)  # (bk, H, D)
            v_blk = _take(view.v, idx)  # (bk, H, D)
            mask, s = _masked_scores(
                q_blk, k_blk, q_seg_blk, _take(view.kv_seg, idx), scale, precision
            )
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
            view.k,
            view.v,
            view.kv_seg,
        )
        m, l, acc, count = lax.fori_loop(lo_i, hi_i, body, init)
        has_keys = l > 0
        l_safe = jnp.where(has_keys, l, 1.0)
        out_blk = jnp.transpose(acc / l_safe[..., None], (1, 0, 2))  # (bq, H, D)
        lse_blk = jnp.where(has_keys, m + jnp.log(l_safe), 0.0)  # (H, bq)
        return out_blk.astype(view.q.dtype), lse_blk, count

    out, lse, counts = lax.map(one_q_block, (view.q, view.q_seg, rows, lo, hi))
    return view.unblock_q(out), lse, jnp.sum(counts)


def flash_backward(
    view: BlockedView, out: jax.Array, lse: jax.Array, dout: jax.Array, precision: Precision
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """``(dq, dk, dv)`` (each like its primal) and the #pairs visited by the dq and dk/dv passes.

    ``out`` ``(B, Lq, H, D)`` and ``lse`` ``(B * nq, H, bq)`` are the forward's results.
    """
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B, Lq, H)
    do_blocks = view.q_blocks(dout)  # (B * nq, bq, H, D)
    delta_blocks = jnp.transpose(view.q_blocks(delta), (0, 2, 1))  # (B * nq, H, bq)
    dq, n_dq = _flash_dq(view, do_blocks, lse, delta_blocks, precision)
    dk, dv, n_dkv = _flash_dkv(view, do_blocks, lse, delta_blocks, precision)
    return (dq, dk, dv), (n_dq, n_dkv)


def _flash_dq(
    view: BlockedView,
    do_blocks: jax.Array,
    lse: jax.Array,
    delta_blocks: jax.Array,
    precision: Precision,
) -> tuple[jax.Array, jax.Array]:
    """dq, iterating over query blocks and their key-block ranges."""
    h, d, bq, nk, scale = view.heads, view.head_dim, view.bq, view.nk, view.scale
    rows, lo, hi = view.kv_ranges()  # (B * nq,) each

    def one_q_block(xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        q_blk, do_blk, lse_blk, delta_blk, q_seg_blk, row, lo_i, hi_i = xs

        def body(j: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            dq, count = carry  # (bq, H, D) f32, ()
            idx = row * nk + j
            k_blk = _take(view.k, idx)  # (bk, H, D)
            v_blk = _take(view.v, idx)  # (bk, H, D)
            kv_seg_blk = _take(view.kv_seg, idx)
            p = _probs(q_blk, k_blk, q_seg_blk, kv_seg_blk, lse_blk, scale, precision)
            ds = _dscores(p, do_blk, v_blk, delta_blk, precision)  # (H, bq, bk)
            dq = dq + jnp.einsum("hqk,khd->qhd", ds, k_blk.astype(jnp.float32), precision=precision)
            return dq, count + 1

        init = _vary_like(
            (jnp.zeros((bq, h, d), jnp.float32), jnp.zeros((), jnp.int32)),
            *xs,
            view.k,
            view.v,
            view.kv_seg,
        )
        dq, count = lax.fori_loop(lo_i, hi_i, body, init)
        return (dq * scale).astype(view.q.dtype), count

    dq, counts = lax.map(
        one_q_block, (view.q, do_blocks, lse, delta_blocks, view.q_seg, rows, lo, hi)
    )
    return view.unblock_q(dq), jnp.sum(counts)


def _flash_dkv(
    view: BlockedView,
    do_blocks: jax.Array,
    lse: jax.Array,
    delta_blocks: jax.Array,
    precision: Precision,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dk, dv, iterating over key blocks and their (symmetric) query-block ranges."""
    h, d, bk, nq, scale = view.heads, view.head_dim, view.bk, view.nq, view.scale
    rows, lo, hi = view.q_ranges()  # (B * nk,) each

    def one_kv_block(xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
        k_blk, v_blk, kv_seg_blk, row, lo_j, hi_j = xs  # (bk, H, D), (bk, H, D), (bk,), ...

        def body(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            dk, dv, count = carry  # (bk, H, D) f32 x 2, ()
            idx = row * nq + i
            q_blk = _take(view.q, idx)  # (bq, H, D)
            do_blk = _take(do_blocks, idx)  # (bq, H, D)
            lse_blk = _take(lse, idx)  # (H, bq)
            delta_blk = _take(delta_blocks, idx)  # (H, bq)
            q_seg_blk = _take(view.q_seg, idx)
            p = _probs(q_blk, k_blk, q_seg_blk, kv_seg_blk, lse_blk, scale, precision)
            do32 = do_blk.astype(jnp.float32)
            dv = dv + jnp.einsum("hqk,qhd->khd", p, do32, precision=precision)
            ds = _dscores(p, do_blk, v_blk, delta_blk, precision)  # (H, bq, bk)
            dk = dk + jnp.einsum("hqk,qhd->khd", ds, q_blk.astype(jnp.float32), precision=precision)
            return dk, dv, count + 1

        init = _vary_like(
            (
                jnp.zeros((bk, h, d), jnp.float32),
                jnp.zeros((bk, h, d), jnp.float32),
                jnp.zeros((), jnp.int32),
            ),
            *xs,
            view.q,
            do_blocks,
            view.q_seg,
            lse,
            delta_blocks,
        )
        dk, dv, count = lax.fori_loop(lo_j, hi_j, body, init)
        return (dk * scale).astype(view.k.dtype), dv.astype(view.v.dtype), count

    dk, dv, counts = lax.map(one_kv_block, (view.k, view.v, view.kv_seg, rows, lo, hi))
    return view.unblock_kv(dk), view.unblock_kv(dv), jnp.sum(counts)


# ----------------------------------------------------------------------------------------------
# Block-pair math
# ----------------------------------------------------------------------------------------------


def _masked_scores(
    q_blk: jax.Array,
    k_blk: jax.Array,
    q_seg_blk: jax.Array,
    kv_seg_blk: jax.Array,
    scale: float,
    precision: Precision,
) -> tuple[jax.Array, jax.Array]:
    """The allowed pairs ``(1, bq, bk)`` and float32 scaled scores ``(H, bq, bk)``, masked.

    ``(bq, H, D), (bk, H, D), (bq,), (bk,)`` blocks in; disallowed scores are ``MASK_VALUE``.
    """
    mask = (q_seg_blk[:, None] == kv_seg_blk[None, :]) & (q_seg_blk[:, None] != 0)
    mask = mask[None]
    s = jnp.einsum(
        "qhd,khd->hqk", q_blk, k_blk, preferred_element_type=jnp.float32, precision=precision
    )
    return mask, jnp.where(mask, s * scale, MASK_VALUE)


def _probs(
    q_blk: jax.Array,
    k_blk: jax.Array,
    q_seg_blk: jax.Array,
    kv_seg_blk: jax.Array,
    lse_blk: jax.Array,
    scale: float,
    precision: Precision,
) -> jax.Array:
    """Softmax probabilities ``(H, bq, bk)`` recomputed from the forward's logsumexp ``(H, bq)``."""
    mask, s = _masked_scores(q_blk, k_blk, q_seg_blk, kv_seg_blk, scale, precision)
    return jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)


def _dscores(
    p: jax.Array, do_blk: jax.Array, v_blk: jax.Array, delta_blk: jax.Array, precision: Precision
) -> jax.Array:
    """Score gradient ``dS = P * (dO V^T - delta)``, ``(H, bq, bk)`` float32."""
    dp = jnp.einsum(
        "qhd,khd->hqk", do_blk, v_blk, preferred_element_type=jnp.float32, precision=precision
    )  # (H, bq, bk)
    return p * (dp - delta_blk[..., None])


def _take(blocks: jax.Array, index: jax.Array) -> jax.Array:
    return lax.dynamic_index_in_dim(blocks, index, axis=0, keepdims=False)


# ----------------------------------------------------------------------------------------------
# shard_map: mesh-axis variance of loop carries and cotangents
# ----------------------------------------------------------------------------------------------


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

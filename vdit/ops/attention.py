"""Attention over packed (NaViT-style) sequences with segment ids.

Packed rows hold several samples back to back. Every token carries a segment id:
``1..S`` for the samples of a row and ``0`` for padding. A query token attends exactly the
key tokens with the same nonzero segment id; padding never attends and is never attended.
A query without any allowed key (padding, or a segment that has no keys, which can happen in
cross-attention) outputs exactly zero and receives a zero gradient.

Three implementations behind one entry point, :func:`attention`:

* ``"xla"``: dense reference, einsum + mask, O(L^2) memory.
* ``"chunked"``: blockwise (flash-attention style) online softmax in plain JAX with a
  ``jax.custom_vjp``; memory is O(L * block) in forward and backward. Block pairs that
  cannot share a nonzero segment are skipped, see :func:`block_ranges`.
* ``"splash"``: the Pallas TPU splash-attention kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``) with a full (non-causal) static mask
  and the segment ids as its ``SegmentIds``; see :func:`_attention_splash`. On other platforms
  it runs in Pallas interpret mode (slow; for tests).

``"auto"`` (:func:`resolve_impl`) is ``"splash"`` on TPU and ``"chunked"`` elsewhere.

Block skipping
--------------
For a block of query tokens let ``[qmin, qmax]`` be the smallest / largest nonzero segment id
in it (an all-padding block has the empty interval ``[INT32_MAX, 0]``), likewise ``[kmin, kmax]``
for key blocks. Key block ``j`` can only matter for query block ``i`` if the two intervals
intersect. With ``kmax_mono = cummax(kmax)`` and ``kmin_mono = reverse_cummin(kmin)`` (both
non-decreasing), every key block before ``lo = searchsorted(kmax_mono, qmin, "left")`` has
``kmax < qmin`` and every key block from ``hi = searchsorted(kmin_mono, qmax, "right")`` on has
``kmin > qmax``; so iterating ``[lo, hi)`` is correct for *any* layout (masking inside a block
still decides per token). For the documented layout (contiguous, non-decreasing ids with
padding at the end of the row) the two sequences are already monotone and ``[lo, hi)`` is
exactly the set of key blocks whose id interval intersects the query block's, so a row of
many short clips costs about ``sum_s n_q(s) * n_kv(s)`` rather than ``L_q * L_kv``.

Work items ``(batch row, query block)`` are processed sequentially with ``lax.map`` and each
runs a ``lax.fori_loop`` with data-dependent bounds (a while loop). The loop is never
vmapped (that would turn it into a max-trip-count masked loop). Heads are processed
together inside a block. The backward pass (FlashAttention-2 style) recomputes the scores
per block pair: a ``dq`` pass over query blocks (key-block ranges as in forward) and a
``dk, dv`` pass over key blocks using the symmetric ranges of query blocks.

Notes:
* Calling the chunked implementation under ``jax.vmap`` would batch the dynamic loops and lose
  the skipping; fold extra dimensions into the batch dimension instead.
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
import numpy as np
from jax import lax

IMPLS = ("xla", "chunked", "splash")
# What a config may ask for: a concrete implementation or "auto" (see `resolve_impl`).
IMPL_CHOICES = ("auto", *IMPLS)

# Finite stand-in for -inf: keeps max/exp free of inf - inf for rows without allowed keys.
_MASK_VALUE = -1e30
# Block "min id" of a block that holds only padding (empty id interval [_NO_ID, 0]).
_NO_ID = int(np.iinfo(np.int32).max)
# Blocks larger than a sequence are clipped to the sequence length rounded up to this.
_LENGTH_ALIGN = 8
# The splash kernel's blocks (and so the padded sequence lengths) are multiples of the TPU lane
# width: its segment-id masks are tiled over 128 lanes in both the forward and the dk/dv kernels.
SPLASH_ALIGN = 128

Precision = Any  # None, a jax.lax.Precision, a string such as "highest", or a pair of those.


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The concrete implementation for ``impl`` on ``platform`` (default: JAX's default backend).

    ``"auto"`` is ``"splash"`` on TPU and ``"chunked"`` anywhere else; other names pass through.
    """
    if impl not in IMPL_CHOICES:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPL_CHOICES}")
    if impl != "auto":
        return impl
    return "splash" if (platform or jax.default_backend()) == "tpu" else "chunked"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    impl: str = "xla",
    block_q: int = 512,
    block_kv: int = 512,
    precision: Precision = None,
    platform: str | None = None,
) -> jax.Array:
    """Segment-masked multi-head attention.

    Args:
      q: queries ``(B, Lq, H, D)``.
      k, v: keys / values ``(B, Lk, H, D)``.
      q_segment_ids: ``(B, Lq)`` integer ids, ``1..S`` per sample, ``0`` = padding.
      kv_segment_ids: ``(B, Lk)`` integer ids with the same numbering as ``q_segment_ids``.
        Passing the very same array as ``q_segment_ids`` (self-attention) lets ``"splash"`` skip
        looking for segments without keys.
      impl: one of :data:`IMPL_CHOICES` (``"auto"`` goes through :func:`resolve_impl`).
      block_q, block_kv: block sizes of ``"chunked"`` and ``"splash"`` (ignored by ``"xla"``).
        ``"chunked"`` clips them to the sequence length rounded up to a multiple of 8;
        ``"splash"`` rounds them up to a multiple of 128 and clips them to the sequence length
        rounded up to 128.
      precision: matmul precision passed to the einsums (``"splash"`` ignores it).
      platform: the platform the call is compiled for (``"tpu"``, ``"cpu"``, ...); default
        ``jax.default_backend()``. It decides what ``"auto"`` means and whether ``"splash"`` runs
        the compiled Mosaic kernel (TPU) or Pallas interpret mode (anywhere else). Pass it when
        compiling for devices other than the default backend's (e.g. ahead of time for a TPU
        topology from a CPU host).

    Returns:
      ``(B, Lq, H, D)`` in ``q.dtype``. Scores are scaled by ``1/sqrt(D)``; the softmax is
      computed in float32 whatever the input dtype.
    """
    platform = platform or jax.default_backend()
    impl = resolve_impl(impl, platform)
    same_ids = q_segment_ids is kv_segment_ids  # self-attention: every nonzero id has keys
    q_seg, kv_seg = _check_inputs(q, k, v, q_segment_ids, kv_segment_ids)
    if q.shape[1] == 0 or k.shape[1] == 0:
        return jnp.zeros(q.shape, q.dtype)
    if impl == "xla":
        return _attention_xla(q, k, v, q_seg, kv_seg, precision)
    if impl == "splash":
        interpret = platform != "tpu"
        return _attention_splash(
            q, k, v, q_seg, kv_seg, block_q, block_kv, interpret=interpret, same_ids=same_ids
        )
    return _attention_chunked(q, k, v, q_seg, kv_seg, block_q, block_kv, precision)


def _check_inputs(
    q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    shapes = (
        f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
        f"q_segment_ids {tuple(jnp.shape(q_segment_ids))}, "
        f"kv_segment_ids {tuple(jnp.shape(kv_segment_ids))}"
    )
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, L, H, D); got {shapes}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {shapes}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q and k must agree in batch, heads and head_dim; got {shapes}")
    if tuple(jnp.shape(q_segment_ids)) != tuple(q.shape[:2]):
        raise ValueError(f"q_segment_ids must be (B, Lq) = {tuple(q.shape[:2])}; got {shapes}")
    if tuple(jnp.shape(kv_segment_ids)) != tuple(k.shape[:2]):
        raise ValueError(f"kv_segment_ids must be (B, Lk) = {tuple(k.shape[:2])}; got {shapes}")
    q_seg = jnp.asarray(q_segment_ids)
    kv_seg = jnp.asarray(kv_segment_ids)
    for name, seg in (("q_segment_ids", q_seg), ("kv_segment_ids", kv_seg)):
        if not jnp.issubdtype(seg.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array; got dtype {seg.dtype}")
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Dense reference
# ----------------------------------------------------------------------------------------------


def _attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    precision: Precision,
) -> jax.Array:
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum(
        "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32, precision=precision
    )  # (B, H, Lq, Lk)
    s = s * scale
    mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)  # (B, Lq, Lk)
    mask = mask[:, None]  # (B, 1, Lq, Lk)
    s = jnp.where(mask, s, _MASK_VALUE)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))  # (B, H, Lq, 1)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)  # (B, H, Lq, Lk)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum(
        "bhqk,bkhd->bqhd", p, v.astype(jnp.float32), precision=precision
    )  # (B, Lq, H, D)
    return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Block ranges (shared by the kernel and the FLOP counter)
# ----------------------------------------------------------------------------------------------


def _effective_block(block: int, length: int) -> int:
    block = int(block)
    if block <= 0:
        raise ValueError(f"block sizes must be positive; got {block}")
    return min(block, _round_up(length, _LENGTH_ALIGN))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block_min_max(seg_blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(B, n, blk)`` ids -> min / max nonzero id per block, ``(B, n)`` each."""
    nonzero = seg_blocks != 0
    bmin = jnp.min(jnp.where(nonzero, seg_blocks, _NO_ID), axis=-1)
    bmax = jnp.max(jnp.where(nonzero, seg_blocks, 0), axis=-1)
    return bmin, bmax


def block_ranges(
    row_seg_blocks: jax.Array, col_seg_blocks: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """For every row block, the contiguous range ``[lo, hi)`` of column blocks to visit.

    Args:
      row_seg_blocks: ``(B, n_row, block_row)`` segment ids (e.g. query blocks).
      col_seg_blocks: ``(B, n_col, block_col)`` segment ids (e.g. key blocks).

    Returns:
      ``lo, hi``: ``(B, n_row)`` int32 with ``lo <= hi``. Column blocks outside ``[lo, hi)``
      share no nonzero segment id with the row block (for any layout); for contiguous
      non-decreasing layouts every block inside shares an id interval with it.
    """
    r_min, r_max = _block_min_max(row_seg_blocks)  # (B, n_row)
    c_min, c_max = _block_min_max(col_seg_blocks)  # (B, n_col)
    c_max_mono = lax.cummax(c_max, axis=1)
    c_min_mono = lax.cummin(c_min, axis=1, reverse=True)
    lo = jax.vmap(functools.partial(jnp.searchsorted, side="left"))(c_max_mono, r_min)
    hi = jax.vmap(functools.partial(jnp.searchsorted, side="right"))(c_min_mono, r_max)
    lo = lo.astype(jnp.int32)
    hi = jnp.maximum(hi.astype(jnp.int32), lo)
    return lo, hi


def _block_ranges_np(
    row_seg: np.ndarray, col_seg: np.ndarray, block_row: int, block_col: int
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin of :func:`block_ranges` on unblocked, unpadded ``(B, L)`` ids."""

    def blocked(seg: np.ndarray, block: int) -> np.ndarray:
        b, length = seg.shape
        padded = np.zeros((b, _round_up(length, block)), np.int64)
        padded[:, :length] = seg
        return padded.reshape(b, -1, block)

    def min_max(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nonzero = blocks != 0
        return (
            np.where(nonzero, blocks, _NO_ID).min(-1),
            np.where(nonzero, blocks, 0).max(-1),
        )

    r_min, r_max = min_max(blocked(row_seg, block_row))
    c_min, c_max = min_max(blocked(col_seg, block_col))
    c_max_mono = np.maximum.accumulate(c_max, axis=1)
    c_min_mono = np.minimum.accumulate(c_min[:, ::-1], axis=1)[:, ::-1]
    lo = np.stack(
        [np.searchsorted(c_max_mono[b], r_min[b], side="left") for b in range(len(r_min))]
    )
    hi = np.stack(
        [np.searchsorted(c_min_mono[b], r_max[b], side="right") for b in range(len(r_max))]
    )
    return lo, np.maximum(hi, lo)


# ----------------------------------------------------------------------------------------------
# FLOP accounting
# ----------------------------------------------------------------------------------------------


def _as_2d_ids(ids: Any) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"segment ids must be (B, L); got shape {arr.shape}")
    return arr.astype(np.int64)


def useful_attention_flops(
    q_segment_ids: Any, kv_segment_ids: Any, num_heads: int, head_dim: int
) -> int:
    """Forward FLOPs (QK^T and PV) that a perfect kernel needs for this layout.

    ``4 * H * D * sum_rows sum_{s > 0} n_q(s) * n_kv(s)``.
    """
    q_ids = _as_2d_ids(q_segment_ids)
    kv_ids = _as_2d_ids(kv_segment_ids)
    if q_ids.shape[0] != kv_ids.shape[0]:
        raise ValueError(f"batch mismatch: {q_ids.shape} vs {kv_ids.shape}")
    pairs = 0
    for q_row, kv_row in zip(q_ids, kv_ids, strict=True):
        n = int(max(q_row.max(initial=0), kv_row.max(initial=0))) + 1
        nq = np.bincount(q_row[q_row > 0], minlength=n)
        nkv = np.bincount(kv_row[kv_row > 0], minlength=n)
        pairs += int(np.dot(nq[1:], nkv[1:]))
    return 4 * num_heads * head_dim * pairs


def executed_block_pairs_chunked(
    q_segment_ids: Any, kv_segment_ids: Any, *, block_q: int = 512, block_kv: int = 512
) -> int:
    """Number of (q block, kv block) pairs the chunked forward pass visits."""
    q_ids = _as_2d_ids(q_segment_ids)
    kv_ids = _as_2d_ids(kv_segment_ids)
    if q_ids.shape[1] == 0 or kv_ids.shape[1] == 0:
        return 0
    bq = _effective_block(block_q, q_ids.shape[1])
    bk = _effective_block(block_kv, kv_ids.shape[1])
    lo, hi = _block_ranges_np(q_ids, kv_ids, bq, bk)
    return int(np.sum(hi - lo))


def executed_attention_flops_chunked(
    q_segment_ids: Any,
    kv_segment_ids: Any,
    num_heads: int,
    head_dim: int,
    *,
    block_q: int = 512,
    block_kv: int = 512,
) -> int:
    """Forward FLOPs the chunked implementation executes for this layout.

    ``executed (q block, kv block) pairs * 4 * H * D * block_q * block_kv`` with the block
    sizes after clipping to the sequence lengths.
    """
    q_ids = _as_2d_ids(q_segment_ids)
    kv_ids = _as_2d_ids(kv_segment_ids)
    if q_ids.shape[1] == 0 or kv_ids.shape[1] == 0:
        return 0
    bq = _effective_block(block_q, q_ids.shape[1])
    bk = _effective_block(block_kv, kv_ids.shape[1])
    pairs = executed_block_pairs_chunked(q_ids, kv_ids, block_q=bq, block_kv=bk)
    return 4 * num_heads * head_dim * bq * bk * pairs


# ----------------------------------------------------------------------------------------------
# Chunked (blockwise online-softmax) implementation
# ----------------------------------------------------------------------------------------------


def _attention_chunked(
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
    q, k, v, q_seg, kv_seg, bq, bk = _pad_to_blocks(q, k, v, q_seg, kv_seg, block_q, block_kv)
    out = _flash(q, k, v, q_seg, kv_seg, bq, bk, precision)  # (B, Lq_pad, H, D)
    return out[:, :lq]


def _pad_to_blocks(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    block_q: int,
    block_kv: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, int, int]:
    """Pads the sequence dims to block multiples with segment id 0; returns clipped blocks."""
    lq, lk = q.shape[1], k.shape[1]
    bq = _effective_block(block_q, lq)
    bk = _effective_block(block_kv, lk)
    pq = _round_up(lq, bq) - lq
    pk = _round_up(lk, bk) - lk
    if pq:
        q = jnp.pad(q, ((0, 0), (0, pq), (0, 0), (0, 0)))
        q_seg = jnp.pad(q_seg, ((0, 0), (0, pq)))
    if pk:
        k = jnp.pad(k, ((0, 0), (0, pk), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pk), (0, 0), (0, 0)))
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pk)))
    return q, k, v, q_seg, kv_seg, bq, bk


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
    out, _, _ = _flash_forward(q, k, v, q_seg, kv_seg, block_q, block_kv, precision)
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
    out, lse, _ = _flash_forward(q, k, v, q_seg, kv_seg, block_q, block_kv, precision)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(
    block_q: int,
    block_kv: int,
    precision: Precision,
    res: tuple[jax.Array, ...],
    dout: jax.Array,
) -> tuple[jax.Array | None, ...]:
    q, k, v, q_seg, kv_seg, out, lse = res
    delta = _delta(out, dout)
    dq, _ = _flash_dq(q, k, v, q_seg, kv_seg, dout, lse, delta, block_q, block_kv, precision)
    dk, dv, _ = _flash_dkv(q, k, v, q_seg, kv_seg, dout, lse, delta, block_q, block_kv, precision)
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


def _flash_forward(
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
            s = jnp.where(mask, _scores(q_blk, k_blk, scale, precision), _MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # (H, bq)
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)  # (H, bq, bk)
            alpha = jnp.exp(m - m_new)  # (H, bq)
            l = alpha * l + jnp.sum(p, axis=-1)
            pv = jnp.einsum("hqk,khd->hqd", p, v_blk.astype(jnp.float32), precision=precision)
            acc = alpha[..., None] * acc + pv
            return m_new, l, acc, count + 1

        init = _vary_like(
            (
                jnp.full((h, bq), _MASK_VALUE, jnp.float32),
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


def _delta(out: jax.Array, dout: jax.Array) -> jax.Array:
    """``rowsum(dO * O)`` as ``(B, Lq, H)`` float32."""
    return jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)


def _flash_dq(
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
            s = jnp.where(mask, _scores(q_blk, k_blk, scale, precision), _MASK_VALUE)
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


def _flash_dkv(
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
            s = jnp.where(mask, _scores(q_blk, k_blk, scale, precision), _MASK_VALUE)
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


def _debug_chunked_pair_counts(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    block_q: int = 512,
    block_kv: int = 512,
) -> dict[str, int]:
    """Block pairs actually visited by the chunked forward, dq and dk/dv loops (for tests)."""
    q_seg, kv_seg = _check_inputs(q, k, v, q_segment_ids, kv_segment_ids)
    counts = _pair_counts_jit(q, k, v, q_seg, kv_seg, block_q, block_kv)
    return {name: int(c) for name, c in zip(("forward", "dq", "dkv"), counts, strict=True)}


@functools.partial(jax.jit, static_argnums=(5, 6))
def _pair_counts_jit(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    block_q: int,
    block_kv: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v, q_seg, kv_seg, bq, bk = _pad_to_blocks(q, k, v, q_seg, kv_seg, block_q, block_kv)
    out, lse, n_fwd = _flash_forward(q, k, v, q_seg, kv_seg, bq, bk, None)
    dout = jnp.ones_like(out)
    delta = _delta(out, dout)
    _, n_dq = _flash_dq(q, k, v, q_seg, kv_seg, dout, lse, delta, bq, bk, None)
    _, _, n_dkv = _flash_dkv(q, k, v, q_seg, kv_seg, dout, lse, delta, bq, bk, None)
    return n_fwd, n_dq, n_dkv


# ----------------------------------------------------------------------------------------------
# Splash attention (Pallas TPU kernel)
# ----------------------------------------------------------------------------------------------


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
        out.append(min(_round_up(block, SPLASH_ALIGN), _round_up(max(length, 1), SPLASH_ALIGN)))
    return out[0], out[1]


def executed_attention_flops_splash(
    q_segment_ids: Any,
    kv_segment_ids: Any,
    num_heads: int,
    head_dim: int,
    *,
    block_q: int = 512,
    block_kv: int = 512,
) -> int:
    """Forward FLOPs the splash kernel executes: every block pair of the padded sequences.

    With a full static mask the kernel's block-sparsity tables mark every block pair as
    computable; segment ids only mask scores inside a block, so nothing is skipped.
    """
    q_ids = _as_2d_ids(q_segment_ids)
    kv_ids = _as_2d_ids(kv_segment_ids)
    b, lq = q_ids.shape
    lk = kv_ids.shape[1]
    if lq == 0 or lk == 0:
        return 0
    bq, bk = splash_blocks(block_q, block_kv, lq, lk)
    return 4 * num_heads * head_dim * b * _round_up(lq, bq) * _round_up(lk, bk)


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


def _attention_splash(
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
    pq, pk = _round_up(lq, bq) - lq, _round_up(lk, bk) - lk
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

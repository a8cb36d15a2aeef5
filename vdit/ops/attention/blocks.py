"""Blocks of a packed sequence: block sizes, padding to blocks, the blocked view, block ranges.

The chunked kernel iterates these ranges and the FLOP counter (:mod:`vdit.flops`) counts them,
from the same rule here in jnp (traced, per call) and in numpy (host side, per layout). Its
forward, dq and dk/dv passes all read q, k, v and the segment ids through one
:class:`BlockedView`.

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
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Block "min id" of a block that holds only padding (empty id interval [_NO_ID, 0]).
_NO_ID = int(np.iinfo(np.int32).max)
# Blocks larger than a sequence are clipped to the sequence length rounded up to this.
_LENGTH_ALIGN = 8


def round_up(x: int, m: int) -> int:
    """``x`` rounded up to a multiple of ``m``."""
    return -(-x // m) * m


def effective_block(block: int, length: int) -> int:
    """The chunked kernel's block for a sequence of ``length``: clipped to it, rounded up to 8."""
    block = int(block)
    if block <= 0:
        raise ValueError(f"block sizes must be positive; got {block}")
    return min(block, round_up(length, _LENGTH_ALIGN))


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


def block_ranges_np(
    row_seg: np.ndarray, col_seg: np.ndarray, block_row: int, block_col: int
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin of :func:`block_ranges` on unblocked, unpadded ``(B, L)`` ids."""

    def blocked(seg: np.ndarray, block: int) -> np.ndarray:
        b, length = seg.shape
        padded = np.zeros((b, round_up(length, block)), np.int64)
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


def pad_to_blocks(
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
    bq = effective_block(block_q, lq)
    bk = effective_block(block_kv, lk)
    pq = round_up(lq, bq) - lq
    pk = round_up(lk, bk) - lk
    if pq:
        q = jnp.pad(q, ((0, 0), (0, pq), (0, 0), (0, 0)))
        q_seg = jnp.pad(q_seg, ((0, 0), (0, pq)))
    if pk:
        k = jnp.pad(k, ((0, 0), (0, pk), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pk), (0, 0), (0, 0)))
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pk)))
    return q, k, v, q_seg, kv_seg, bq, bk


@dataclasses.dataclass(frozen=True)
class BlockedView:
    """Block-padded q, k, v and segment ids cut into blocks along the sequence.

    Block ``i`` of batch row ``r`` is entry ``r * nq + i`` (query side) or ``r * nk + i`` (key
    side) of the leading axis. The chunked forward, dq and dk/dv passes all read their blocks
    and block ranges from one view.
    """

    q: jax.Array  # (B * nq, bq, H, D)
    k: jax.Array  # (B * nk, bk, H, D)
    v: jax.Array  # (B * nk, bk, H, D)
    q_seg: jax.Array  # (B * nq, bq) int32
    kv_seg: jax.Array  # (B * nk, bk) int32
    batch: int  # B
    nq: int  # query blocks per row
    nk: int  # key blocks per row

    @classmethod
    def of(
        cls,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        q_seg: jax.Array,
        kv_seg: jax.Array,
        bq: int,
        bk: int,
    ) -> BlockedView:
        """The view of ``(B, Lq, H, D)``, ``(B, Lk, H, D)`` arrays padded to blocks ``bq``, ``bk``."""
        b, lq, h, d = q.shape
        lk = k.shape[1]
        nq, nk = lq // bq, lk // bk
        return cls(
            q=q.reshape(b * nq, bq, h, d),
            k=k.reshape(b * nk, bk, h, d),
            v=v.reshape(b * nk, bk, h, d),
            q_seg=q_seg.reshape(b * nq, bq),
            kv_seg=kv_seg.reshape(b * nk, bk),
            batch=b,
            nq=nq,
            nk=nk,
        )

    @property
    def bq(self) -> int:
        return self.q.shape[1]

    @property
    def bk(self) -> int:
        return self.k.shape[1]

    @property
    def heads(self) -> int:
        return self.q.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def scale(self) -> float:
        """Score scale ``1/sqrt(D)``."""
        return 1.0 / math.sqrt(self.head_dim)

    def q_blocks(self, x: jax.Array) -> jax.Array:
        """``(B, Lq, ...)`` -> ``(B * nq, bq, ...)``: a per-query array cut like ``q``."""
        return x.reshape(self.batch * self.nq, self.bq, *x.shape[2:])

    def unblock_q(self, x: jax.Array) -> jax.Array:
        """``(B * nq, bq, ...)`` -> ``(B, Lq, ...)``."""
        return x.reshape(self.batch, self.nq * self.bq, *x.shape[2:])

    def unblock_kv(self, x: jax.Array) -> jax.Array:
        """``(B * nk, bk, ...)`` -> ``(B, Lk, ...)``."""
        return x.reshape(self.batch, self.nk * self.bk, *x.shape[2:])

    def kv_ranges(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """For every query block: its row and the range ``[lo, hi)`` of key blocks, ``(B * nq,)``."""
        return self._ranges(self.q_seg, self.nq, self.kv_seg, self.nk)

    def q_ranges(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """For every key block: its row and the (symmetric) range of query blocks, ``(B * nk,)``."""
        return self._ranges(self.kv_seg, self.nk, self.q_seg, self.nq)

    def _ranges(
        self, row_seg: jax.Array, n_row: int, col_seg: jax.Array, n_col: int
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        b = self.batch
        lo, hi = block_ranges(row_seg.reshape(b, n_row, -1), col_seg.reshape(b, n_col, -1))
        rows = jnp.repeat(jnp.arange(b, dtype=jnp.int32), n_row)
        return rows, lo.reshape(-1), hi.reshape(-1)

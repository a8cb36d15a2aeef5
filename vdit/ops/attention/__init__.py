"""Attention over packed (NaViT-style) sequences with segment ids: one entry point, four kernels.

Packed rows hold several samples back to back. Every token carries a segment id:
``1..S`` for the samples of a row and ``0`` for padding. A query token attends exactly the
key tokens with the same nonzero segment id; padding never attends and is never attended.
A query without any allowed key (padding, or a segment that has no keys, which can happen in
cross-attention) outputs exactly zero and receives a zero gradient.

Four implementations behind one entry point, :func:`attention`, one module each:

* ``"xla"`` (:mod:`.reference`): dense reference, einsum + mask, O(L^2) memory.
* ``"chunked"`` (:mod:`.chunked`): blockwise (flash-attention style) online softmax in plain JAX
  with a ``jax.custom_vjp``; memory is O(L * block) in forward and backward. Block pairs that
  cannot share a nonzero segment are skipped (:mod:`.blocks`).
* ``"splash"`` (:mod:`.splash`): the Pallas TPU splash-attention kernel with a full (non-causal)
  static mask and the segment ids as its ``SegmentIds``. On other platforms it runs in Pallas
  interpret mode (slow; for tests).
* ``"gpu"`` (:mod:`.gpu`): a Pallas Triton flash kernel (forward, dq, dk/dv) with the chunked
  kernel's segment masking and block skipping. Off GPU it runs in Pallas interpret mode (slow;
  for tests).

``"auto"`` (:func:`resolve_impl`) is ``"splash"`` on TPU, ``"gpu"`` on GPU and ``"chunked"``
elsewhere (CPU). FLOP
counts of each implementation for a layout live in :mod:`vdit.flops`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vdit.ops.attention.chunked import attention_chunked
from vdit.ops.attention.gpu import attention_gpu
from vdit.ops.attention.reference import Precision, attention_xla
from vdit.ops.attention.splash import attention_splash

IMPLS = ("xla", "chunked", "splash", "gpu")
# What "auto" means on each platform (`jax.Device.platform` / `jax.default_backend()`); others: chunked.
AUTO_IMPL = {"tpu": "splash", "gpu": "gpu"}
# What a config may ask for: a concrete implementation or "auto" (see `resolve_impl`).
IMPL_CHOICES = ("auto", *IMPLS)


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The concrete implementation for ``impl`` on ``platform`` (default: JAX's default backend).

    ``"auto"`` is ``"splash"`` on TPU, ``"gpu"`` on GPU and ``"chunked"`` anywhere else
    (:data:`AUTO_IMPL`); other names pass through.
    """
    if impl not in IMPL_CHOICES:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPL_CHOICES}")
    if impl != "auto":
        return impl
    return AUTO_IMPL.get(platform or jax.default_backend(), "chunked")


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
      block_q, block_kv: block sizes of ``"chunked"``, ``"splash"`` and ``"gpu"`` (ignored by
        ``"xla"``). ``"chunked"`` clips them to the sequence length rounded up to a multiple of 8;
        ``"splash"`` rounds them up to a multiple of 128 and clips them to the sequence length
        rounded up to 128; ``"gpu"`` rounds them up to a power of two (at least 16) and clips
        them to the sequence length rounded up to a power of two.
      precision: matmul precision passed to the einsums (``"splash"`` and ``"gpu"`` ignore it).
      platform: the platform the call is compiled for (``"tpu"``, ``"cpu"``, ...); default
        ``jax.default_backend()``. It decides what ``"auto"`` means and whether ``"splash"`` runs
        the compiled Mosaic kernel (TPU) and ``"gpu"`` the compiled Triton kernel (GPU), or
        Pallas interpret mode (anywhere else). Pass it when
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
        return attention_xla(q, k, v, q_seg, kv_seg, precision)
    if impl == "splash":
        interpret = platform != "tpu"
        return attention_splash(
            q, k, v, q_seg, kv_seg, block_q, block_kv, interpret=interpret, same_ids=same_ids
        )
    if impl == "gpu":
        interpret = platform != "gpu"
        return attention_gpu(q, k, v, q_seg, kv_seg, block_q, block_kv, interpret=interpret)
    return attention_chunked(q, k, v, q_seg, kv_seg, block_q, block_kv, precision)


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

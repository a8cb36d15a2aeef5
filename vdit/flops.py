"""Analytic FLOPs of attention for a layout of segment ids and of one VideoDiT train step; MFU.

All FLOP counting lives here: the attention counters follow the kernels' block rules
(:mod:`vdit.ops.attention.blocks`, :func:`vdit.ops.attention.splash.splash_blocks`,
:func:`vdit.ops.attention.gpu.gpu_blocks`), and
:func:`step_flops` counts one forward + backward pass of VideoDiT on a packed batch.

Conventions:

* A dense layer ``(din -> dout)`` costs ``2 * din * dout`` FLOPs per token forward (multiply-add = 2);
  biases, norms, activations, RoPE, softmax and the optimizer update are not counted (they are
  elementwise and small next to the matmuls at real widths).
* Backward of a dense layer is ``2x`` its forward (input gradient + weight gradient), except for the
  layers whose input does not depend on parameters (``patch_embed``, ``time_fc1``, ``pos_embed``
  and, for precomputed text, ``text_proj``): autodiff skips their input gradient, so their backward
  is ``1x``.
* Dense matmuls run over every row slot, padding included (``"matmul"``); ``"matmul_useful"`` counts
  only the non-padding tokens.
* Attention forward is ``QK^T + PV`` = ``4 * H * K`` FLOPs per (query, key) pair. Useful pairs are
  those inside one segment (:func:`useful_attention_flops`); executed pairs are
  all ``Lq * Lk`` of a row for ``"xla"``, the visited block pairs for ``"chunked"`` and ``"gpu"``
  (with its power-of-two blocks and head dimension) and every block
  pair of the block-padded row for ``"splash"`` (it does not skip blocks by segment). ``"auto"`` is
  counted as what it resolves to on JAX's default backend.
* Attention backward: ``2x`` forward for useful (model) FLOPs and for the dense ``"xla"``
  implementation (dS -> dQ, dK and dP, dV: four matmuls for the forward's two, no recompute). The
  ``"chunked"`` kernel recomputes the scores in both of its backward passes (dq pass: QK^T, dO V^T,
  dS K; dk/dv pass: QK^T, P^T dO, dO V^T, dS^T Q), seven block matmuls, so its executed backward is
  ``3.5x`` forward; so do ``"splash"`` and ``"gpu"`` (separate dq and dk/dv kernels, the same
  seven).
  (FlashAttention papers count ``2.5x``: one recompute of QK^T.)
* Rematerialisation re-runs forward work of the blocks in the backward pass: ``"full"`` all of it
  except the cross-attention k, v projections of the text (XLA computes those once);
  ``"save_dots_no_batch"`` (and ``"save_dots"`` with the chunked, splash or GPU kernel) the attention
  forward;
  ``"save_dots"`` with dense attention only elementwise work. That work is reported
  as ``"recompute"``, included in ``"total_executed"`` and excluded from model FLOPs
  (``"total_useful"``), which is the numerator of MFU.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from vdit.models import layers
from vdit.models.dit import POS_FEATURES, DiTConfig
from vdit.ops.attention import resolve_impl
from vdit.ops.attention.blocks import block_ranges_np, effective_block, round_up
from vdit.ops.attention.gpu import GPU_MIN_BLOCK, gpu_blocks
from vdit.ops.attention.splash import splash_blocks

# Width of the sinusoidal timestep embedding fed to time_fc1 (fixed in VideoDiT).
TIME_EMBED_DIM = 256
# The text encoder's attention layers use `layers.Attention`'s default chunked block size.
TEXT_ATTN_BLOCK: int = inspect.signature(layers.Attention.__init__).parameters["block"].default
# Backward / forward ratios of attention (see the module docstring).
ATTN_BWD_USEFUL = 2.0
ATTN_BWD_EXECUTED = {"xla": 2.0, "chunked": 3.5, "splash": 3.5, "gpu": 3.5}
# Parts whose input is not a function of the parameters: backward computes only the weight gradient.
_NO_INPUT_GRAD = frozenset({"patch_embed", "time_fc1", "pos_embed"})


# ----------------------------------------------------------------------------------------------
# Attention FLOPs of one layer for a layout of segment ids
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
    bq = effective_block(block_q, q_ids.shape[1])
    bk = effective_block(block_kv, kv_ids.shape[1])
    lo, hi = block_ranges_np(q_ids, kv_ids, bq, bk)
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
    bq = effective_block(block_q, q_ids.shape[1])
    bk = effective_block(block_kv, kv_ids.shape[1])
    pairs = executed_block_pairs_chunked(q_ids, kv_ids, block_q=bq, block_kv=bk)
    return 4 * num_heads * head_dim * bq * bk * pairs


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
    return 4 * num_heads * head_dim * b * round_up(lq, bq) * round_up(lk, bk)


def executed_attention_flops_gpu(
    q_segment_ids: Any,
    kv_segment_ids: Any,
    num_heads: int,
    head_dim: int,
    *,
    block_q: int = 512,
    block_kv: int = 512,
) -> int:
    """Forward FLOPs the GPU kernel executes: the visited block pairs (the chunked kernel's rule)
    of its power-of-two blocks (:func:`gpu_blocks`), at the head dimension padded to a power of
    two (at least 16)."""
    q_ids = _as_2d_ids(q_segment_ids)
    kv_ids = _as_2d_ids(kv_segment_ids)
    if q_ids.shape[1] == 0 or kv_ids.shape[1] == 0:
        return 0
    bq, bk = gpu_blocks(block_q, block_kv, q_ids.shape[1], kv_ids.shape[1])
    lo, hi = block_ranges_np(q_ids, kv_ids, bq, bk)
    dp = 1 << (max(head_dim, GPU_MIN_BLOCK) - 1).bit_length()
    return 4 * num_heads * dp * bq * bk * int(np.sum(hi - lo))


# ----------------------------------------------------------------------------------------------
# FLOPs of a train step
# ----------------------------------------------------------------------------------------------


def _dense(din: int, dout: int) -> float:
    return 2.0 * din * dout


def matmul_flops_per_token(cfg: DiTConfig) -> dict[str, float]:
    """Forward FLOPs per video token (row slot) by part, all blocks summed."""
    d, p, n = cfg.width, cfg.patch_dim, cfg.depth
    f = cfg.mlp_hidden
    parts = {
        "patch_embed": _dense(p, d),
        "time_fc1": _dense(TIME_EMBED_DIM, d),
        "time_fc2": _dense(d, d),
        "time_proj": _dense(d, 6 * d),
        "self_attn_proj": n * 4 * _dense(d, d),  # q, k, v, o
        "cross_q_o": n * 2 * _dense(d, d),
        "mlp": n * (_dense(d, f) + _dense(f, d)),
        "head": _dense(d, p),
    }
    if cfg.pos_embed == "fractional":  # Fourier features of the position -> D
        parts["pos_embed"] = _dense(POS_FEATURES, d)
    return parts


def text_matmul_flops_per_token(cfg: DiTConfig) -> dict[str, float]:
    """Forward FLOPs per text token (row slot) by part."""
    t, d = cfg.text, cfg.width
    e = t.width
    parts = {}
    if t.kind == "bytes":
        parts["text_encoder"] = t.depth * (4 * _dense(e, e) + _dense(e, 4 * e) + _dense(4 * e, e))
    parts["text_proj"] = _dense(t.out_width, d)
    parts["text_out"] = _dense(d, d)
    parts["cross_kv"] = cfg.depth * 2 * _dense(d, d)
    if cfg.text_pool:  # one pooled vector per segment id, C + 1 per row: counted per text slot
        parts["text_pool"] = _dense(d, d)
    return parts


def text_flops_per_token(cfg: DiTConfig) -> float:
    """Forward FLOPs per text token: text encoder, text_proj/text_out, every block's cross k and v
    (and text_pool's projection, one per text slot)."""
    return sum(text_matmul_flops_per_token(cfg).values())


def _fwd_bwd(parts: dict[str, float], no_input_grad: frozenset[str]) -> float:
    return sum(v * (2.0 if k in no_input_grad else 3.0) for k, v in parts.items())


def _attention(
    q_seg: np.ndarray, kv_seg: np.ndarray, heads: int, head_dim: int, impl: str, block: int
) -> tuple[float, float]:
    """(useful, executed) forward FLOPs of one attention layer over the batch."""
    useful = float(useful_attention_flops(q_seg, kv_seg, heads, head_dim))
    impl = resolve_impl(impl)
    if impl == "xla":
        executed = 4.0 * heads * head_dim * q_seg.shape[0] * q_seg.shape[1] * kv_seg.shape[1]
    elif impl == "chunked":
        executed = float(
            executed_attention_flops_chunked(
                q_seg, kv_seg, heads, head_dim, block_q=block, block_kv=block
            )
        )
    elif impl == "splash":
        executed = float(
            executed_attention_flops_splash(
                q_seg, kv_seg, heads, head_dim, block_q=block, block_kv=block
            )
        )
    elif impl == "gpu":
        executed = float(
            executed_attention_flops_gpu(
                q_seg, kv_seg, heads, head_dim, block_q=block, block_kv=block
            )
        )
    else:
        raise ValueError(f"unknown attention impl {impl!r}")
    return useful, executed


def attention_forward_flops(
    cfg: DiTConfig,
    segment_ids: np.ndarray,
    text_segment_ids: np.ndarray,
    *,
    attn_impl: str | None = None,
) -> dict[str, float]:
    """Forward attention FLOPs (QK^T + PV) over a batch, all layers summed, by kind.

    Keys ``{self,cross,text}_{useful,executed}``: the blocks' video self-attention, the blocks'
    cross-attention to the text, the text encoder's self-attention (0 for precomputed text).
    """
    seg, tseg = np.asarray(segment_ids), np.asarray(text_segment_ids)
    impl = attn_impl or cfg.attn_impl
    h, k = cfg.heads, cfg.width // cfg.heads
    out = {}
    out["self_useful"], out["self_executed"] = _attention(seg, seg, h, k, impl, cfg.attn_block)
    out["cross_useful"], out["cross_executed"] = _attention(seg, tseg, h, k, impl, cfg.attn_block)
    out = {name: cfg.depth * v for name, v in out.items()}
    out["text_useful"] = out["text_executed"] = 0.0
    if cfg.text.kind == "bytes":
        th, text_impl = cfg.text.heads, attn_impl or cfg.text.attn_impl
        u, x = _attention(tseg, tseg, th, cfg.text.width // th, text_impl, TEXT_ATTN_BLOCK)
        out["text_useful"], out["text_executed"] = cfg.text.depth * u, cfg.text.depth * x
    return out


def step_flops(
    cfg: DiTConfig,
    segment_ids: np.ndarray,
    text_segment_ids: np.ndarray,
    *,
    attn_impl: str | None = None,
    remat: str | None = None,
) -> dict[str, float]:
    """FLOPs of one forward + backward pass over a packed batch with ids (B, L) and (B, C).

    `attn_impl` / `remat` override the config's (the text encoder follows `attn_impl` too).
    Returns ``matmul``, ``matmul_useful``, ``attention_useful``, ``attention_executed``,
    ``recompute``, ``total_useful`` (model FLOPs) and ``total_executed`` (incl. recompute), and
    ``text``: the part of ``matmul`` spent on text tokens (encoder, projections, cross k and v).
    """
    seg = np.asarray(segment_ids)
    tseg = np.asarray(text_segment_ids)
    if seg.ndim != 2 or tseg.ndim != 2 or seg.shape[0] != tseg.shape[0]:
        raise ValueError(f"expected ids (B, L) and (B, C); got {seg.shape} and {tseg.shape}")
    impl = resolve_impl(attn_impl or cfg.attn_impl)
    text_impl = resolve_impl(attn_impl or cfg.text.attn_impl)
    remat = cfg.remat if remat is None else remat
    video_slots, text_slots = float(seg.size), float(tseg.size)
    video_tokens, text_tokens = float((seg > 0).sum()), float((tseg > 0).sum())

    video_parts = matmul_flops_per_token(cfg)
    text_parts = text_matmul_flops_per_token(cfg)
    text_no_grad = frozenset({"text_proj"}) if cfg.text.kind == "precomputed" else frozenset()
    video_fb = _fwd_bwd(video_parts, _NO_INPUT_GRAD)
    text_fb = _fwd_bwd(text_parts, text_no_grad)
    matmul = video_slots * video_fb + text_slots * text_fb
    matmul_useful = video_tokens * video_fb + text_tokens * text_fb

    attn = attention_forward_flops(cfg, seg, tseg, attn_impl=attn_impl)
    block_attn_u = attn["self_useful"] + attn["cross_useful"]
    block_attn_x = attn["self_executed"] + attn["cross_executed"]
    attention_useful = (1.0 + ATTN_BWD_USEFUL) * (block_attn_u + attn["text_useful"])
    attention_executed = (1.0 + ATTN_BWD_EXECUTED[impl]) * block_attn_x
    attention_executed += (1.0 + ATTN_BWD_EXECUTED[text_impl]) * attn["text_executed"]

    recompute = 0.0
    if remat == "full":  # every block's forward runs again in the backward pass ...
        block_mm = sum(video_parts[p] for p in ("self_attn_proj", "cross_q_o", "mlp"))
        # ... except the cross-attention k, v projections of the text context: their inputs are the
        # same in both passes and XLA computes them once (seen in the compiled HLO).
        recompute = video_slots * block_mm + block_attn_x
    elif remat == "save_dots_no_batch" or (
        remat == "save_dots" and impl in ("chunked", "splash", "gpu")
    ):
        # Dense-layer outputs are saved; the attention forward is not (its einsums have batch dims,
        # and the chunked / splash / GPU kernels' outputs come from loops or a kernel call, not dots), so
        # it runs again.
        recompute = block_attn_x
    elif remat not in ("none", "save_dots"):
        raise ValueError(f"unknown remat policy {remat!r}")

    return {
        "matmul": matmul,
        "matmul_useful": matmul_useful,
        "attention_useful": attention_useful,
        "attention_executed": attention_executed,
        "recompute": recompute,
        "text": text_slots * text_fb,
        "total_useful": matmul_useful + attention_useful,
        "total_executed": matmul + attention_executed + recompute,
    }


def mfu(model_flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved model FLOPs/s over the hardware peak."""
    if peak_flops_per_s <= 0:
        raise ValueError(f"peak_flops_per_s={peak_flops_per_s} must be positive")
    return model_flops_per_s / peak_flops_per_s

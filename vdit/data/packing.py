"""Spacetime patches and NaViT-style packing into the packed-batch contract (see DESIGN.md).

A sample's latent (T, H, W, C) becomes N = (T/pt)(H/ph)(W/pw) tokens of P = pt*ph*pw*C values, in
(t, h, w) row-major order, each with its (t, h, w) grid position. Samples of any size are then packed
best-fit into rows of `row_len` tokens by grain; text is packed in step with the video and each
sample's grid travels as a one-entry feature, so `grid[b, s - 1]` belongs to segment s of row b.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import einops
import grain
import numpy as np

# The packed batch: every key and its shape. B rows, L tokens, C text tokens, S samples per row.
BATCH_KEYS: dict[str, str] = {
    "patches": "(B, L, P) float32 clean latent patches",
    "segment_ids": "(B, L) int32: 1..S sample of each token, 0 = padding",
    "positions": "(B, L, 3) int32 (t, h, w) patch index inside the sample's grid",
    "text": "(B, C) int32 token ids, or (B, C, E) float embeddings",
    "text_segment_ids": "(B, C) int32 sample of each text token, 0 = padding",
    "text_positions": "(B, C) int32 index of each text token inside its caption",
    "cond_mask": "(B, L) bool tokens given clean as conditioning",
    "loss_mask": "(B, L) bool tokens counted in the loss",
    "grid": "(B, S, 3) int32 latent grid (T, H, W) of each sample, 0 for unused slots",
}


def batch_shapes(
    rows: int, row_len: int, text_len: int, max_samples: int, patch_dim: int, text_dim: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every key of BATCH_KEYS for B=`rows`, L=`row_len`, C=`text_len`,
    S=`max_samples`, P=`patch_dim`; text is int32 token ids when `text_dim` is 0, else float32
    embeddings of E=`text_dim` (what abstract batches for compiling are made of)."""
    b, n, t, s = rows, row_len, text_len, max_samples
    text = ((b, t), np.int32) if text_dim == 0 else ((b, t, text_dim), np.float32)
    shapes = {
        "patches": ((b, n, patch_dim), np.float32),
        "segment_ids": ((b, n), np.int32),
        "positions": ((b, n, 3), np.int32),
        "text": text,
        "text_segment_ids": ((b, t), np.int32),
        "text_positions": ((b, t), np.int32),
        "cond_mask": ((b, n), np.bool_),
        "loss_mask": ((b, n), np.bool_),
        "grid": ((b, s, 3), np.int32),
    }
    return {k: (shape, np.dtype(dt)) for k, (shape, dt) in shapes.items()}


def patchify(latent: np.ndarray, patch: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W, C) -> patches (N, P) and positions (N, 3)."""
    pt, ph, pw = patch
    t, h, w, _ = latent.shape
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent grid {(t, h, w)} is not divisible by the patch {patch}")
    patches = einops.rearrange(
        latent, "(t pt) (h ph) (w pw) c -> (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw
    )
    grid = np.stack(
        np.meshgrid(np.arange(t // pt), np.arange(h // ph), np.arange(w // pw), indexing="ij"), -1
    )
    return patches, grid.reshape(-1, 3).astype(np.int32)


def unpatchify(patches, grid: tuple[int, int, int], patch: tuple[int, int, int]):
    """Patches (N, P) of one whole sample -> latent (T, H, W, C). Works on numpy and jax arrays."""
    pt, ph, pw = patch
    t, h, w = grid
    return einops.rearrange(
        patches,
        "(t h w) (pt ph pw c) -> (t pt) (h ph) (w pw) c",
        t=t // pt,
        h=h // ph,
        w=w // pw,
        pt=pt,
        ph=ph,
        pw=pw,
    )


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    """Named like the data section's fields (configs/default.py)."""

    row_len: int  # L: video tokens per row
    text_len: int  # C: text tokens per row
    max_samples_per_row: int  # S: samples per row at most
    packing_bins: int  # rows packed together (more bins -> higher fill, more host memory)
    seed: int


def pack(
    ds: grain.IterDataset, cfg: PackingConfig, sample_features: tuple[str, ...] = ()
) -> grain.IterDataset:
    """Best-fit pack per-sample dicts into rows in the packed-batch contract.

    Each input element holds ``patches`` (N, P), ``positions`` (N, 3), ``cond_mask`` (N,), ``text``
    (Nc,) or (Nc, E), and ``grid`` (1, 3). A sample longer than the row or with more text than `text_len`
    is an error here: the size policy upstream guarantees it never happens. `sample_features` name
    extra one-entry-per-sample arrays (shape (1,) or (1, K)) carried through as (S,) or (S, K) per
    row, like ``grid``.
    """
    lengths = {
        "patches": cfg.row_len,
        "positions": cfg.row_len,
        "cond_mask": cfg.row_len,
        "text": cfg.text_len,
        "grid": cfg.max_samples_per_row,
        **{k: cfg.max_samples_per_row for k in sample_features},
    }
    packed = grain.experimental.BestFitPackIterDataset(
        ds,
        length_struct=lengths,
        num_packing_bins=cfg.packing_bins,
        seed=cfg.seed,
        shuffle_bins=True,
        max_sequences_per_bin=cfg.max_samples_per_row,
    )
    return packed.map(lambda row: _to_contract(row, sample_features))


def _to_contract(row: dict[str, Any], sample_features: tuple[str, ...]) -> dict[str, np.ndarray]:
    seg = row["patches_segment_ids"].astype(np.int32)
    cond = row["cond_mask"].astype(bool)
    return {
        **{k: row[k] for k in sample_features},
        "patches": row["patches"].astype(np.float32),
        "segment_ids": seg,
        "positions": row["positions"].astype(np.int32),
        "text": row["text"],
        "text_segment_ids": row["text_segment_ids"].astype(np.int32),
        "text_positions": row["text_positions"].astype(np.int32),
        "cond_mask": cond,
        "loss_mask": (seg > 0) & ~cond,
        "grid": row["grid"].astype(np.int32),
    }


def unpack_row(batch: dict[str, np.ndarray], row: int, patch: tuple[int, int, int]) -> list[dict]:
    """The samples of one packed row (for tests and inspection): each sample's tokens, positions and
    text, and its latent (T, H, W, C) when no token of it was dropped (else None)."""
    out = []
    seg = np.asarray(batch["segment_ids"][row])
    for s in range(1, int(seg.max(initial=0)) + 1):
        sel = seg == s
        grid = tuple(int(v) for v in batch["grid"][row, s - 1])
        tokens = np.asarray(batch["patches"][row][sel])
        whole = tokens.shape[0] == np.prod(grid) // np.prod(patch)
        out.append(
            {
                "latent": unpatchify(tokens, grid, patch) if whole else None,
                "patches": tokens,
                "positions": np.asarray(batch["positions"][row][sel]),
                "text": np.asarray(
                    batch["text"][row][np.asarray(batch["text_segment_ids"][row]) == s]
                ),
                "grid": grid,
            }
        )
    return out

"""Precomputed caption embeddings: the one format that prepared records, latent records, training
(`model.text.kind="precomputed"`) and sampling share.

A caption embedding is what a text encoder (T5 / UMT5, as Wan and Open-Sora use, or any other) outputs for
one caption: its last hidden states for the caption's real tokens, padding removed, as a float array
(Nc, E) with 1 <= Nc (Nc counts the tokens the encoder saw, an end token included). Where it lives:

| where                         | member / key            | what                                               |
|-------------------------------|-------------------------|----------------------------------------------------|
| prepared record (records.py)  | `text_embedding`        | float16 (Nc, E): the embedding of `caption`        |
| latent record (latents.py)    | `text_embedding`        | float16 (Nc, E), carried over from the input       |
| either record                 | `text_encoder`          | str (): the encoder's name (`ENCODER_KEY`)         |
| the folder's `manifest.json`  | `"text_embedding"`      | {"width": E, "encoder": name, "null": NULL_FILE}   |
| beside the manifest           | `text_null.npy`         | float16 (N0, E): the embedding of the empty caption|
| a training work directory     | `text_null.npy`         | copied there when training starts                  |

The empty caption's embedding (`NULL_FILE`) is what caption dropout trains on and what the unconditional
pass of classifier-free guidance samples with, so a model trained on precomputed text and the sampler
agree on "no caption" without running the encoder again. Embeddings are stored as float16 (half the
bytes; the DiT's `text_proj` reads them as float32) and a sample keeps at most `data.text_max_len` of
their rows (the cut is counted as a `caption_cut` event, as for byte tokens).

`vdit sample --text_embedding=FILE.npy` takes one (Nc, E) array saved with `numpy.save`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

MEMBER = "text_embedding"  # record member: float16 (Nc, E)
ENCODER_KEY = "text_encoder"  # record member: str, the encoder's name
MANIFEST_KEY = "text_embedding"  # manifest key: {"width", "encoder", "null"}
NULL_FILE = (
    "text_null.npy"  # the empty caption's embedding, beside the manifest / in a work directory
)
DTYPE = np.float16


def check(emb: Any, width: int | None = None, what: str = "text embedding") -> np.ndarray:
    """`emb` as a float16 (Nc, E) array, or a ValueError that names what is wrong with it."""
    a = np.asarray(emb)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(
            f"{what}: expected a (tokens, width) array with tokens >= 1, got {a.shape}"
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what}: expected floats, got {a.dtype}")
    if width is not None and a.shape[1] != width:
        raise ValueError(
            f"{what}: width {a.shape[1]} but the model's text width is {width} "
            "(set model.text.width to the encoder's width)"
        )
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: contains NaN or infinite values")
    return a.astype(DTYPE)


def save(path: str, emb: Any) -> None:
    """Writes one embedding as a `.npy` file (float16)."""
    np.save(path, check(emb), allow_pickle=False)


def load(path: str, width: int | None = None) -> np.ndarray:
    """Reads a `.npy` embedding written by `save` (or by `numpy.save` of any float (Nc, E) array)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no such text embedding file (a .npy of shape (tokens, width))"
        )
    try:
        a = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: not a .npy array ({e})") from e
    return check(a, width, what=path)


def manifest_entry(width: int, encoder: str) -> dict[str, Any]:
    """The manifest's `"text_embedding"` value for embeddings of `width` from `encoder`."""
    return {"width": int(width), "encoder": str(encoder), "null": NULL_FILE}

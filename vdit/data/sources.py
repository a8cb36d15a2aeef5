"""The sources of `data.source`: random-access datasets (grain MapDataset sources) of source elements.

An element is {"video" uint8 (T, H, W, 3), "caption", "index"[, "fps"]} for the pixel sources, the
latent record of `vdit encode` for "latents", or {"decode_error": message, ...} for one that could
not be read or decoded (the pipeline counts it as rejected and goes on).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from vdit.data import latents, records
from vdit.data.synthetic import SyntheticVideos
from vdit.data.tfds_source import TfdsVideos

if TYPE_CHECKING:
    from vdit.data.config import PipelineConfig

SOURCES = ("synthetic", "records", "tfds", "latents")
MAX_HELD_OUT = 10  # a finite source keeps at least 9 in 10 of its samples for training

log = logging.getLogger(__name__)


def open_records(path: str) -> records.RecordsSource:
    """The prepared records at `path` (data.records.path: a folder of shards or a glob), opened;
    ValueError naming the field when there are none or they cannot be opened."""
    shards = records.find_shards(path)
    if not shards:
        raise ValueError(
            f"data.records.path={path!r}: no shards (*{records.SHARD_SUFFIX}) found; write "
            "them with `vdit prepare`"
        )
    try:
        source = records.RecordsSource(shards)
    except Exception as e:  # a shard without its footer (an interrupted write), not a shard
        raise ValueError(
            f"data.records.path={path!r}: cannot open the {len(shards)} shards "
            f"({type(e).__name__}: {e})"
        ) from None
    if len(source) == 0:
        raise ValueError(f"data.records.path={path!r}: the {len(shards)} shards hold no records")
    return source


def make_source(cfg: PipelineConfig):
    """The random-access source of `data.source`."""
    if cfg.source == "records":
        return open_records(cfg.records.path)
    if cfg.source == "latents":
        source = latents.LatentsSource(cfg.latents.path)
        if len(source) == 0:
            raise ValueError(f"data.latents.path={cfg.latents.path!r}: the shards hold no records")
        return source
    if cfg.source == "tfds":
        source = TfdsVideos(cfg.tfds)
        if len(source) == 0:
            raise ValueError(f"data.tfds.split={cfg.tfds.split!r} of {cfg.tfds.name!r} is empty")
        return source
    if cfg.source != "synthetic":
        raise ValueError(f"data.source={cfg.source!r}: choose from {SOURCES}")
    return SyntheticVideos(cfg.synthetic)


class Subset:
    """The elements `indices` of a random-access source, renumbered 0..len-1 (a grain MapDataset
    source); the source's `manifest`, if any, passes through."""

    def __init__(self, source, indices: np.ndarray):
        self.source = source
        self.indices = np.asarray(indices, np.int64)
        if hasattr(source, "manifest"):
            self.manifest = source.manifest

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[int(self.indices[int(index)])]

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {len(self)} elements)"


def held_out_indices(n: int, k: int) -> np.ndarray:
    """The `k` indices of a finite source of `n` elements held out for evaluation: evenly spaced
    over the whole index range (so a source written file after file is sampled everywhere)."""
    return np.unique(np.floor(np.arange(k) * (n / k)).astype(np.int64)) if k else np.zeros(0, int)


def split(source, cfg: PipelineConfig) -> tuple[Any, Any | None]:
    """(training source, held-out evaluation source or None) of `data.eval_samples`, disjoint by
    construction. The procedural source holds out the indices just past its index space
    (num_samples .. num_samples + eval_samples - 1), so its training data is unchanged; a finite
    source (records, latents, tfds) holds out `eval_samples` evenly spaced elements, at most one in
    MAX_HELD_OUT (a warning says when fewer), and trains on the others."""
    k = cfg.eval_samples
    if k <= 0:
        return source, None
    if isinstance(source, SyntheticVideos):
        n = cfg.synthetic.num_samples
        wider = SyntheticVideos(dataclasses.replace(source.cfg, num_samples=n + k))
        return source, Subset(wider, np.arange(n, n + k))
    n = len(source)
    if k > n // MAX_HELD_OUT:
        k = n // MAX_HELD_OUT
        log.warning(
            "data.eval_samples=%d: data.source=%r has %d samples; holding out %d (at most one in "
            "%d)%s",
            cfg.eval_samples,
            cfg.source,
            n,
            k,
            MAX_HELD_OUT,
            ", so no eval_loss" if k == 0 else "",
        )
        if k == 0:
            return source, None
    held = held_out_indices(n, k)
    return Subset(source, np.setdiff1d(np.arange(n), held)), Subset(source, held)


def latent_statistics(
    manifest: dict[str, Any], cfg: PipelineConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The manifest's per-channel (mean, std), after checking that the latents are of the
    autoencoder the config names."""
    v = manifest["vae"]
    if tuple(v["compression"]) != tuple(cfg.compression):
        raise ValueError(
            f"autoencoder.compression={tuple(cfg.compression)}, but the latents "
            f"at data.latents.path={cfg.latents.path!r} were encoded with "
            f"{tuple(v['compression'])}"
        )
    if v["latent_channels"] != cfg.channels:
        raise ValueError(
            f"autoencoder.channels={cfg.channels}, but the latents at "
            f"data.latents.path={cfg.latents.path!r} have {v['latent_channels']}"
        )
    return np.asarray(v["latent_mean"], np.float32), np.asarray(v["latent_std"], np.float32)

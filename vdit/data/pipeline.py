"""The grain input pipeline: source -> size policy -> latent patches -> text ids -> task mask -> pack
-> batch, per host, deterministic, with checkpointable iterator state.

Each process reads every `process_count`-th sample of a shuffled, repeated index space, so the hosts of
a multi-host run see disjoint data; `to_global` turns each host's rows into one global jax.Array per key.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

from vdit.data import packing, tasks
from vdit.data.synthetic import SyntheticConfig, SyntheticVideos
from vdit.models.text import tokenize

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SizePolicy:
    """Keep aspect ratio and duration; resize down (never crop) to fit `max_tokens`; snap to the grid."""

    patch: tuple[int, int, int]  # (pt, ph, pw) latent patch
    compression: tuple[int, int, int] = (1, 1, 1)  # autoencoder (time, height, width) factors
    max_tokens: int = 1024  # tokens per sample at most

    def latent_frames(self, frames: int) -> int:
        ct = self.compression[0]
        return frames if ct == 1 else 1 + (frames - 1) // ct  # causal: first frame alone

    def plan(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(pixel frames kept, frame stride, target height, target width) for a sample.

        Frames beyond a whole number of latent patches are dropped from the end (at most pt*ct - 1
        frames); spatial sizes are resized to multiples of the patch in pixels; a sample over the token
        cap is scaled down in space (aspect kept), then subsampled in time if even the smallest spatial
        grid is over the cap. Raises ValueError for a sample too small for one patch.
        """
        pt, ph, pw = self.patch
        ct, ch, cw = self.compression
        uh, uw = ph * ch, pw * cw
        if height < uh or width < uw:
            raise ValueError(f"{height}x{width} is smaller than one patch ({uh}x{uw} pixels)")
        stride = 1
        while True:
            f = (frames - 1) // stride + 1
            lt = self.latent_frames(f) // pt * pt
            if lt == 0:
                raise ValueError(f"{frames} frames make no whole temporal patch of {pt}")
            scale = min(1.0, math.sqrt(self.max_tokens / (lt // pt * (height // uh) * (width // uw))))
            gh = max(1, int(height * scale) // uh)
            gw = max(1, int(width * scale) // uw)
            if (lt // pt) * gh * gw <= self.max_tokens:
                break
            if f == 1:
                raise ValueError(f"one frame at the smallest size exceeds max_tokens={self.max_tokens}")
            stride *= 2
        kept = lt if ct == 1 else 1 + (lt - 1) * ct
        return kept, stride, gh * uh, gw * uw


def resize_video(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-filtered resize of uint8 (T, H, W, 3) frames (downscaling never aliases)."""
    if video.shape[1:3] == (height, width):
        return video
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BOX)) for f in video]
    )


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    synthetic: SyntheticConfig
    size: SizePolicy
    packing: packing.PackingConfig
    rows_per_batch: int  # global rows per step (split over processes)
    text_len_per_sample: int = 64  # caption tokens kept per sample
    caption_dropout: float = 0.1  # probability a caption is replaced by the empty one (for CFG)
    task_weights: tuple[tuple[str, float], ...] = (("t2v", 1.0),)
    seed: int = 0
    workers: int = 0  # grain worker processes (0: in the training process)


class _Prepare(grain.transforms.RandomMap):
    """One sample dict {"video" uint8 (T,H,W,3), "caption"} -> the per-sample packing input."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        cfg = self.cfg
        video = element["video"]
        if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 1:
            raise ValueError(f"sample {element.get('index')}: expected (T, H, W, 3), got {video.shape}")
        t, h, w, _ = video.shape
        kept, stride, th, tw = cfg.size.plan(t, h, w)
        resized = (th, tw) != (h, w) or stride > 1
        video = resize_video(video[::stride][:kept], th, tw)
        if cfg.size.compression != (1, 1, 1):
            raise NotImplementedError("online VAE encoding: train on encoded latent records instead")
        latent = video.astype(np.float32) / 127.5 - 1.0  # identity autoencoder: pixels in [-1, 1]
        patches, positions = packing.patchify(latent, cfg.size.patch)
        grid = np.array([latent.shape[:3]], np.int32)  # (1, 3)

        pt, ph, pw = cfg.size.patch
        frames = latent.shape[0] // pt
        task = tasks.draw_task(dict(cfg.task_weights), frames, rng)
        per_frame = (latent.shape[1] // ph) * (latent.shape[2] // pw)
        cond = tasks.token_mask(tasks.frame_mask(task, frames, rng), per_frame)

        text = element["caption"] if rng.random() >= cfg.caption_dropout else ""
        return {
            "patches": patches,
            "positions": positions,
            "cond_mask": cond,
            "text": tokenize(text, cfg.text_len_per_sample),
            "grid": grid,
            "resized": np.array([int(resized)], np.int32),
        }


def validate(cfg: PipelineConfig) -> None:
    p = cfg.packing
    if cfg.size.max_tokens > p.row_len:
        raise ValueError(
            f"data.max_tokens_per_sample={cfg.size.max_tokens} exceeds data.row_len={p.row_len}"
        )
    if cfg.text_len_per_sample > p.text_len:
        raise ValueError(
            f"model.text.max_len={cfg.text_len_per_sample} exceeds data.text_len={p.text_len}"
        )
    for name, weight in cfg.task_weights:
        if name not in tasks.TASKS:
            raise ValueError(f"data.tasks.{name}: unknown task; choose from {tasks.TASKS}")
        if weight < 0:
            raise ValueError(f"data.tasks.{name}: weight {weight} is negative")


def make_source(cfg: PipelineConfig):
    return SyntheticVideos(cfg.synthetic)


def build(cfg: PipelineConfig, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches of packed rows (numpy dicts in the packed-batch contract) for this process."""
    validate(cfg)
    if cfg.rows_per_batch % process_count:
        raise ValueError(
            f"data.batch_rows={cfg.rows_per_batch} is not divisible by {process_count} processes"
        )
    ds = grain.MapDataset.source(make_source(cfg)).shuffle(seed=cfg.seed).repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.random_map(_Prepare(cfg), seed=cfg.seed + 1)
    it = ds.to_iter_dataset()
    pack_cfg = dataclasses.replace(cfg.packing, seed=cfg.packing.seed + process_index)
    it = packing.pack(it, pack_cfg, sample_features=("resized",))
    it = it.batch(cfg.rows_per_batch // process_count, drop_remainder=True)
    if cfg.workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
    return it


# Keys the device step reads; the rest ("resized") stay on the host for statistics.
DEVICE_KEYS = ("patches", "segment_ids", "positions", "text", "text_segment_ids", "text_positions",
               "cond_mask", "loss_mask", "grid")


def to_global(batch: dict[str, np.ndarray], shardings: dict[str, jax.sharding.Sharding]):
    """This process's rows -> global jax.Arrays sharded as given (rows split over processes)."""
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k]))
        for k in DEVICE_KEYS
    }

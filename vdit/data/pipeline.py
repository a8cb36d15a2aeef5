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

from vdit.data import latents, packing, records, tasks
from vdit.data.synthetic import SyntheticConfig, SyntheticVideos
from vdit.data.tfds_source import TfdsConfig, TfdsVideos
from vdit.models.text import tokenize

log = logging.getLogger(__name__)


# Why a sample's size changed (a sample can have several) and why a sample was rejected. Every
# sample carries these as counts in its "stats" feature (REJECTS counted on the next accepted sample),
# so the counts travel with the data through packing, worker processes and checkpoints.
EVENTS: tuple[str, ...] = (
    "snapped",  # resized by less than a patch so its sides are whole patches (aspect kept to a patch)
    "downscaled",  # resized down in space to fit max_tokens
    "time_subsampled",  # frames strided to fit max_tokens after the smallest useful spatial size
    "frames_resampled",  # frames picked evenly over the whole clip to make whole temporal patches
    "frames_trimmed",  # trailing frames that make no whole temporal patch dropped (< pt * ct frames)
    "fps_subsampled",  # frames strided by data.frame_stride / data.max_fps
)
REJECTS: tuple[str, ...] = (
    "empty",  # no frames or zero height/width
    "bad_shape",  # not uint8 (T, H, W, 3)
    "too_small",  # height or width under one patch in pixels
    "too_short",  # fewer frames than one temporal patch
    "non_finite",  # NaN or inf values
    "over_cap",  # over max_tokens even at one patch on its short side and one temporal patch
    "decode_error",  # the source could not read or decode it (e.g. a corrupt record)
)
STATS: tuple[str, ...] = (*EVENTS, *(f"rejected_{r}" for r in REJECTS), "tokens_dropped")
DROPPED = STATS.index("tokens_dropped")


class Rejected(ValueError):
    """A sample that cannot be trained on; `reason` is one of REJECTS."""

    def __init__(self, reason: str, message: str):
        assert reason in REJECTS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class SizePlan:
    frames: int  # pixel frames kept (after `stride`), a whole number of latent patches
    stride: int  # temporal subsampling applied before keeping `frames`
    height: int  # target height in pixels (a whole number of patches)
    width: int  # target width in pixels
    events: tuple[str, ...]  # what changed, names from EVENTS
    resample: bool = True  # pick `frames` evenly over the clip (else the first `frames`)

    def frame_indices(self, source_frames: int) -> np.ndarray:
        """Indices of the source frames kept, in order."""
        strided = np.arange(0, source_frames, self.stride)
        if not self.resample or self.frames == len(strided):
            return strided[: self.frames]
        return strided[np.round(np.linspace(0, len(strided) - 1, self.frames)).astype(int)]


@dataclasses.dataclass(frozen=True)
class SizePolicy:
    """Keep aspect ratio and duration; resize down (never crop) to fit `max_tokens`; snap to the grid."""

    patch: tuple[int, int, int]  # (pt, ph, pw) latent patch
    compression: tuple[int, int, int] = (1, 1, 1)  # autoencoder (time, height, width) factors
    max_tokens: int = 1024  # tokens per sample at most
    # Frames that make no whole temporal patch (at most pt * ct - 1): "resample" picks the kept
    # frames evenly over the whole clip (nothing cut off, the frame rate changes by < pt*ct / T);
    # "trim" drops them from the end.
    time_fit: str = "resample"

    def latent_frames(self, frames: int) -> int:
        ct = self.compression[0]
        return frames if ct == 1 else 1 + (frames - 1) // ct  # causal: first frame alone

    def plan(self, frames: int, height: int, width: int) -> SizePlan:
        """How a (frames, height, width) pixel sample becomes a whole-patch latent grid under the cap.

        Frames beyond a whole number of latent patches are dropped from the end (at most pt*ct - 1
        frames); spatial sizes are resized to multiples of the patch in pixels; a sample over the token
        cap is scaled down in space (aspect kept), then subsampled in time if even the smallest spatial
        grid is over the cap. Raises `Rejected` for a sample that cannot hold one patch.
        """
        pt, ph, pw = self.patch
        ct, ch, cw = self.compression
        uh, uw = ph * ch, pw * cw
        if frames < 1 or height < 1 or width < 1:
            raise Rejected("empty", f"{frames} frames of {height}x{width}")
        if height < uh or width < uw:
            raise Rejected("too_small", f"{height}x{width} is under one patch ({uh}x{uw} pixels)")
        if self.latent_frames(frames) < pt:
            raise Rejected("too_short", f"{frames} frames make no whole temporal patch of {pt}")
        stride = 1
        while True:
            f = (frames - 1) // stride + 1
            lt = self.latent_frames(f) // pt * pt
            if lt // pt * (height // uh) * (width // uw) <= self.max_tokens:
                scale = 1.0
            else:  # floor(a * s) * floor(b * s) <= a * b * s^2 = max_tokens per temporal patch
                scale = math.sqrt(self.max_tokens / (lt // pt * (height / uh) * (width / uw)))
            gh = max(1, int(height / uh * scale))
            gw = max(1, int(width / uw * scale))
            if (lt // pt) * gh * gw <= self.max_tokens or lt == pt:
                break
            stride *= 2
        if (lt // pt) * gh * gw > self.max_tokens:  # an extreme aspect ratio: no crop, no squash
            raise Rejected(
                "over_cap",
                f"{frames}x{height}x{width} needs {gh}x{gw} patches per "
                f"frame at least, over max_tokens={self.max_tokens}",
            )
        kept = lt if ct == 1 else 1 + (lt - 1) * ct
        th, tw = gh * uh, gw * uw
        events = []
        if scale < 1.0:
            events.append("downscaled")
        elif (th, tw) != (height, width):
            events.append("snapped")
        if stride > 1:
            events.append("time_subsampled")
        if kept < f:
            events.append("frames_resampled" if self.time_fit == "resample" else "frames_trimmed")
        return SizePlan(kept, stride, th, tw, tuple(events), self.time_fit == "resample")


@dataclasses.dataclass(frozen=True)
class TokenDrop:
    """NaViT token dropping: each sample loses a share of its generated tokens before packing.

    Dropped tokens leave the row (the packer sees a shorter sample); kept tokens keep their grid
    positions; conditioning tokens are always kept, and at least one generated token is. The rate is
    per sample: "constant" (= rate), "beta" (~ Beta(beta_a, beta_b), capped at rate), or "size"
    (rate * (1 - ref_tokens / n) for a sample of n > ref_tokens tokens: small samples keep all,
    large ones approach rate). Sampling never drops (it does not use the data pipeline).
    """

    kind: str = "none"  # "none" | "constant" | "beta" | "size"
    rate: float = 0.0  # the rate ("constant") or its cap ("beta", "size"), in [0, 1)
    beta_a: float = 1.0
    beta_b: float = 1.0
    ref_tokens: int = 256  # "size": samples up to this many tokens keep every token

    KINDS = ("none", "constant", "beta", "size")

    def draw_rate(self, num_tokens: int, rng: np.random.Generator) -> float:
        if self.kind == "none":
            return 0.0
        if self.kind == "constant":
            return self.rate
        if self.kind == "beta":
            return min(float(rng.beta(self.beta_a, self.beta_b)), self.rate)
        if self.kind == "size":
            return self.rate * max(0.0, 1.0 - self.ref_tokens / max(num_tokens, 1))
        raise ValueError(f"data.token_drop.kind={self.kind!r}: choose from {self.KINDS}")

    def keep(self, cond: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sorted indices of the tokens kept, given the sample's conditioning mask (N,)."""
        n = cond.shape[0]
        rate = self.draw_rate(n, rng)
        generated = np.flatnonzero(~cond)
        # Stochastic rounding keeps the expected rate exact for small samples.
        drop = min(int(rate * generated.size + rng.random()), max(generated.size - 1, 0))
        if drop == 0:
            return np.arange(n)
        dropped = rng.choice(generated, size=drop, replace=False)
        return np.setdiff1d(np.arange(n), dropped, assume_unique=True)


def resize_video(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-filtered resize of uint8 (T, H, W, 3) frames (downscaling never aliases)."""
    if video.shape[1:3] == (height, width):
        return video
    return np.stack(
        [
            np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BOX))
            for f in video
        ]
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
    token_drop: TokenDrop = TokenDrop()
    frame_stride: int = 1  # keep every k-th source frame (frame-rate subsampling)
    max_fps: float = (
        0.0  # > 0: subsample sources with an "fps" above this (stride ceil(fps/max_fps))
    )
    seed: int = 0
    workers: int = 0  # grain worker processes (0: in the training process)
    source: str = "synthetic"  # one of SOURCES
    records_path: str = ""  # "records": a folder of shards written by `vdit prepare`, or a glob
    tfds: TfdsConfig = TfdsConfig()  # "tfds": a locally prepared TFDS dataset
    latents_path: str = ""  # "latents": a folder written by `vdit encode`
    latents_sample_posterior: bool = True  # "latents": draw z ~ N(mean, exp(logvar)) per use
    channels: int = 3  # latent channels (3: pixels)


SOURCES = ("synthetic", "records", "tfds", "latents")


def _stats(events=(), rejected: str | None = None, dropped: int = 0) -> np.ndarray:
    out = np.zeros((1, len(STATS)), np.int32)
    for e in events:
        out[0, STATS.index(e)] = 1
    if rejected is not None:
        out[0, STATS.index(f"rejected_{rejected}")] = 1
    out[0, DROPPED] = dropped
    return out


class _Prepare(grain.transforms.RandomMap):
    """One sample dict {"video" uint8 (T,H,W,3), "caption"[, "fps"]} -> the per-sample packing input,
    or {"stats"} alone for a rejected sample (logged; counted by `_CountRejected`). A source marks a
    sample it could not decode with a "decode_error" message (rejected as "decode_error")."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        try:
            return self._prepare(element, rng)
        except Rejected as e:
            log.warning("sample %s rejected: %s", element.get("index", "?"), e)
            return {"stats": _stats(rejected=e.reason)}

    def _prepare(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.size.compression != (1, 1, 1):
            raise NotImplementedError(
                "online VAE encoding: train on encoded latents instead "
                "(`vdit encode`, data.source='latents')"
            )
        video, events = fit_video(element, cfg.size, cfg.frame_stride, cfg.max_fps)
        latent = video.astype(np.float32) / 127.5 - 1.0  # identity autoencoder: pixels in [-1, 1]
        return sample_tokens(latent, element["caption"], events, cfg, rng)


class _PrepareLatent(_Prepare):
    """One latent record of `vdit encode` -> the per-sample packing input (or a rejection): a posterior
    sample (or the mean), normalised with the VAE's per-channel statistics, on whole patches."""

    def __init__(self, cfg: PipelineConfig, shift: np.ndarray, scale: np.ndarray):
        super().__init__(cfg)
        self.shift = np.asarray(shift, np.float32)
        self.scale = np.asarray(scale, np.float32)

    def _prepare(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        cfg = self.cfg
        if element.get("decode_error"):
            raise Rejected("decode_error", element["decode_error"])
        mean, logvar = np.asarray(element["mean"]), element.get("logvar")
        if mean.ndim != 4 or mean.shape[-1] != cfg.channels or min(mean.shape) < 1:
            raise Rejected("bad_shape", f"latent {mean.shape}, expected (t, h, w, {cfg.channels})")
        if not np.isfinite(mean).all() or (logvar is not None and not np.isfinite(logvar).all()):
            raise Rejected("non_finite", "NaN or inf in the latent")
        events = list(element.get("events", ()))
        pt, ph, pw = cfg.size.patch
        t, h, w, _ = mean.shape
        if t < pt:
            raise Rejected("too_short", f"{t} latent frames make no whole temporal patch of {pt}")
        if h < ph or w < pw:
            raise Rejected("too_small", f"latent {h}x{w} is under one patch {ph}x{pw}")
        grid = (t // pt * pt, h // ph * ph, w // pw * pw)
        if grid != (t, h, w):  # encoded for another patch: cut the remainder (under one patch)
            if "snapped" not in events:
                events.append("snapped")
        n = math.prod(g // p for g, p in zip(grid, cfg.size.patch, strict=True))
        if n > cfg.size.max_tokens:
            raise Rejected(
                "over_cap",
                f"latent grid {grid} is {n} tokens, over max_tokens="
                f"{cfg.size.max_tokens}; encode with `vdit encode --max_tokens`",
            )
        z = mean
        if cfg.latents_sample_posterior and logvar is not None:
            z = mean + np.exp(0.5 * np.asarray(logvar)) * rng.standard_normal(mean.shape)
        z = (z[: grid[0], : grid[1], : grid[2]] - self.shift) / self.scale
        return sample_tokens(z.astype(np.float32), element["caption"], events, cfg, rng)


def latent_statistics(
    manifest: dict[str, Any], cfg: PipelineConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The manifest's per-channel (mean, std), after checking that the latents are of the
    autoencoder the config names."""
    v = manifest["vae"]
    if tuple(v["compression"]) != tuple(cfg.size.compression):
        raise ValueError(
            f"autoencoder.compression={tuple(cfg.size.compression)}, but the latents "
            f"at data.latents.path={cfg.latents_path!r} were encoded with "
            f"{tuple(v['compression'])}"
        )
    if v["latent_channels"] != cfg.channels:
        raise ValueError(
            f"autoencoder.channels={cfg.channels}, but the latents at "
            f"data.latents.path={cfg.latents_path!r} have {v['latent_channels']}"
        )
    return np.asarray(v["latent_mean"], np.float32), np.asarray(v["latent_std"], np.float32)


def fit_video(
    element: dict[str, Any], size: SizePolicy, frame_stride: int = 1, max_fps: float = 0.0
) -> tuple[np.ndarray, list[str]]:
    """A source element's uint8 (T, H, W, 3) video brought to the size `size` plans for it (frame-rate
    subsampling, then `SizePolicy.plan`), with the names of the events that changed it. Raises
    `Rejected` naming why a sample cannot be used. Shared by training and `vdit encode`."""
    if element.get("decode_error"):
        raise Rejected("decode_error", element["decode_error"])
    if element.get("video") is None:
        raise Rejected("empty", "the element has no video")
    video = np.asarray(element["video"])
    if video.ndim != 4 or video.shape[-1] != 3:
        raise Rejected("bad_shape", f"expected (T, H, W, 3), got {video.shape}")
    if np.issubdtype(video.dtype, np.floating) and not np.isfinite(video).all():
        raise Rejected("non_finite", "NaN or inf in the video")
    if video.dtype != np.uint8:
        raise Rejected("bad_shape", f"expected uint8 frames, got {video.dtype}")
    events = []
    stride = fps_stride(element, frame_stride, max_fps)
    if stride > 1:
        video = video[::stride]
        events.append("fps_subsampled")
    t, h, w, _ = video.shape
    plan = size.plan(t, h, w)
    video = resize_video(video[plan.frame_indices(t)], plan.height, plan.width)
    return video, [*events, *plan.events]


def fps_stride(element: dict[str, Any], frame_stride: int = 1, max_fps: float = 0.0) -> int:
    """The frame-rate subsampling `fit_video` applies to a source element: every `frame_stride`-th
    frame, or coarser for a source whose "fps" is over `max_fps`; 1 for an image."""
    stride = frame_stride
    if max_fps > 0 and "fps" in element:
        stride = max(stride, math.ceil(float(element["fps"]) / max_fps - 1e-9))
    return stride if np.shape(element["video"])[0] > 1 else 1


def sample_tokens(
    latent: np.ndarray, caption: str, events, cfg: PipelineConfig, rng: np.random.Generator
) -> dict[str, Any]:
    """A whole-patch latent (T, H, W, C) -> the per-sample packing input: patches and positions, the
    task's conditioning mask, NaViT token dropping, the (possibly dropped) caption's tokens."""
    patches, positions = packing.patchify(latent, cfg.size.patch)
    grid = np.array([latent.shape[:3]], np.int32)  # (1, 3): the full grid, also after dropping

    pt, ph, pw = cfg.size.patch
    frames = latent.shape[0] // pt
    task = tasks.draw_task(dict(cfg.task_weights), frames, rng)
    per_frame = (latent.shape[1] // ph) * (latent.shape[2] // pw)
    cond = tasks.token_mask(tasks.frame_mask(task, frames, rng), per_frame)
    keep = cfg.token_drop.keep(cond, rng)
    dropped = cond.shape[0] - keep.shape[0]
    if dropped:
        patches, positions, cond = patches[keep], positions[keep], cond[keep]

    text = caption if rng.random() >= cfg.caption_dropout else ""
    return {
        "patches": patches,
        "positions": positions,
        "cond_mask": cond,
        "text": tokenize(text, cfg.text_len_per_sample),
        "grid": grid,
        "stats": _stats(events, dropped=dropped),
    }


class _CountRejected(grain.IterDataset):
    """Skips rejected samples, adding their counts to the next accepted sample's "stats"."""

    def __iter__(self) -> grain.DatasetIterator:
        return _CountRejectedIterator(self._parent.__iter__())


class _CountRejectedIterator(grain.DatasetIterator):
    def __next__(self) -> dict[str, Any]:
        rejected = np.zeros_like(_stats())
        while True:
            element = next(self._parent)
            if "patches" in element:
                element["stats"] = element["stats"] + rejected
                return element
            rejected += element["stats"]

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


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
    d = cfg.token_drop
    if d.kind not in TokenDrop.KINDS:
        raise ValueError(f"data.token_drop.kind={d.kind!r}: choose from {TokenDrop.KINDS}")
    if not 0.0 <= d.rate < 1.0:
        raise ValueError(f"data.token_drop.rate={d.rate} must be in [0, 1)")
    if d.kind == "beta" and (d.beta_a <= 0 or d.beta_b <= 0):
        raise ValueError(
            f"data.token_drop.beta_a/beta_b must be positive, got {d.beta_a}, {d.beta_b}"
        )
    if cfg.size.time_fit not in ("resample", "trim"):
        raise ValueError(f"data.time_fit={cfg.size.time_fit!r}: choose 'resample' or 'trim'")
    if cfg.frame_stride < 1:
        raise ValueError(f"data.frame_stride={cfg.frame_stride} must be >= 1")
    if cfg.max_fps < 0:
        raise ValueError(f"data.max_fps={cfg.max_fps} must be >= 0 (0 = off)")
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source={cfg.source!r}: choose from {SOURCES}")
    if cfg.source == "records" and not cfg.records_path:
        raise ValueError(
            "data.records.path: required with data.source='records' (a folder of "
            "shards written by `vdit prepare`, or a glob of them)"
        )
    if cfg.source == "latents" and not cfg.latents_path:
        raise ValueError(
            "data.latents.path: required with data.source='latents' (a folder "
            "written by `vdit encode`)"
        )
    if (cfg.source == "latents") != (cfg.size.compression != (1, 1, 1) or cfg.channels != 3):
        raise ValueError(
            f"data.source={cfg.source!r} with autoencoder compression "
            f"{cfg.size.compression} and {cfg.channels} channels: latents "
            "(autoencoder.kind='latent') train from data.source='latents', pixels "
            "(autoencoder.kind='identity') from the other sources"
        )
    if cfg.source == "latents" and (cfg.frame_stride > 1 or cfg.max_fps > 0):
        raise ValueError(
            "data.frame_stride / data.max_fps: latents are encoded already; subsample "
            "frames when encoding (`vdit encode --frame_stride / --max_fps`)"
        )
    if cfg.source == "tfds":
        for field in ("name", "split", "video_key"):
            if not getattr(cfg.tfds, field):
                raise ValueError(f"data.tfds.{field}: required with data.source='tfds'")
        if cfg.tfds.fps < 0:
            raise ValueError(f"data.tfds.fps={cfg.tfds.fps} must be >= 0 (0 = unknown)")


def make_source(cfg: PipelineConfig):
    """The random-access source of `data.source`: elements {"video" uint8 (T, H, W, 3), "caption",
    "index"[, "fps"]}, or {"decode_error": message, ...} for one that could not be decoded."""
    if cfg.source == "records":
        shards = records.find_shards(cfg.records_path)
        if not shards:
            raise ValueError(
                f"data.records.path={cfg.records_path!r}: no shards (*"
                f"{records.SHARD_SUFFIX}) found; write them with `vdit prepare`"
            )
        try:
            source = records.RecordsSource(shards)
        except Exception as e:  # a shard without its footer (an interrupted write), not a shard
            raise ValueError(
                f"data.records.path={cfg.records_path!r}: cannot open the "
                f"{len(shards)} shards ({type(e).__name__}: {e})"
            ) from None
        if len(source) == 0:
            raise ValueError(
                f"data.records.path={cfg.records_path!r}: the {len(shards)} shards hold no records"
            )
        return source
    if cfg.source == "latents":
        source = latents.LatentsSource(cfg.latents_path)
        if len(source) == 0:
            raise ValueError(f"data.latents.path={cfg.latents_path!r}: the shards hold no records")
        return source
    if cfg.source == "tfds":
        source = TfdsVideos(cfg.tfds)
        if len(source) == 0:
            raise ValueError(f"data.tfds.split={cfg.tfds.split!r} of {cfg.tfds.name!r} is empty")
        return source
    if cfg.source != "synthetic":
        raise ValueError(f"data.source={cfg.source!r}: choose from {SOURCES}")
    return SyntheticVideos(cfg.synthetic)


def prepare_samples(
    ds: grain.MapDataset, cfg: PipelineConfig, manifest: dict[str, Any] | None = None
) -> grain.IterDataset:
    """Source elements -> per-sample packing inputs; rejected samples are logged, skipped, and
    counted in the next accepted sample's "stats" (so counts after the last accepted sample of a
    finite dataset are only logged). Latents (data.source="latents") need their folder's manifest."""
    if cfg.source == "latents":
        manifest = manifest or latents.read_manifest(cfg.latents_path)
        prepare = _PrepareLatent(cfg, *latent_statistics(manifest, cfg))
    else:
        prepare = _Prepare(cfg)
    return _CountRejected(ds.random_map(prepare, seed=cfg.seed + 1).to_iter_dataset())


def build(cfg: PipelineConfig, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches of packed rows (numpy dicts in the packed-batch contract) for this process."""
    validate(cfg)
    if cfg.rows_per_batch % process_count:
        raise ValueError(
            f"data.batch_rows={cfg.rows_per_batch} is not divisible by {process_count} processes"
        )
    source = make_source(cfg)
    ds = grain.MapDataset.source(source).shuffle(seed=cfg.seed).repeat(None)
    it = prepare_samples(ds[process_index::process_count], cfg, getattr(source, "manifest", None))
    pack_cfg = dataclasses.replace(cfg.packing, seed=cfg.packing.seed + process_index)
    it = packing.pack(it, pack_cfg, sample_features=("stats",))
    it = it.batch(cfg.rows_per_batch // process_count, drop_remainder=True)
    if cfg.workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
    return it


# Keys the device step reads; the rest ("stats": (B, S, len(STATS)) counts) stay on the host.
DEVICE_KEYS = (
    "patches",
    "segment_ids",
    "positions",
    "text",
    "text_segment_ids",
    "text_positions",
    "cond_mask",
    "loss_mask",
    "grid",
)


def to_global(batch: dict[str, np.ndarray], shardings: dict[str, jax.sharding.Sharding]):
    """This process's rows -> global jax.Arrays sharded as given (rows split over processes)."""
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k]))
        for k in DEVICE_KEYS
    }

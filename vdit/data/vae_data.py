"""The VAE's training data: batch k is a pure function of (seed, k), so resume is exact.

Every step draws one shape (an image with probability `image_fraction`, else a duration from
`frame_choices`; a size from `size_choices`) and holds min(batch_size, max_pixels // (T*H*W))
samples of it, from `source`:

    "synthetic"  procedural videos (vdit/data/synthetic.py)
    "pan"        camera pans across the TRAIN photos (vdit/data/pan.py)
    "mixed"      each sample a pan with probability `pan_fraction`, else synthetic
    "records"    real videos from shards written by `vdit prepare` (`records.path`), opened as the
                 DiT's "records" source is (`vdit.data.sources.open_records`); the last
                 `eval_samples` records are held out for evaluation and never trained on

Records are brought to the step's shape by one rule: a random window of the step's duration in
time, and in space the largest window of the step's aspect ratio at a random position, area-
resized (`vdit.data.size.resize_video` of that window) to (H, W). Unlike the DiT's size policy
(which keeps every sample's own size), every sample of a VAE step has the step's shape. Records that fail to decode, are shorter than the
step's duration or whose window is smaller than (H, W) (no upsampling) are skipped and counted
(`sample_batch` returns the count; the first skip of each record logs a warning). A step that
cannot be filled within `MAX_TRIES_PER_SAMPLE` draws per sample raises an error naming
data.records.path.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from vdit.data import pan, sources, synthetic
from vdit.data.config import as_tuples, section
from vdit.data.records import RecordsConfig
from vdit.data.size import resize_video

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "pan", "mixed", "records")
MAX_TRIES_PER_SAMPLE = 10


@dataclasses.dataclass(frozen=True)
class VAEDataConfig:
    """The fields of configs/vae.py's `data` section, by the same names (see the comments there)."""

    seed: int  # the training stream: batch k is a function of (seed, k)
    source: str  # one of SOURCES
    pan_fraction: float  # "mixed": share of pan samples
    records: RecordsConfig  # "records": a folder of shards or a glob
    frame_choices: tuple[int, ...]  # video durations
    image_fraction: float  # share of steps that are images
    size_choices: tuple[tuple[int, int], ...]  # (H, W) of a step
    batch_size: int  # samples per step
    max_pixels: int  # cap on batch * frames * H * W
    eval_seed: int  # the held-out stream
    eval_samples: int  # held-out samples per set ("records": the last eval_samples records)

    @classmethod
    def from_section(cls, data: Mapping[str, Any]) -> VAEDataConfig:
        """From the `data` section (a dict, e.g. ConfigDict.to_dict())."""
        d = as_tuples(dict(data))
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in fields:
                raise ValueError(f"data.{key}: not a data field of the VAE; remove it")
        return cls(**{**d, "records": section(RecordsConfig, "records", d["records"])})

    def validate(self, compression: tuple[int, int, int]) -> None:
        """Every check on the VAE's data section, for a VAE of `compression` (time, height,
        width); a message starts with the config field it names."""

        def fail(field: str, msg: str) -> None:
            raise ValueError(f"data.{field}: {msg}")

        _, ch, cw = compression
        if self.source not in SOURCES:
            fail("source", f"{self.source!r} is not one of {SOURCES}")
        if not 0 <= self.pan_fraction <= 1:
            fail("pan_fraction", f"{self.pan_fraction} is not in [0, 1]")
        if self.source == "records" and not self.records.path:
            fail(
                "records.path",
                "is empty; data.source='records' reads shards written by `vdit prepare` "
                "(a folder or a glob)",
            )
        if not self.size_choices:
            fail("size_choices", "is empty")
        for hw in self.size_choices:
            if hw[0] < ch or hw[1] < cw or hw[0] % ch or hw[1] % cw:
                fail(
                    "size_choices",
                    f"{tuple(hw)} is not a positive multiple of the spatial compression {ch}x{cw}",
                )
        if not self.frame_choices or min(self.frame_choices) < 2:
            fail(
                "frame_choices",
                f"{tuple(self.frame_choices)}: video durations must be >= 2 (images come from "
                "data.image_fraction)",
            )
        if not 0 <= self.image_fraction <= 1:
            fail("image_fraction", f"{self.image_fraction} is not in [0, 1]")
        if self.batch_size < 1:
            fail("batch_size", f"{self.batch_size} must be >= 1")
        pixels = max(h * w for h, w in self.size_choices)
        if self.max_pixels < max(self.frame_choices) * pixels:
            fail(
                "max_pixels",
                f"{self.max_pixels} is under one sample of the largest shape "
                f"({max(self.frame_choices)} frames of {pixels} pixels)",
            )
        if self.eval_samples < 1:
            fail("eval_samples", f"{self.eval_samples} must be >= 1")


def _step_shape(cfg: VAEDataConfig, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(frames, H, W, samples) of one step."""
    image = rng.random() < cfg.image_fraction
    frames = 1 if image else int(rng.choice(cfg.frame_choices))
    h, w = cfg.size_choices[int(rng.integers(len(cfg.size_choices)))]
    return frames, h, w, max(1, min(cfg.batch_size, cfg.max_pixels // (frames * h * w)))


def _synthetic(rng: np.random.Generator, frames: int, h: int, w: int) -> np.ndarray:
    color = tuple(synthetic.COLORS)[int(rng.integers(len(synthetic.COLORS)))]
    shape = synthetic.SHAPES[int(rng.integers(len(synthetic.SHAPES)))]
    direction = (
        synthetic.STILL
        if frames == 1
        else synthetic.DIRECTIONS[int(rng.integers(len(synthetic.DIRECTIONS)))]
    )
    return synthetic.render(synthetic.SampleSpec(color, shape, direction, frames, h, w), rng)


def _pan(rng: np.random.Generator, names: tuple[str, ...], frames: int, h: int, w: int):
    photo = pan.photos(names)[names[int(rng.integers(len(names)))]]
    return pan.pan_video(photo, frames, h, w, rng)


class _Records:
    """The records source and the indices already warned about (one warning per bad record)."""

    def __init__(self, path: str):
        self.path = path
        self.source = sources.open_records(path)
        self.warned: set[int] = set()

    def skip(self, index: int, why: str) -> None:
        if index not in self.warned:
            self.warned.add(index)
            log.warning("VAE data: skipping record %d of %s: %s", index, self.path, why)


@functools.cache
def _records(path: str) -> _Records:
    return _Records(path)


def records_split(cfg: VAEDataConfig) -> tuple[_Records, int]:
    """(records, number of training records): the last cfg.eval_samples are held out."""
    r = _records(cfg.records.path)
    n_train = len(r.source) - cfg.eval_samples
    if n_train < 1:
        raise ValueError(
            f"data.records.path: {len(r.source)} records at {cfg.records.path!r}; "
            f"need more than data.eval_samples={cfg.eval_samples} (held out)"
        )
    return r, n_train


def record_clip(
    element: dict, frames: int, h: int, w: int, rng: np.random.Generator
) -> tuple[np.ndarray | None, str]:
    """A record element -> (uint8 (frames, h, w, 3), "") by the rule of the module docstring, or
    (None, why) when it cannot give one."""
    if "decode_error" in element:
        return None, element["decode_error"]
    video = element["video"]
    t, vh, vw = video.shape[:3]
    if t < frames:
        return None, f"{t} frames, the step needs {frames}"
    wh, ww = pan.largest_window((vh, vw), w / h)
    if wh < h - 1e-6:
        return None, (
            f"{vh}x{vw}: its largest {h}:{w} window is {wh:.1f}x{ww:.1f}, under the "
            f"step's {h}x{w} (no upsampling)"
        )
    t0 = int(rng.integers(t - frames + 1))
    x0, y0 = rng.uniform(0, vw - ww), rng.uniform(0, vh - wh)
    box = (x0, y0, min(x0 + ww, vw), min(y0 + wh, vh))
    return resize_video(video[t0 : t0 + frames], h, w, box=box), ""


def _record_samples(
    cfg: VAEDataConfig, rng: np.random.Generator, frames: int, h: int, w: int, n: int
) -> tuple[list[np.ndarray], int]:
    r, n_train = records_split(cfg)
    videos, skipped, tries = [], 0, 0
    while len(videos) < n:
        if tries >= MAX_TRIES_PER_SAMPLE * n:
            raise ValueError(
                f"data.records.path: {tries} draws from {cfg.records.path!r} gave {len(videos)} "
                f"of the {n} usable samples a {frames}x{h}x{w} step needs ({skipped} skipped: "
                "decode errors, too few frames, or smaller than the step's size; lower "
                "data.frame_choices / data.size_choices or use larger records)"
            )
        tries += 1
        index = int(rng.integers(n_train))
        clip, why = record_clip(r.source[index], frames, h, w, rng)
        if clip is None:
            skipped += 1
            r.skip(index, why)
        else:
            videos.append(clip)
    return videos, skipped


def sample_batch(cfg: VAEDataConfig, step: int, seed: int | None = None) -> tuple[np.ndarray, int]:
    """(batch `step` of the stream `seed` (default cfg.seed): float32 (B, T, H, W, 3) in [-1, 1],
    records skipped to fill it)."""
    rng = np.random.default_rng([cfg.seed if seed is None else seed, int(step)])
    frames, h, w, n = _step_shape(cfg, rng)
    skipped = 0
    if cfg.source == "records":
        videos, skipped = _record_samples(cfg, rng, frames, h, w, n)
    elif cfg.source in ("synthetic", "pan", "mixed"):
        videos = []
        for _ in range(n):
            use_pan = cfg.source == "pan" or (
                cfg.source == "mixed" and rng.random() < cfg.pan_fraction
            )
            videos.append(
                _pan(rng, pan.TRAIN, frames, h, w) if use_pan else _synthetic(rng, frames, h, w)
            )
    else:
        raise ValueError(f"data.source: {cfg.source!r} is not one of {SOURCES}")
    return np.stack(videos).astype(np.float32) / 127.5 - 1.0, skipped


def batch_at(cfg: VAEDataConfig, step: int, seed: int | None = None) -> np.ndarray:
    """The batch of `sample_batch` alone."""
    return sample_batch(cfg, step, seed)[0]


def _to_float(video: np.ndarray) -> np.ndarray:
    return video[None].astype(np.float32) / 127.5 - 1.0


def heldout(cfg: VAEDataConfig, n: int, seed: int) -> list[np.ndarray]:
    """`n` single-sample batches (1, T, H, W, 3) of the held-out synthetic stream `seed`."""
    one = dataclasses.replace(cfg, batch_size=1, source="synthetic")
    return [batch_at(one, i, seed) for i in range(n)]


def heldout_sets(cfg: VAEDataConfig, n: int, seed: int) -> dict[str, list[np.ndarray]]:
    """Held-out evaluation sets by name, each a list of single-sample batches (1, T, H, W, 3) of
    the shapes the stream `seed` draws: "synthetic" always; "pan" (pans across the HELDOUT photos)
    for the sources "pan" and "mixed"; "records" (the last cfg.eval_samples records, a record
    unusable at its drawn shape is left out with a warning) for "records"."""
    sets = {"synthetic": heldout(cfg, n, seed)}
    one = dataclasses.replace(cfg, batch_size=1)
    if cfg.source in ("pan", "mixed"):
        videos = []
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            frames, h, w, _ = _step_shape(one, rng)
            name = pan.HELDOUT[i % len(pan.HELDOUT)]
            videos.append(_to_float(pan.pan_video(pan.photos([name])[name], frames, h, w, rng)))
        sets["pan"] = videos
    if cfg.source == "records":
        r, n_train = records_split(cfg)
        videos = []
        for i in range(cfg.eval_samples):
            rng = np.random.default_rng([seed, i])
            frames, h, w, _ = _step_shape(one, rng)
            clip, why = record_clip(r.source[n_train + i], frames, h, w, rng)
            if clip is None:
                r.skip(n_train + i, why)
            else:
                videos.append(_to_float(clip))
        if not videos:
            raise ValueError(
                f"data.records.path: none of the {cfg.eval_samples} held-out records "
                f"of {cfg.records.path!r} is usable for evaluation (see the warnings)"
            )
        sets["records"] = videos
    return sets

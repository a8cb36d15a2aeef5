"""Procedural captioned videos: one coloured shape moving on a plain dark-gray background.

Every sample is a pure function of ``(seed, index)``, so the dataset is random-access,
order-independent and identical across processes.

Caption grammar (lower case, one space between words, no punctuation):

* video (``frames > 1``): ``"a {color} {shape} moves {direction}"``,
  e.g. ``"a red square moves left"``
* image (``frames == 1``): ``"a {color} {shape} stands still"``,
  e.g. ``"a blue circle stands still"``

Directions are in screen coordinates: ``"up"`` is towards row 0, ``"right"`` towards the last
column.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (230, 220, 40),
    "green": (40, 200, 40),
    "cyan": (40, 210, 220),
    "blue": (50, 80, 230),
    "magenta": (220, 40, 220),
}
SHAPES: tuple[str, ...] = ("square", "circle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
STILL = "still"
BACKGROUND: tuple[int, int, int] = (40, 40, 40)
BACKGROUND_JITTER = 6  # per-sample gray offset of the background, uniform in [-6, 6]

_SIZE_FRAC = (0.25, 0.40)  # shape side as a fraction of min(H, W)
_TRAVEL_FRAC = (0.30, 0.50)  # total displacement as a fraction of the extent along the motion axis
_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """What one sample shows; ``direction`` is ``"still"`` iff ``frames == 1``."""

    color: str
    shape: str
    direction: str
    frames: int
    height: int
    width: int


def caption(spec: SampleSpec) -> str:
    """Caption of a sample, see the module docstring for the grammar."""
    if spec.direction == STILL:
        return f"a {spec.color} {spec.shape} stands still"
    return f"a {spec.color} {spec.shape} moves {spec.direction}"


def parse_caption(text: str) -> tuple[str | None, str | None]:
    """First known colour and first direction (or ``"still"``) word in ``text``; None if absent."""
    words = re.findall(r"[a-z]+", text.lower())
    color = next((w for w in words if w in COLORS), None)
    direction = next((w for w in words if w in DIRECTIONS or w == STILL), None)
    return color, direction


def _check_spec(spec: SampleSpec) -> None:
    if spec.color not in COLORS:
        raise ValueError(f"unknown color {spec.color!r}")
    if spec.shape not in SHAPES:
        raise ValueError(f"unknown shape {spec.shape!r}")
    if spec.frames < 1 or spec.height < 1 or spec.width < 1:
        raise ValueError(f"frames, height and width must be positive: {spec}")
    if (spec.direction == STILL) != (spec.frames == 1):
        raise ValueError(f"direction must be 'still' iff frames == 1: {spec}")
    if spec.direction != STILL and spec.direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {spec.direction!r}")


def render(spec: SampleSpec, rng: np.random.Generator) -> np.ndarray:
    """Render ``spec`` as uint8 frames ``(T, H, W, 3)``; position, size and speed come from ``rng``.

    The shape side is 25-40% of ``min(H, W)``; it travels 30-50% of the frame extent along the
    motion axis at constant speed and stays fully inside the frame for the whole clip.
    """
    _check_spec(spec)
    t, h, w = spec.frames, spec.height, spec.width
    side = int(np.clip(round(rng.uniform(*_SIZE_FRAC) * min(h, w)), 1, min(h, w)))
    dy, dx = _STEP.get(spec.direction, (0, 0))

    def track(extent: int, step: int) -> np.ndarray:  # (T,) top-left coordinate per frame
        room = extent - side
        if step == 0:
            return np.full(t, rng.uniform(0.0, room))
        travel = min(rng.uniform(*_TRAVEL_FRAC) * extent, float(room))
        start = rng.uniform(0.0, room - travel) + (travel if step < 0 else 0.0)
        return start + step * travel * np.linspace(0.0, 1.0, t)

    top = np.clip(np.rint(track(h, dy)), 0, h - side)  # (T,)
    left = np.clip(np.rint(track(w, dx)), 0, w - side)  # (T,)
    offset = int(rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1))

    ys = np.arange(h)[None, :, None] + 0.5  # (1, H, 1) pixel centres
    xs = np.arange(w)[None, None, :] + 0.5  # (1, 1, W)
    top, left = top[:, None, None], left[:, None, None]  # (T, 1, 1)
    if spec.shape == "square":
        mask = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)  # (T, H, W)
    else:
        r = side / 2
        mask = (ys - top - r) ** 2 + (xs - left - r) ** 2 <= r * r  # (T, H, W)

    bg = np.clip(np.asarray(BACKGROUND) + offset, 0, 255).astype(np.uint8)  # (3,)
    video = np.empty((t, h, w, 3), np.uint8)  # (T, H, W, 3)
    video[...] = bg
    video[mask] = np.asarray(COLORS[spec.color], np.uint8)
    return video


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Sampling distribution of :class:`SyntheticVideos`.

    A sample is an image (``frames == 1``) with probability ``image_fraction``; otherwise its
    duration is drawn uniformly from the entries of ``frame_choices`` that are > 1 (if there are
    none, every sample is an image). Sizes are ``(H, W)`` pairs drawn uniformly.
    """

    # The data.synthetic section of configs/default.py (seed: data.seed), where the defaults are.
    num_samples: int  # the index space
    seed: int
    frame_choices: tuple[int, ...]  # durations in frames (1: an image)
    image_fraction: float  # share of one-frame samples
    size_choices: tuple[tuple[int, int], ...]  # (H, W)
    fps: float  # nominal frame rate reported with each sample
    # Not in the config: the caption vocabulary drawn from.
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    directions: tuple[str, ...] = DIRECTIONS

    def __post_init__(self) -> None:
        if self.num_samples < 0 or self.seed < 0:
            raise ValueError("num_samples and seed must be non-negative")
        if not 0.0 <= self.image_fraction <= 1.0:
            raise ValueError(f"image_fraction must be in [0, 1], got {self.image_fraction}")
        if not self.frame_choices or min(self.frame_choices) < 1:
            raise ValueError(f"frame_choices must be non-empty and >= 1: {self.frame_choices}")
        if not self.size_choices or min(min(s) for s in self.size_choices) < 1:
            raise ValueError(f"size_choices must be non-empty and >= 1: {self.size_choices}")
        for name, values, allowed in (
            ("colors", self.colors, tuple(COLORS)),
            ("shapes", self.shapes, SHAPES),
            ("directions", self.directions, DIRECTIONS),
        ):
            if not values or any(v not in allowed for v in values):
                raise ValueError(f"{name} must be a non-empty subset of {allowed}: {values}")


class SyntheticVideos:
    """Random-access source (works as a grain MapDataset source: __len__ and __getitem__)."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        self._video_frames = tuple(f for f in cfg.frame_choices if f > 1)

    def __len__(self) -> int:
        return self.cfg.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an integer, got {type(index).__name__}")
        if not 0 <= index < self.cfg.num_samples:
            raise IndexError(f"index {index} out of range [0, {self.cfg.num_samples})")
        return np.random.default_rng([self.cfg.seed, int(index)])

    def _draw_spec(self, rng: np.random.Generator) -> SampleSpec:
        cfg = self.cfg
        image = rng.random() < cfg.image_fraction or not self._video_frames
        frames = 1 if image else int(rng.choice(self._video_frames))
        height, width = cfg.size_choices[int(rng.integers(len(cfg.size_choices)))]
        color = cfg.colors[int(rng.integers(len(cfg.colors)))]
        shape = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
        direction = cfg.directions[int(rng.integers(len(cfg.directions)))]
        return SampleSpec(color, shape, STILL if image else direction, frames, height, width)

    def spec(self, index: int) -> SampleSpec:
        """Spec of sample ``index``, drawn from ``np.random.default_rng([seed, index])``."""
        return self._draw_spec(self._rng(index))

    def __getitem__(self, index: int) -> dict:
        """``{"video": uint8 (T, H, W, 3), "caption", "fps", "color", "direction", "shape", "index"}``."""
        rng = self._rng(index)
        spec = self._draw_spec(rng)  # the same stream then drives the rendering
        return {
            "video": render(spec, rng),
            "caption": caption(spec),
            "fps": self.cfg.fps,
            "color": spec.color,
            "direction": spec.direction,
            "shape": spec.shape,
            "index": int(index),
        }

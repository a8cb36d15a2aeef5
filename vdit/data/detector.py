"""Non-learned detector: colour and motion direction of the dominant foreground object.

Used to score generated videos against their captions (see :func:`score`). Foreground pixels are
those far from the background colour (by default the per-frame median colour, which is robust
when a generated background is off); the colour is the palette entry nearest in hue to the mean
foreground colour, and the motion is the least-squares drift of the foreground centroid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from vdit.data.synthetic import COLORS, STILL, parse_caption

MIN_DISTANCE = 50.0  # absolute floor of the foreground threshold (RGB distance, 0-255 scale)
REL_DISTANCE = 0.5  # threshold is also at least this fraction of the 99th-percentile distance
MIN_CHROMA = 30.0  # mean foreground colour less saturated than this -> no colour (None)
MIN_PIXELS = 2  # fewer foreground pixels than this in the whole clip -> no object
STILL_FRACTION = 0.1  # displacement below this fraction of the frame extent -> "still"


@dataclasses.dataclass(frozen=True)
class Detection:
    """What :func:`detect` found.

    ``displacement`` is the fitted centroid drift over the clip as ``(dx / W, dy / H)`` (positive
    is right / down); ``foreground_fraction`` is the fraction of pixels classed as foreground.
    """

    color: str | None
    direction: str
    displacement: tuple[float, float] = (0.0, 0.0)
    foreground_fraction: float = 0.0


def _to_float(video: np.ndarray) -> np.ndarray:
    """uint8 in [0, 255] or float in [-1, 1] -> float32 in [0, 255], shape (T, H, W, 3)."""
    video = np.asarray(video)
    if video.ndim == 3:
        video = video[None]
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a (T, H, W, 3) video, got shape {video.shape}")
    if np.issubdtype(video.dtype, np.floating):
        return np.clip((video.astype(np.float32) + 1.0) * 127.5, 0.0, 255.0)
    if video.dtype != np.uint8:
        raise ValueError(f"expected uint8 or float video, got {video.dtype}")
    return video.astype(np.float32)


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue angle in radians and chroma (max - min) of RGB colours (..., 3)."""
    rgb = np.asarray(rgb, np.float64)
    r, g, b = np.moveaxis(rgb, -1, 0)
    # Opponent-colour plane: hue as an angle, red at 0, yellow ~60, green ~120 degrees, ...
    a = r - 0.5 * (g + b)
    c = (math.sqrt(3) / 2) * (g - b)
    chroma = np.max(rgb, axis=-1) - np.min(rgb, axis=-1)
    return np.arctan2(c, a), chroma


def _classify(rgb: np.ndarray, colors: Mapping[str, tuple[int, int, int]]) -> str | None:
    """Palette name nearest in hue to ``rgb`` (3,), or None if ``rgb`` is nearly gray."""
    hue, chroma = _hue_chroma(rgb)
    if chroma < MIN_CHROMA:
        return None
    names = list(colors)
    hues, _ = _hue_chroma(np.array([colors[n] for n in names], np.float64))
    gap = np.abs(np.angle(np.exp(1j * (hues - hue))))  # circular hue distance
    return names[int(np.argmin(gap))]


def detect(
    video: np.ndarray,
    colors: Mapping[str, tuple[int, int, int]] = COLORS,
    background: tuple[int, int, int] | None = None,
) -> Detection:
    """Detect the dominant object's colour and motion in ``video`` (T, H, W, 3).

    ``video`` is uint8 in [0, 255] or floating point in [-1, 1] (a single (H, W, 3) frame is also
    accepted). ``background`` is a fixed RGB colour; None (default) uses each frame's median.
    Direction is ``"still"`` for one frame or a drift below ``STILL_FRACTION`` of the frame.
    """
    x = _to_float(video)  # (T, H, W, 3)
    t, h, w, _ = x.shape
    if background is None:
        bg = np.median(x.reshape(t, -1, 3), axis=1)[:, None, None, :]  # (T, 1, 1, 3)
    else:
        bg = np.asarray(background, np.float32)[None, None, None, :]  # (1, 1, 1, 3)
    dist = np.linalg.norm(x - bg, axis=-1)  # (T, H, W)
    threshold = max(MIN_DISTANCE, REL_DISTANCE * float(np.percentile(dist, 99)))
    mask = dist > threshold  # (T, H, W)
    n_fg = int(mask.sum())
    if n_fg < MIN_PIXELS:
        return Detection(None, STILL)

    color = _classify(x[mask].mean(axis=0), colors)
    fraction = n_fg / mask.size
    counts = mask.sum(axis=(1, 2))  # (T,)
    valid = counts > 0
    if t == 1 or valid.sum() < 2:
        return Detection(color, STILL, foreground_fraction=fraction)

    ys = np.arange(h, dtype=np.float64) + 0.5  # (H,)
    xs = np.arange(w, dtype=np.float64) + 0.5  # (W,)
    cy = (mask.sum(axis=2) @ ys)[valid] / counts[valid]  # (T_valid,)
    cx = (mask.sum(axis=1) @ xs)[valid] / counts[valid]  # (T_valid,)
    time = np.linspace(0.0, 1.0, t)[valid]  # clip time in [0, 1]
    dx = float(np.polyfit(time, cx, 1)[0]) / w  # drift over the whole clip, per frame width
    dy = float(np.polyfit(time, cy, 1)[0]) / h
    if max(abs(dx), abs(dy)) < STILL_FRACTION:
        direction = STILL
    elif abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return Detection(color, direction, (dx, dy), fraction)


def score(videos: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Accuracy of :func:`detect` against the colour and direction named in each caption.

    ``color_accuracy`` is over all videos, ``motion_accuracy`` over clips with T > 1 only (NaN if
    there are none); a caption without a colour / direction word counts as a miss.
    """
    if len(videos) != len(captions):
        raise ValueError(f"{len(videos)} videos but {len(captions)} captions")
    color_hits = motion_hits = n_video = 0
    for video, text in zip(videos, captions, strict=True):
        want_color, want_direction = parse_caption(text)
        det = detect(video)
        color_hits += want_color is not None and det.color == want_color
        if np.shape(video)[0] > 1 and np.ndim(video) == 4:
            n_video += 1
            motion_hits += want_direction is not None and det.direction == want_direction
    n = len(videos)
    return {
        "color_accuracy": color_hits / n if n else math.nan,
        "motion_accuracy": motion_hits / n_video if n_video else math.nan,
        "n": float(n),
        "n_video": float(n_video),
    }

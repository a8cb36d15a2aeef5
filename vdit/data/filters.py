"""Clip scores and filters for `vdit prepare`: every clip gets the scores below (stored in its
record as JSON member `scores`, so training can filter again without preparing again); a clip is
dropped for the first filter it fails, in `REASONS` order, and counted by that name in the manifest.

| score        | what                                                                        |
|--------------|-----------------------------------------------------------------------------|
| `height`, `width`, `frames`, `seconds` | the clip's size after decoding (seconds 0 for images) |
| `motion`     | mean absolute luma difference of consecutive frames, 0-255 scale, on frames   |
|              | downsized to <= 64 pixels ("diff"); or the mean optical-flow magnitude in     |
|              | pixels of the downsized frame per frame (OpenCV Farneback, "flow")            |
| `brightness` | mean luma, 0-255                                                            |
| `contrast`   | standard deviation of luma within a frame (mean over frames), 0-255         |
| `phash`      | 64-bit DCT perceptual hashes (hex) of the first, middle and last frames     |

Near-duplicates: a clip whose key-frame hashes are each within `dedup_distance` bits (Hamming) of
those of a clip kept before it (in the output's defined order) is dropped as "duplicate".
Images (one frame) are not scored for motion or duration.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

REASONS: dict[str, str] = {
    "too_small": "the shorter side is under filters.min_side pixels",
    "too_short": "the clip is shorter than filters.min_seconds (or a shot under shots.min_seconds)",
    "static": "the motion score is under filters.min_motion (near-static)",
    "black": "the mean brightness is under filters.min_brightness (near-black)",
    "flat": "the contrast is under filters.min_contrast (flat, e.g. a single colour)",
    "duplicate": "its key frames are within filters.dedup_distance bits of a clip kept before it",
    "caption_failed": "the captioner failed on the clip and captioner.on_failure='drop'",
}
MOTIONS = ("diff", "flow")
_SCORE_SIDE = 64  # frames are downsized to this longer side for the motion score


@dataclasses.dataclass(frozen=True)
class FilterOptions:
    """The filters section of configs/prepare.py; 0 (or -1 for dedup) turns a filter off."""

    min_side: int = 0  # drop clips whose shorter side is under N pixels
    min_seconds: float = 0.0  # drop video clips shorter than this
    motion: str = "diff"  # motion score: "diff" (frame differences) | "flow" (optical flow)
    min_motion: float = 0.0  # drop video clips whose motion score is under this
    min_brightness: float = 0.0  # drop clips whose mean luma (0-255) is under this
    min_contrast: float = 0.0  # drop clips whose luma standard deviation (0-255) is under this
    dedup_distance: int = -1  # drop near-duplicates within N bits per key frame (-1: off)

    def __post_init__(self):
        if self.motion not in MOTIONS:
            raise ValueError(f"motion={self.motion!r}: choose from {MOTIONS}")
        for name in ("min_side", "min_seconds", "min_motion", "min_brightness", "min_contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 = off)")
        if not -1 <= self.dedup_distance <= 64:
            raise ValueError(f"dedup_distance={self.dedup_distance}: -1 (off) or 0..64 bits")


def _luma(video: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> float32 (T, H, W) luma (ITU-R BT.601)."""
    return video.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _small(video: np.ndarray, side: int = _SCORE_SIDE) -> np.ndarray:
    t, h, w, _ = video.shape
    if max(h, w) <= side:
        return video
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.stack(
        [np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BOX)) for f in video]
    )


def motion_score(video: np.ndarray, kind: str = "diff") -> float:
    """How much a clip moves (see the module docstring); 0 for one frame."""
    if len(video) < 2:
        return 0.0
    small = _small(video)
    if kind == "diff":
        luma = _luma(small)
        return float(np.abs(np.diff(luma, axis=0)).mean())
    import cv2

    gray = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in small]
    mags = []
    for a, b in zip(gray[:-1], gray[1:], strict=True):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 3, 5, 1.1, 0)
        mags.append(float(np.linalg.norm(flow, axis=-1).mean()))
    return float(np.mean(mags))


def phash(frame: np.ndarray) -> int:
    """The 64-bit DCT perceptual hash of an RGB frame: luma at 32x32, the 8x8 lowest frequencies
    of its 2-D DCT, each bit = coefficient above their median."""
    import scipy.fft

    gray = (
        Image.fromarray(np.ascontiguousarray(frame))
        .convert("L")
        .resize((32, 32), Image.Resampling.BOX)
    )
    coeffs = scipy.fft.dctn(np.asarray(gray, np.float64), norm="ortho")[:8, :8].ravel()
    bits = coeffs > np.median(coeffs)
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def key_frames(length: int) -> list[int]:
    return sorted({0, length // 2, length - 1})


def scores(video: np.ndarray, fps: float, motion: str = "diff") -> dict:
    """The scores of one clip, uint8 (T, H, W, 3) (see the module docstring)."""
    t, h, w, _ = video.shape
    luma = _luma(_small(video, 256))
    return {
        "height": int(h),
        "width": int(w),
        "frames": int(t),
        "seconds": float(t / fps) if fps > 0 else 0.0,
        "motion": motion_score(video, motion) if t > 1 else 0.0,
        "brightness": float(luma.mean()),
        "contrast": float(luma.reshape(t, -1).std(axis=1).mean()),
        "phash": [f"{phash(video[k]):016x}" for k in key_frames(t)],
    }


def reason(s: dict, options: FilterOptions) -> str | None:
    """The first filter (REASONS order, duplicates aside) a clip with scores `s` fails, or None."""
    video = s["frames"] > 1
    if options.min_side and min(s["height"], s["width"]) < options.min_side:
        return "too_small"
    if video and options.min_seconds and s["seconds"] < options.min_seconds:
        return "too_short"
    if video and options.min_motion and s["motion"] < options.min_motion:
        return "static"
    if options.min_brightness and s["brightness"] < options.min_brightness:
        return "black"
    if options.min_contrast and s["contrast"] < options.min_contrast:
        return "flat"
    return None


class Dedup:
    """Near-duplicate finder over the clips kept so far (hashes only: 8 bytes per key frame)."""

    def __init__(self, distance: int):
        self.distance = distance
        self._hashes: dict[int, list[np.ndarray]] = {}  # key-frame count -> uint64 (1, K) rows
        self._names: dict[int, list[str]] = {}

    def check(self, hashes: list[str], name: str) -> str | None:
        """The name of a kept clip this one duplicates, or None (then it is remembered as kept)."""
        if self.distance < 0:
            return None
        h = np.array([int(x, 16) for x in hashes], np.uint64)
        rows = self._hashes.setdefault(len(h), [])
        if rows:
            if len(rows) > 1:  # keep one array: the next check is one vectorised pass
                rows[:] = [np.concatenate(rows)]
            x = np.bitwise_xor(rows[0], h)  # (N, K)
            bits = np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)
            close = np.all(bits <= self.distance, axis=1)
            if close.any():
                return self._names[len(h)][int(np.argmax(close))]
        rows.append(h[None])
        self._names.setdefault(len(h), []).append(name)
        return None

"""The size policy: how a source sample of any duration, frame rate and size becomes a whole-patch
latent grid under the token cap (keep the aspect ratio, resize down, never crop; keep at least
`min_side` pixels on the short side by taking fewer frames first), and the statistics vocabulary that
says what it changed (EVENTS) or why it refused a sample (REJECTS).

Shared by training (`vdit/data/pipeline.py`) and `vdit encode`, so latents are encoded with the very
policy the DiT would apply to pixels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

# Why a sample's size changed (a sample can have several) and why a sample was rejected. Every
# sample carries these as counts in its "stats" feature (REJECTS counted on the next accepted sample),
# so the counts travel with the data through packing, worker processes and checkpoints.
EVENTS: tuple[str, ...] = (
    "snapped",  # resized by less than a patch so its sides are whole patches (aspect kept to a patch)
    "downscaled",  # resized down in space to fit max_tokens_per_sample
    "time_subsampled",  # frames strided to fit max_tokens_per_sample at the smallest useful size
    "frames_resampled",  # frames picked evenly over the whole clip to make whole temporal patches
    "frames_trimmed",  # trailing frames that make no whole temporal patch dropped (< pt * ct frames)
    "fps_subsampled",  # frames strided by data.frame_stride / data.max_fps
    "frames_cut",  # only the first frames kept, so the short side stays >= data.min_side under the cap
    # (the pipeline's, not the size policy's:)
    "task_fallback",  # the drawn task needs more latent frames (vdit.data.tasks.MIN_FRAMES): t2v
    "caption_cut",  # caption longer than model.text.max_len tokens (BOS + UTF-8 bytes): cut
    "image_repeated",  # an image (one latent frame) repeated to one temporal patch (model.patch_t)
    "latent_cut",  # a latent of another patch: the remainder under one patch cut off
)
REJECTS: tuple[str, ...] = (
    "empty",  # no frames or zero height/width
    "bad_shape",  # not uint8 (T, H, W, 3)
    "too_small",  # height or width under one patch in pixels
    "too_short",  # a video (2+ latent frames) of fewer latent frames than one temporal patch
    "non_finite",  # NaN or inf values
    "over_cap",  # over max_tokens_per_sample even at one patch on its short side and one in time
    "decode_error",  # the source could not read or decode it (e.g. a corrupt record)
    "no_text_embedding",  # model.text.kind="precomputed", but the record carries no caption embedding
)
STATS: tuple[str, ...] = (*EVENTS, *(f"rejected_{r}" for r in REJECTS), "tokens_dropped")
DROPPED = STATS.index("tokens_dropped")
TIME_FITS = ("resample", "trim")


def stats(events=(), rejected: str | None = None, dropped: int = 0) -> np.ndarray:
    """One sample's (1, len(STATS)) int32 counts: its events, its rejection, its dropped tokens."""
    out = np.zeros((1, len(STATS)), np.int32)
    for e in events:
        out[0, STATS.index(e)] = 1
    if rejected is not None:
        out[0, STATS.index(f"rejected_{rejected}")] = 1
    out[0, DROPPED] = dropped
    return out


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
    """Keep aspect ratio and duration; resize down (never crop) to fit `max_tokens_per_sample`, but
    not under `min_side` pixels on the short side while fewer frames can fit instead; snap to the
    grid. The fields are the data section's (configs/default.py) plus the patch and the
    autoencoder's compression. An image (one latent frame) is one temporal patch whatever the
    temporal patch (the pipeline repeats it to `patch[0]` frames)."""

    patch: tuple[int, int, int]  # (pt, ph, pw) latent patch
    compression: tuple[int, int, int]  # autoencoder (time, height, width) factors
    max_tokens_per_sample: int  # tokens per sample at most
    # Frames that make no whole temporal patch (at most pt * ct - 1): "resample" picks the kept
    # frames evenly over the whole clip (nothing cut off, the frame rate changes by < pt*ct / T);
    # "trim" drops them from the end.
    time_fit: str
    frame_stride: int  # keep every k-th source frame (frame-rate subsampling)
    max_fps: float  # > 0: sources with an "fps" above this are strided (ceil(fps / max_fps))
    # Short side (pixels) the cap may not shrink a sample under while fewer frames can fit instead
    # (a shorter clip rather than a smaller one); never above the sample's own; 0: off.
    min_side: int = 0

    def latent_frames(self, frames: int) -> int:
        ct = self.compression[0]
        return frames if ct == 1 else 1 + (frames - 1) // ct  # causal: first frame alone

    def fps_stride(self, element: dict[str, Any]) -> int:
        """The frame-rate subsampling `fit_video` applies to a source element: every
        `frame_stride`-th frame, or coarser for a source whose "fps" is over `max_fps`; 1 for an
        image."""
        stride = self.frame_stride
        if self.max_fps > 0 and "fps" in element:
            stride = max(stride, math.ceil(float(element["fps"]) / self.max_fps - 1e-9))
        return stride if np.shape(element["video"])[0] > 1 else 1

    def temporal_patches(self, frames: int) -> tuple[int, int]:
        """(latent frames kept, temporal patches) of `frames` pixel frames: whole patches, or an
        image (one latent frame) as one patch."""
        lf, pt = self.latent_frames(frames), self.patch[0]
        return (1, 1) if lf == 1 else (lf // pt * pt, lf // pt)

    def plan(self, frames: int, height: int, width: int) -> SizePlan:
        """How a (frames, height, width) pixel sample becomes a whole-patch latent grid under the cap.

        Frames beyond a whole number of latent patches are dropped from the end (at most pt*ct - 1
        frames); spatial sizes are resized to multiples of the patch in pixels. A sample over the
        token cap keeps its first frames only (`frames_cut`) where scaling it down would take its
        short side under `min_side`; otherwise (or when even one temporal patch at `min_side` is
        over the cap) it is scaled down in space (aspect kept), then subsampled in time if even the
        smallest spatial grid is over the cap. Raises `Rejected` for a sample that cannot hold one
        patch.
        """
        pt, ph, pw = self.patch
        ct, ch, cw = self.compression
        cap = self.max_tokens_per_sample
        uh, uw = ph * ch, pw * cw
        if frames < 1 or height < 1 or width < 1:
            raise Rejected("empty", f"{frames} frames of {height}x{width}")
        if height < uh or width < uw:
            raise Rejected("too_small", f"{height}x{width} is under one patch ({uh}x{uw} pixels)")
        if 1 < self.latent_frames(frames) < pt:
            raise Rejected(
                "too_short",
                f"{frames} frames are {self.latent_frames(frames)} latent frames, no whole "
                f"temporal patch of {pt}",
            )
        a, b = height / uh, width / uw  # the sample's size in patches
        fit = self._fit_at_floor(frames, height, width)
        cut = fit is not None and fit[1] < self.temporal_patches(frames)[1]
        if fit is not None:
            lt, nt = fit
            stride, f = 1, frames
            scale = min(1.0, math.sqrt(cap / (nt * a * b)))
            fh, fw = self._floor_grid(height, width)
            # at least the floor's grid (which fits by construction), whatever the rounding
            gh, gw = max(int(a * scale), fh), max(int(b * scale), fw)
        else:
            stride = 1
            while True:
                f = (frames - 1) // stride + 1
                lt, nt = self.temporal_patches(f)
                if nt * (height // uh) * (width // uw) <= cap:
                    scale = 1.0
                else:  # floor(a * s) * floor(b * s) <= a * b * s^2 = cap per temporal patch
                    scale = math.sqrt(cap / (nt * a * b))
                gh = max(1, int(a * scale))
                gw = max(1, int(b * scale))
                if nt * gh * gw <= cap or nt == 1:
                    break
                stride *= 2
        if nt * gh * gw > cap:  # an extreme aspect ratio: no crop, no squash
            raise Rejected(
                "over_cap",
                f"{frames}x{height}x{width} needs {gh}x{gw} patches per "
                f"frame at least, over data.max_tokens_per_sample={cap}",
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
        if cut:
            events.append("frames_cut")
        elif kept < f:
            events.append("frames_resampled" if self.time_fit == "resample" else "frames_trimmed")
        resample = self.time_fit == "resample" and not cut
        return SizePlan(kept, stride, th, tw, tuple(events), resample)

    def _floor_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patches (rows, columns) of a frame scaled (aspect kept) to a short side of
        min(min_side, its own) pixels, in exact integer arithmetic."""
        _, ph, pw = self.patch
        _, ch, cw = self.compression
        short, floor = min(height, width), min(self.min_side, height, width)
        return max(1, height * floor // (short * ph * ch)), max(
            1, width * floor // (short * pw * cw)
        )

    def _fit_at_floor(self, frames: int, height: int, width: int) -> tuple[int, int] | None:
        """Where fitting the whole clip under the cap would shrink its short side under
        min(min_side, its own): the (latent frames, temporal patches) of the longest start of the
        clip that fits with the short side there (all of it, when rounding to patches makes room).
        None where the floor is not in the way, or cannot be kept (one temporal patch at the floor
        is already over the cap: the sample is scaled down as without a floor)."""
        pt, ph, pw = self.patch
        _, ch, cw = self.compression
        uh, uw = ph * ch, pw * cw
        floor = min(self.min_side, height, width)
        lt_all, nt_all = self.temporal_patches(frames)
        if floor <= 0 or nt_all == 1:
            return None
        a, b = height / uh, width / uw
        floor_scale = floor / min(height, width)
        if math.sqrt(self.max_tokens_per_sample / (nt_all * a * b)) >= floor_scale:
            return None  # the cap's scale keeps the floor
        fh, fw = self._floor_grid(height, width)
        nt = min(self.max_tokens_per_sample // (fh * fw), nt_all)
        if nt < 1:
            return None
        return (lt_all, nt_all) if nt == nt_all else (nt * pt, nt)


def resize_video(
    video: np.ndarray,
    height: int,
    width: int,
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Area-filtered resize of uint8 (T, H, W, 3) frames (downscaling never aliases); `box`
    (left, upper, right, lower), in pixels, resizes that window of each frame instead."""
    if box is None and video.shape[1:3] == (height, width):
        return video
    return np.stack(
        [
            np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BOX, box=box))
            for f in video
        ]
    )


def fit_video(element: dict[str, Any], size: SizePolicy) -> tuple[np.ndarray, list[str]]:
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
    stride = size.fps_stride(element)
    if stride > 1:
        video = video[::stride]
        events.append("fps_subsampled")
    t, h, w, _ = video.shape
    plan = size.plan(t, h, w)
    video = resize_video(video[plan.frame_indices(t)], plan.height, plan.width)
    return video, [*events, *plan.events]

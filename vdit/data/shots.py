"""Shot splitting for `vdit prepare`: a decoded video -> the frame ranges of its shots -> clips.

Shot boundaries come from PySceneDetect's `ContentDetector` (the change in hue, saturation, luma
and edges between consecutive frames above `threshold` is a cut), fed the frames `prepare` already
decoded (no second decode). A shot shorter than `min_seconds` is dropped (counted as "too_short");
a shot longer than `max_seconds` is cut into consecutive clips of `max_seconds` (the remainder is a
clip of its own, dropped if it is shorter than `min_seconds`). Needs the `data` extra.
"""

from __future__ import annotations

import numpy as np


def require():
    """scenedetect, or an ImportError that says how to install it."""
    try:
        import scenedetect
    except ImportError as e:
        raise ImportError(
            f"shot splitting needs PySceneDetect ({e}); install the data extra: "
            'pip install -e ".[data]"'
        ) from None
    return scenedetect


def detect(video: np.ndarray, fps: float, threshold: float = 27.0) -> list[tuple[int, int]]:
    """uint8 (T, H, W, 3) RGB frames -> [(start, end), ...] frame ranges of the shots (end
    exclusive), covering 0..T in order."""
    scenedetect = require()
    from scenedetect.detectors import ContentDetector

    rate = fps if fps > 0 else 25.0
    detector = ContentDetector(threshold=threshold, min_scene_len=1)
    cuts: list[int] = []
    for t, frame in enumerate(video):
        tc = scenedetect.FrameTimecode(t, rate)
        bgr = np.ascontiguousarray(frame[..., ::-1])  # OpenCV's channel order
        cuts += [c.frame_num for c in detector.process_frame(tc, bgr)]
    if len(video):
        cuts += [
            c.frame_num
            for c in detector.post_process(scenedetect.FrameTimecode(len(video) - 1, rate))
        ]
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(video)}), len(video)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def clips(
    shots: list[tuple[int, int]], fps: float, min_seconds: float = 0.0, max_seconds: float = 0.0
) -> list[tuple[int, int, bool]]:
    """Shots -> [(start, end, too_short), ...]: shots over `max_seconds` cut into pieces of at most
    that (0: no cap); a piece under `min_seconds` is marked too_short (0: none)."""
    out = []
    max_len = max(1, int(round(max_seconds * fps))) if max_seconds > 0 and fps > 0 else 0
    for start, end in shots:
        pieces = (
            [(a, min(a + max_len, end)) for a in range(start, end, max_len)]
            if max_len
            else [(start, end)]
        )
        for a, b in pieces:
            out.append((a, b, fps > 0 and (b - a) / fps < min_seconds))
    return out

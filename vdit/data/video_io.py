"""Writing videos a person can open: MP4 (H.264 through PyAV), GIF, or PNG for one frame.

Everything is encoded and decoded in this process (PyAV binds FFmpeg's libraries; GIF and PNG go
through Pillow): no ffmpeg subprocess is forked, which a multithreaded JAX process warns about and
may deadlock on.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from fractions import Fraction

import av
import imageio.v3 as iio
import numpy as np

MP4_CRF = 25  # H.264 constant rate factor (imageio's default quality 5 of 10 maps to 25)
IMAGE_EXTS = (".gif", ".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float latent/pixels in [-1, 1] -> uint8 [0, 255] (values outside are clipped)."""
    if x.dtype == np.uint8:
        return x
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def upscale(video: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement (T, H, W, C) -> (T, H*f, W*f, C), for looking at tiny videos."""
    if factor <= 1:
        return video
    return video.repeat(factor, axis=1).repeat(factor, axis=2)


def tile(videos: Sequence[np.ndarray], cols: int, pad: int = 2) -> np.ndarray:
    """Videos (T_i, H_i, W_i, 3) uint8 -> one grid video; shorter ones hold their last frame."""
    t = max(v.shape[0] for v in videos)
    h = max(v.shape[1] for v in videos)
    w = max(v.shape[2] for v in videos)
    rows = -(-len(videos) // cols)
    out = np.zeros((t, rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
    for i, v in enumerate(videos):
        r, c = divmod(i, cols)
        v = np.concatenate([v, np.repeat(v[-1:], t - v.shape[0], 0)]) if v.shape[0] < t else v
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[:, y : y + v.shape[1], x : x + v.shape[2]] = v
    return out


def write_video(path: str | os.PathLike, video: np.ndarray, fps: float = 8) -> str:
    """Write uint8 or [-1, 1] float (T, H, W, 3) to .mp4, .gif or .png (one frame). Returns the path."""
    path = os.fspath(path)
    video = to_uint8(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a (T, H, W, 3) video, got shape {video.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".mp4":
        # H.264 in yuv420p needs even sizes: replicate the last row/column rather than resample.
        h, w = video.shape[1:3]
        video = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        _write_mp4(path, video, fps)
    elif ext == ".gif":
        iio.imwrite(path, video, plugin="pillow", duration=1000 / fps, loop=0)
    elif ext == ".png":
        if video.shape[0] != 1:
            raise ValueError(f"a .png holds one frame; this video has {video.shape[0]}")
        iio.imwrite(path, video[0], plugin="pillow")
    else:
        raise ValueError(f"unsupported video extension {ext!r}; use .mp4, .gif or .png")
    return path


def _write_mp4(target, video: np.ndarray, fps: float) -> None:
    """uint8 (T, H, W, 3), even H and W -> H.264 (yuv420p) MP4 at `target` (a path or a binary
    file object)."""
    with av.open(target, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(MP4_CRF)}
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video or image file to uint8 (T, H, W, 3)."""
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() in IMAGE_EXTS:
        arr = iio.imread(path, index=None, plugin="pillow", mode="RGB")
    else:
        arr = _read_frames(path)
    if arr.ndim == 3:
        arr = arr[None]
    return arr[..., :3]


def video_fps(path: str | os.PathLike) -> float:
    """Frames per second of a video file's first stream (0.0 for images or when unknown)."""
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() in IMAGE_EXTS:
        return 0.0
    with av.open(path) as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else 0.0


def _read_frames(source) -> np.ndarray:
    """All frames of the first video stream of `source` (a path or a binary file object)."""
    with av.open(source) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("the video has no frames")
    return np.stack(frames)


def encode_mp4(video: np.ndarray, fps: float) -> bytes:
    """uint8 (T, H, W, 3) -> the bytes of an H.264 MP4, in this process (no encoder subprocess).
    Odd sides are padded by replicating the last row/column (crop them again after decoding)."""
    h, w = video.shape[1:3]
    video = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    buf = io.BytesIO()
    _write_mp4(buf, video, fps)
    return buf.getvalue()


def decode_mp4(data: bytes) -> np.ndarray:
    """The bytes of a video file -> uint8 (T, H, W, 3), in this process."""
    return _read_frames(io.BytesIO(data))

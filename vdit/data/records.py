"""Prepared video records: the on-disk format written by `vdit prepare` and the source that reads it.

Shards are ArrayRecord files (`shard-00000.array_record`, ...) written with `group_size:1`, so every
record can be read by index (`grain.sources.ArrayRecordDataSource`). One record is one sample: the
bytes of a numpy `.npz` archive written by `np.savez_compressed` (zlib-deflated members, read back
with `np.load(..., allow_pickle=False)`: no pickled objects) holding:

| member      | dtype, shape        | what                                                            |
|-------------|---------------------|-----------------------------------------------------------------|
| `format`    | str, ()             | `FORMAT` ("vdit-video-npz-1")                                   |
| `encoding`  | str, ()             | how the frames are stored: "raw" or "mp4" (`ENCODINGS`)         |
| `video`     | uint8, (T, H, W, 3) | "raw": RGB frames as decoded (after the optional downsizing)    |
| `video_mp4` | uint8, (N,)         | "mp4": the bytes of an H.264 MP4 of the frames                  |
| `shape`     | int64, (3,)         | "mp4": (T, H, W) of the frames (the MP4 pads odd sides to even) |
| `caption`   | str, ()             | the caption ("" when the file had none)                         |
| `fps`       | float64, ()         | frames per second of the source, 0 when unknown (images)        |
| `source`    | str, ()             | path of the source file relative to the prepared folder         |
| `text_embedding` | float16, (Nc, E) | optional: the caption's embedding (vdit/data/text_embeddings.py) |
| `text_encoder`   | str, ()          | optional, with it: the encoder's name                            |

Written by `vdit prepare` since clips (optional when reading; `decode_record` returns them if present):

| member           | dtype, shape   | what                                                          |
|------------------|----------------|---------------------------------------------------------------|
| `frame_range`    | int64, (2,)    | [start, end) frames of the clip in the decoded source         |
| `time_range`     | float64, (2,)  | [start, end) seconds in the source (0, 0 for images)          |
| `scores`         | str, ()        | JSON of the clip's filter scores (vdit/data/filters.py)       |
| `caption_origin` | str, ()        | "jsonl", "sidecar", "model" or "none"                         |
| `text_embedding`, `text_encoder` | | the caption's embedding (vdit/data/text_embeddings.py)        |

"raw" (the default) is lossless: training reads exactly what `prepare` decoded and never runs a
video decoder, at the cost of space (zlib only). "mp4" re-encodes multi-frame samples with H.264
(lossy, `video_io.MP4_CRF`; typically tens of times smaller) and decodes them in process (PyAV)
when read; one-frame samples (images) are always stored "raw". `RecordsSource` turns records back
into the element dict of the training pipeline (`vdit/data/sources.py`); a record that cannot be
read or decoded becomes an element with a "decode_error" message, which the pipeline counts as a
rejected sample instead of stopping.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os
from typing import Any

import numpy as np

from vdit.data import text_embeddings, video_io

FORMAT = "vdit-video-npz-1"
ENCODINGS = ("raw", "mp4")
MP4_DEFAULT_FPS = 8.0  # frame rate written into MP4s of sources without one (playback only)
SHARD_SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access without decoding neighbours


@dataclasses.dataclass(frozen=True)
class RecordsConfig:
    """The data.records section: where prepared records are (empty for configs written before it)."""

    path: str = ""  # a folder of shards written by `vdit prepare`, or a glob of shards


def shard_name(i: int, prefix: str = "shard") -> str:
    return f"{prefix}-{i:05d}{SHARD_SUFFIX}"


class ShardWriter:
    """Writes records in order into `out_dir/PREFIX-00000.array_record`, ... (`shard_size` records
    each); `shards` lists {"file", "records"} of what was written."""

    def __init__(self, out_dir: str, shard_size: int, prefix: str = "shard"):
        self.out_dir, self.shard_size, self.prefix = out_dir, shard_size, prefix
        self.shards: list[dict[str, Any]] = []
        self._writer = None

    def write(self, record: bytes) -> tuple[int, int]:
        """Appends one record; returns (shard number, index in the shard)."""
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None:
            name = shard_name(len(self.shards), self.prefix)
            self._writer = ArrayRecordWriter(os.path.join(self.out_dir, name), WRITER_OPTIONS)
            self.shards.append({"file": name, "records": 0})
        self._writer.write(record)
        shard = self.shards[-1]
        shard["records"] += 1
        where = (len(self.shards) - 1, shard["records"] - 1)
        if shard["records"] == self.shard_size:
            self.close()
        return where

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _encode_mp4(video: np.ndarray, fps: float) -> np.ndarray:
    return np.frombuffer(video_io.encode_mp4(video, fps if fps > 0 else MP4_DEFAULT_FPS), np.uint8)


def _decode_mp4(data: np.ndarray, shape: np.ndarray) -> np.ndarray:
    t, h, w = (int(v) for v in shape)
    video = video_io.decode_mp4(data.tobytes())
    if video.ndim != 4 or video.shape[0] != t or video.shape[1] < h or video.shape[2] < w:
        raise ValueError(f"the MP4 decodes to {video.shape}, the record says {(t, h, w)}")
    return np.ascontiguousarray(video[:, :h, :w, :3])


OPTIONAL_MEMBERS = ("frame_range", "time_range", "scores", "caption_origin")


def encode_record(
    video: np.ndarray,
    caption: str,
    fps: float,
    source: str,
    encoding: str = "raw",
    extra: dict[str, np.ndarray] | None = None,
    *,
    text_embedding: np.ndarray | None = None,
    text_encoder: str = "",
) -> bytes:
    """One sample -> record bytes (see the module docstring); `extra` adds members (the optional
    ones of the module docstring); `text_embedding` (Nc, E), when given, is stored as float16
    with `text_encoder`'s name."""
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected uint8 (T, H, W, 3) frames, got {video.dtype} {video.shape}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r}: choose from {ENCODINGS}")
    if encoding == "mp4" and video.shape[0] > 1:
        frames = {
            "video_mp4": _encode_mp4(video, fps),
            "shape": np.array(video.shape[:3], np.int64),
        }
    else:
        encoding, frames = "raw", {"video": video}
    if text_embedding is not None:
        frames[text_embeddings.MEMBER] = text_embeddings.check(text_embedding)
        frames[text_embeddings.ENCODER_KEY] = np.str_(text_encoder)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        format=np.str_(FORMAT),
        encoding=np.str_(encoding),
        **frames,
        caption=np.str_(caption),
        fps=np.float64(fps),
        source=np.str_(source),
        **(extra or {}),
    )
    return buf.getvalue()


def decode_record(data: bytes) -> dict[str, Any]:
    """Record bytes -> {"video", "caption", "fps", "source"}; ValueError on anything malformed."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            members = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, zlib.error, EOFError, ValueError, ...
        raise ValueError(f"not a readable record ({type(e).__name__}: {e})") from None
    encoding = str(members.get("encoding", ""))
    frames = {"raw": {"video"}, "mp4": {"video_mp4", "shape"}}.get(encoding, set())
    missing = {"format", "encoding", *frames, "caption", "fps", "source"} - set(members)
    if missing:
        raise ValueError(f"record lacks {sorted(missing)}")
    if str(members["format"]) != FORMAT:
        raise ValueError(f"record format {str(members['format'])!r}, expected {FORMAT!r}")
    if encoding not in ENCODINGS:
        raise ValueError(f"record encoding {encoding!r}, expected one of {ENCODINGS}")
    if encoding == "mp4":
        try:
            video = _decode_mp4(members["video_mp4"], members["shape"])
        except Exception as e:  # ffmpeg's errors: OSError, RuntimeError, ...
            raise ValueError(
                f"the record's MP4 does not decode ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})"
            ) from None
    else:
        video = members["video"]
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"record video is {video.dtype} {video.shape}, expected uint8 (T, H, W, 3)"
        )
    out = {
        "video": video,
        "caption": str(members["caption"]),
        "fps": float(members["fps"]),
        "source": str(members["source"]),
    }
    for key in OPTIONAL_MEMBERS:
        if key in members:
            value = members[key]
            out[key] = value.tolist() if value.ndim else str(value)
    if text_embeddings.MEMBER in members:
        out[text_embeddings.MEMBER] = members[text_embeddings.MEMBER]
    return out


def find_shards(path: str) -> list[str]:
    """A directory (its `*.array_record` files) or a glob pattern -> sorted shard paths."""
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(glob.escape(path), "*" + SHARD_SUFFIX)))
    return sorted(p for p in glob.glob(path) if os.path.isfile(p))


class ShardSource:
    """Random access to the records of ArrayRecord shards (a grain MapDataset source: __len__,
    __getitem__). Subclasses turn record bytes into an element (`element`); a record that fails to
    read or decode becomes `failed(index, message)` instead of raising."""

    kind = "record"  # the word error messages use for one record

    def __init__(self, paths: list[str]):
        import grain

        if not paths:
            raise ValueError("no shards given")
        self.paths = list(paths)
        self._records = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.kind} {index} out of range [0, {len(self)})")
        try:
            return self.element(self._records[index], index)
        except Exception as e:  # a corrupt chunk in the shard, or a malformed record
            return self.failed(index, f"{self.kind} {index}: {type(e).__name__}: {e}")

    def element(self, data: bytes, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def failed(self, index: int, message: str) -> dict[str, Any]:
        return {"index": index, "decode_error": message}


class RecordsSource(ShardSource):
    """Prepared video shards. Elements are {"video" uint8 (T, H, W, 3), "caption", "source",
    "index"} plus "fps" when the source's frame rate is known; a record that fails to read or decode
    gives {"video": None, "caption": "", "index", "decode_error": message}."""

    def element(self, data: bytes, index: int) -> dict[str, Any]:
        record = decode_record(data)
        element = {
            "video": record["video"],
            "caption": record["caption"],
            "source": record["source"],
            "index": index,
        }
        if record["fps"] > 0:
            element["fps"] = record["fps"]
        if text_embeddings.MEMBER in record:
            element[text_embeddings.MEMBER] = record[text_embeddings.MEMBER]
        return element

    def failed(self, index: int, message: str) -> dict[str, Any]:
        return {"video": None, "caption": "", **super().failed(index, message)}

    def __repr__(self) -> str:
        return f"RecordsSource({len(self.paths)} shards, {len(self)} records)"

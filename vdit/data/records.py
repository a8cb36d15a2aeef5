"""Prepared video records: the on-disk format written by `vdit prepare` and the source that reads it.

Shards are ArrayRecord files (`shard-00000.array_record`, ...) written with `group_size:1`, so every
record can be read by index (`grain.sources.ArrayRecordDataSource`). One record is one sample: the
bytes of a numpy `.npz` archive written by `np.savez_compressed` (zlib-deflated members, read back
with `np.load(..., allow_pickle=False)`: no pickled objects) holding:

| member    | dtype, shape             | what                                                            |
|-----------|--------------------------|-----------------------------------------------------------------|
| `format`  | str, ()                  | `FORMAT` ("vdit-video-npz-1")                                   |
| `video`   | uint8, (T, H, W, 3)      | RGB frames, exactly as decoded (after the optional downsizing)  |
| `caption` | str, ()                  | the caption ("" when the file had none)                         |
| `fps`     | float64, ()              | frames per second of the source, 0 when unknown (images)        |
| `source`  | str, ()                  | path of the source file relative to the prepared folder         |

Frames are stored as decoded pixels (lossless), so training reads exactly what `prepare` decoded and
never runs a video decoder. `RecordsSource` turns records back into the element dict of the training
pipeline (`vdit/data/pipeline.py`); a record that cannot be read or decoded becomes an element with a
"decode_error" message, which the pipeline counts as a rejected sample instead of stopping.
"""

from __future__ import annotations

import glob
import io
import os
from typing import Any

import numpy as np

FORMAT = "vdit-video-npz-1"
SHARD_SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access without decoding neighbours


def shard_name(i: int) -> str:
    return f"shard-{i:05d}{SHARD_SUFFIX}"


def encode_record(video: np.ndarray, caption: str, fps: float, source: str) -> bytes:
    """One sample -> record bytes (see the module docstring)."""
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected uint8 (T, H, W, 3) frames, got {video.dtype} {video.shape}")
    buf = io.BytesIO()
    np.savez_compressed(buf, format=np.str_(FORMAT), video=video, caption=np.str_(caption),
                        fps=np.float64(fps), source=np.str_(source))
    return buf.getvalue()


def decode_record(data: bytes) -> dict[str, Any]:
    """Record bytes -> {"video", "caption", "fps", "source"}; ValueError on anything malformed."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            members = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, zlib.error, EOFError, ValueError, ...
        raise ValueError(f"not a readable record ({type(e).__name__}: {e})") from None
    missing = {"format", "video", "caption", "fps", "source"} - set(members)
    if missing:
        raise ValueError(f"record lacks {sorted(missing)}")
    if str(members["format"]) != FORMAT:
        raise ValueError(f"record format {str(members['format'])!r}, expected {FORMAT!r}")
    video = members["video"]
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"record video is {video.dtype} {video.shape}, expected uint8 (T, H, W, 3)")
    return {"video": video, "caption": str(members["caption"]), "fps": float(members["fps"]),
            "source": str(members["source"])}


def find_shards(path: str) -> list[str]:
    """A directory (its `*.array_record` files) or a glob pattern -> sorted shard paths."""
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(glob.escape(path), "*" + SHARD_SUFFIX)))
    return sorted(p for p in glob.glob(path) if os.path.isfile(p))


class RecordsSource:
    """Random-access source over prepared shards (a grain MapDataset source: __len__, __getitem__).

    Elements are {"video" uint8 (T, H, W, 3), "caption", "source", "index"} plus "fps" when the
    source's frame rate is known; a record that fails to read or decode gives
    {"video": None, "caption": "", "index", "decode_error": message}.
    """

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
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        try:
            record = decode_record(self._records[index])
        except Exception as e:  # a corrupt chunk in the shard, or a malformed record
            return {"video": None, "caption": "", "index": index,
                    "decode_error": f"record {index}: {type(e).__name__}: {e}"}
        element = {"video": record["video"], "caption": record["caption"],
                   "source": record["source"], "index": index}
        if record["fps"] > 0:
            element["fps"] = record["fps"]
        return element

    def __repr__(self) -> str:
        return f"RecordsSource({len(self.paths)} shards, {len(self)} records)"

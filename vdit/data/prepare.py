"""`vdit prepare`: a folder of videos and images -> ArrayRecord shards the training pipeline reads.

    vdit prepare --input=DIR --out=DIR [--captions=FILE.jsonl] [--shard_size=N] [--max_frames=N]
                 [--max_side=N] [--encoding=raw|mp4] [--workers=N]

What it does, in order:

- Walks `--input` (sub-folders too; names starting with "." are ignored) and sorts the files by their
  path relative to it, so the same folder always gives the same shards.
- Decodes videos (`VIDEO_EXTS`: MP4, WebM, MKV, MOV, AVI, ... with ffmpeg through imageio) and images
  and GIFs (`IMAGE_EXTS`, with Pillow through imageio) to uint8 RGB frames. An image is a one-frame
  sample with fps 0.
- Caption of a file: its line in `--captions` (JSON Lines, `{"file": path relative to --input,
  "caption": text}`), else a sidecar `NAME.txt` next to `NAME.ext`, else "" (counted and listed as
  uncaptioned). A sidecar `.txt` is not itself a sample.
- `--max_frames` keeps the first N frames (the frame rate is unchanged); `--max_side` downsizes frames
  whose longer side is over N to that side, aspect ratio kept (area filter). 0 leaves either alone.
- `--encoding` stores the frames "raw" (lossless, the default) or re-encoded as "mp4" (H.264, much
  smaller, decoded by ffmpeg when training reads them); see `vdit/data/records.py`.
- `--workers=N` decodes (and encodes) N files at a time in worker processes; the shards are the
  same as with 0 (decoding in the calling process), in the same order.
- Writes the samples in order to `--out/shard-00000.array_record`, ... (`--shard_size` records each;
  format in `vdit/data/records.py`), then `--out/manifest.json` last (its presence means the run
  completed): written count, frames and bytes, shards, captions by origin, uncaptioned files, and every skipped file
  with its reason (`SKIP_REASONS`) and the decoder's message.

A file that cannot be used is skipped, counted and listed, never fatal. The output folder must not
already hold shards or a manifest (nothing is overwritten).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from vdit.data import records

VIDEO_EXTS = frozenset(
    {
        ".mp4",
        ".m4v",
        ".webm",
        ".mkv",
        ".mov",
        ".avi",
        ".mpg",
        ".mpeg",
        ".ogv",
        ".flv",
        ".wmv",
        ".3gp",
        ".ts",
    }
)
IMAGE_EXTS = frozenset({".gif", ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
SIDECAR_EXT = ".txt"
MANIFEST = "manifest.json"

SKIP_REASONS: dict[str, str] = {
    "empty_file": "the file has zero bytes",
    "not_media": "the extension is neither a video nor an image format",
    "decode_error": "the decoder failed (corrupt, truncated, or not the format its name says)",
    "no_frames": "the decoder returned no frames",
    "bad_frames": "frames are not 8-bit RGB images of at least 1x1 pixel",
    "encode_error": "re-encoding the frames (--encoding=mp4) failed",
}


class Skip(Exception):
    """A file that is not written; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    shard_size: int = 1000  # records per shard
    max_frames: int = 0  # keep the first N frames (0: all)
    max_side: int = 0  # downsize so the longer side is at most N pixels (0: native size)
    encoding: str = "raw"  # frames in a record: "raw" (lossless) or "mp4" (H.264, see records.py)
    workers: int = 0  # decoding processes (0: decode in the calling process); output is the same

    def __post_init__(self):
        if self.encoding not in records.ENCODINGS:
            raise ValueError(f"encoding={self.encoding!r}: choose from {records.ENCODINGS}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size={self.shard_size} must be >= 1")
        if self.max_frames < 0:
            raise ValueError(f"max_frames={self.max_frames} must be >= 0 (0 = all frames)")
        if self.max_side < 0:
            raise ValueError(f"max_side={self.max_side} must be >= 0 (0 = native size)")
        if self.workers < 0:
            raise ValueError(f"workers={self.workers} must be >= 0 (0 = no worker processes)")


def fit_side(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) scaled so the longer side is at most `max_side`, aspect kept, >= 1 pixel."""
    if max_side <= 0 or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


_LOG_NOISE = ("ffmpeg version", "Input #", "Output #", "Stream #", "Duration:", "Metadata:", "===")


def _short(e: BaseException, limit: int = 300) -> str:
    """One line from a decoder error. ffmpeg's include its whole log: keep the first line and the
    last three unindented log lines (where ffmpeg says what went wrong), without pointers."""
    lines = [
        ln.strip()
        for ln in str(e).splitlines()
        if ln.strip() and not ln[:1].isspace() and not ln.strip().startswith(_LOG_NOISE)
    ]
    lines = [re.sub(r" @ 0x[0-9a-f]+", "", ln) for ln in lines]
    if len(lines) > 4:
        lines = [lines[0], *lines[-3:]]
    text = f"{type(e).__name__}: {' | '.join(lines)}" if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _frames(path: str, ext: str) -> tuple[Iterator[np.ndarray], float]:
    """A frame iterator and the frame rate (0 if unknown) of a media file."""
    import imageio.v3 as iio

    if ext in VIDEO_EXTS:
        meta = iio.immeta(path, plugin="FFMPEG")
        return iio.imiter(path, plugin="FFMPEG"), float(meta.get("fps") or 0.0)
    meta = iio.immeta(path, plugin="pillow")
    # Pillow gives an animation's per-frame duration in milliseconds (GIF, WebP); still images none.
    duration = meta.get("duration") or 0
    fps = 1000.0 / duration if ext in (".gif", ".webp") and duration else 0.0
    return iio.imiter(path, plugin="pillow", mode="RGB"), fps


def decode(
    path: str, options: PrepareOptions = PrepareOptions()
) -> tuple[np.ndarray, float, tuple]:
    """Decode, cap and downsize one file: (uint8 (T, H, W, 3) frames, fps, (frames read, source
    height, source width)).

    Raises Skip with the reason. Frames are read one at a time, so a long video capped by
    `max_frames` is not decoded to its end.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in VIDEO_EXTS and ext not in IMAGE_EXTS:
        raise Skip("not_media", f"extension {ext or '(none)'!r}")
    if os.path.getsize(path) == 0:
        raise Skip("empty_file", "0 bytes")
    kept, source_hw, total, frames = [], None, 0, None
    try:
        frames, fps = _frames(path, ext)
        for frame in frames:
            frame = np.asarray(frame)
            if (
                frame.ndim != 3
                or frame.shape[-1] != 3
                or frame.dtype != np.uint8
                or 0 in frame.shape
            ):
                raise Skip("bad_frames", f"frame {total} is {frame.dtype} {frame.shape}")
            if source_hw is None:
                source_hw = frame.shape[:2]
            elif frame.shape[:2] != source_hw:
                raise Skip("bad_frames", f"frame {total} is {frame.shape[:2]}, frame 0 {source_hw}")
            total += 1
            h, w = fit_side(*source_hw, options.max_side)
            if (h, w) != source_hw:
                frame = np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BOX))
            kept.append(frame)
            if options.max_frames and total >= options.max_frames:
                break
    except Skip:
        raise
    except Exception as e:  # imageio/ffmpeg/Pillow raise OSError, ValueError, RuntimeError, ...
        raise Skip("decode_error", _short(e)) from None
    finally:
        if hasattr(frames, "close"):
            with contextlib.suppress(Exception):
                frames.close()  # ends the reader (ffmpeg's process) of a capped or failed file
    if not kept:
        raise Skip("no_frames", "0 frames decoded")
    return np.stack(kept), fps, (total, *source_hw)


def read_captions(path: str) -> dict[str, str]:
    """JSON Lines {"file": relative path, "caption": text} -> {normalised relative path: caption}.

    A malformed line is an error naming the file and line (captions are the user's input, unlike
    media files, and silently losing them would train on empty captions)."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                file, caption = entry["file"], entry["caption"]
                if not isinstance(file, str) or not isinstance(caption, str):
                    raise TypeError("'file' and 'caption' must be strings")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f'{path}:{n}: expected {{"file": ..., "caption": ...}}, {type(e).__name__}: {e}'
                ) from None
            key = _norm(file)
            if key in out and out[key] != caption:
                raise ValueError(f"{path}:{n}: a second, different caption for {file!r}")
            out[key] = caption
    return out


def _norm(rel: str) -> str:
    return os.path.normpath(rel).replace(os.sep, "/")


def list_files(input_dir: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Relative paths ("/"-separated) of the files under input_dir, sorted; hidden names and the
    `exclude` paths (files or folders) left out."""
    excluded = {os.path.realpath(p) for p in exclude}
    out = []
    for root, dirs, files in os.walk(input_dir):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in excluded
        )
        for name in files:
            full = os.path.join(root, name)
            if name.startswith(".") or os.path.realpath(full) in excluded:
                continue
            out.append(_norm(os.path.relpath(full, input_dir)))
    return sorted(out)


def _media_stems(files: list[str]) -> set[str]:
    """Paths without extension of the media files: `STEM.txt` is their sidecar caption."""
    return {
        stem for stem, ext in map(os.path.splitext, files) if ext.lower() in VIDEO_EXTS | IMAGE_EXTS
    }


def _sample(job: tuple[str, str, str, str], options: PrepareOptions) -> dict[str, Any]:
    """Decode and encode one file (in a worker process when options.workers > 0): the record and
    its sizes, or the reason it is skipped."""
    path, rel, caption, _ = job
    try:
        video, fps, source_shape = decode(path, options)
    except Skip as e:
        return {"reason": e.reason, "message": str(e)}
    try:
        record = records.encode_record(video, caption, fps, rel, options.encoding)
    except Exception as e:  # ffmpeg failing to write the MP4
        return {"reason": "encode_error", "message": _short(e)}
    return {"record": record, "fps": fps, "source_shape": source_shape, "shape": video.shape[:3]}


def _in_order(jobs: list, options: PrepareOptions) -> Iterator[dict[str, Any]]:
    """_sample over jobs, results in job order; with workers, at most 2 x workers files in flight
    (decoded videos are large, so the pool never runs far ahead of the writer)."""
    if options.workers == 0:
        yield from (_sample(job, options) for job in jobs)
        return
    # "spawn": the caller may hold threads (JAX does), which fork would copy in an unknown state.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(options.workers, mp_context=context) as pool:
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(pool.submit(_sample, job, options))
            if len(pending) >= 2 * options.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def prepare(
    input_dir: str,
    out_dir: str,
    captions: str | None = None,
    options: PrepareOptions = PrepareOptions(),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Decode every media file under input_dir into shards in out_dir; returns the manifest
    (also written to out_dir/manifest.json). `progress` gets one line per file."""
    if not os.path.isdir(input_dir):
        raise ValueError(f"input folder {input_dir!r} does not exist")
    os.makedirs(out_dir, exist_ok=True)
    existing = [f for f in os.listdir(out_dir) if f.endswith(records.SHARD_SUFFIX) or f == MANIFEST]
    if existing:
        raise ValueError(
            f"output folder {out_dir!r} already holds {sorted(existing)[:3]}; "
            "choose an empty folder"
        )
    by_file = read_captions(captions) if captions else {}
    files = list_files(input_dir, exclude=(out_dir, *((captions,) if captions else ())))
    all_files = set(files)
    media_stems = _media_stems(files)

    jobs = []  # (path, relative path, caption, caption origin) of each file but sidecars, in order
    for rel in files:
        stem, ext = os.path.splitext(rel)
        if ext.lower() == SIDECAR_EXT and stem in media_stems:
            continue  # a caption, read with its media file
        if rel in by_file:
            caption, origin = by_file[rel], "jsonl"
        elif (sidecar := stem + SIDECAR_EXT) in all_files:
            with open(os.path.join(input_dir, sidecar), encoding="utf-8") as f:
                caption, origin = f.read().strip(), "sidecar"
        else:
            caption, origin = "", "none"
        jobs.append((os.path.join(input_dir, rel), rel, caption, origin))

    writer = records.ShardWriter(out_dir, options.shard_size)
    skipped: list[dict[str, str]] = []
    uncaptioned: list[str] = []
    caption_origin: Counter[str] = Counter()
    frames_written = bytes_written = 0
    try:
        for (_, rel, _, origin), done in zip(jobs, _in_order(jobs, options), strict=True):
            if "reason" in done:
                skipped.append({"file": rel, "reason": done["reason"], "message": done["message"]})
                if progress:
                    progress(f"skip {rel}: {done['reason']}: {done['message']}")
                continue
            caption_origin[origin] += 1
            if origin == "none":
                uncaptioned.append(rel)
            shard, index = writer.write(done["record"])
            frames_written += done["shape"][0]
            bytes_written += len(done["record"])
            if progress:
                progress(
                    f"ok   {rel}: {done['source_shape']} -> {done['shape']}, "
                    f"fps {done['fps']:g}, shard {shard} record {index}"
                )
    finally:
        writer.close()

    written = sum(s["records"] for s in writer.shards)
    manifest = {
        "format": records.FORMAT,
        "written": written,
        "frames": frames_written,
        "bytes": bytes_written,
        "shards": writer.shards,
        "skipped_count": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped": skipped,
        "captions": {k: caption_origin.get(k, 0) for k in ("jsonl", "sidecar", "none")},
        "uncaptioned": uncaptioned,
        "captions_without_file": sorted(set(by_file) - all_files),
        "options": dataclasses.asdict(options),
    }
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def summary(manifest: dict[str, Any]) -> str:
    """A table of what was written and what was skipped, by reason, with the skipped files."""
    rows = [
        (
            "written",
            manifest["written"],
            f"{len(manifest['shards'])} shards, "
            f"{manifest['frames']} frames, {manifest['bytes'] / 2**20:.1f} MiB "
            f"({manifest['options']['encoding']})",
        )
    ]
    for origin, n in manifest["captions"].items():
        rows.append((f"caption from {origin}", n, ""))
    for reason, n in manifest["skipped_by_reason"].items():
        rows.append((f"skipped: {reason}", n, SKIP_REASONS[reason]))
    if manifest["captions_without_file"]:
        rows.append(("captions for missing files", len(manifest["captions_without_file"]), ""))
    width = max(len(r[0]) for r in rows)
    lines = [
        f"{'':{width}}  {'count':>6}",
        *(f"{a:{width}}  {b:>6}  {c}".rstrip() for a, b, c in rows),
    ]
    if manifest["skipped"]:
        lines.append("")
        lines.append("skipped files:")
        lines += [f"  {s['file']}: {s['reason']}: {s['message']}" for s in manifest["skipped"]]
    return "\n".join(lines)

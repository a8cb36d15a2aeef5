"""`vdit prepare`: videos and images -> clips -> ArrayRecord shards the training pipeline reads.

    vdit prepare --input=DIR|GLOB|LIST.txt --out=DIR [--config=configs/prepare.py] [--captions=FILE.jsonl]
                 [--shard_size=N] [--max_frames=N] [--max_side=N] [--encoding=raw|mp4]
                 [--workers=N] [--runner=local|beam] [--beam_options="..."]

What it does, in order:

- Lists the inputs: a folder (walked recursively; names starting with "." are ignored), a glob, or
  a text file listing one path a line, on this machine or as a URL of a filesystem Apache Beam
  reads (gs://, s3://, hdfs://...: listed and read through Beam's FileSystems), and sorts them by
  their path relative to the folder (the glob's folder, the list's folder), so the same inputs
  always give the same shards.
- For each file, one function (`process`, the same under every runner) does all the per-file work:
  decode (`VIDEO_EXTS` in process with PyAV (FFmpeg's libraries); images and GIFs with Pillow: a one-frame sample
  with fps 0); split into shots and clips (`shots.enabled`, PySceneDetect, vdit/data/shots.py);
  score every clip and drop the ones a filter refuses (vdit/data/filters.py); write a caption with
  the captioner model (`captioner.path`, vdit/data/captioner.py); embed the caption with the text
  encoder (`text_encoder.path`, vdit/text/encoder.py); encode the record.
- Caption given with a file: its line in `--captions` (JSON Lines, `{"file": path relative to the
  input folder, "caption": text}`), else a sidecar `NAME.txt` next to `NAME.ext`, else "". The
  record's `caption_origin` says which ("jsonl", "sidecar", "model", "none").
- `--max_frames` keeps the first N frames (the frame rate is unchanged); `--max_side` downsizes frames
  whose longer side is over N to that side, aspect ratio kept (area filter). 0 leaves either alone.
- `--encoding` stores the frames "raw" (lossless, the default) or re-encoded as "mp4" (H.264, much
  smaller, decoded by ffmpeg when training reads them); see `vdit/data/records.py`.
- Runners (`runner`): "local" runs `process` in this process (`workers=0`) or in N worker
  processes; "beam" runs it as an Apache Beam pipeline (vdit/data/beam_prepare.py): DirectRunner in
  process (`workers=0`), with N `multi_processing` workers, or any runner named in `beam_options`
  (Dataflow, Flink, Spark). Every runner and worker count writes the same records in the same order.
- Writes the clips in order (file order, then time) to `--out/shard-00000.array_record`, ...
  (`--shard_size` records each; format in `vdit/data/records.py`), dropping near-duplicates of
  clips already written; `report.md` and a PNG contact sheet per drop reason under `report/`; then
  `--out/manifest.json` last (its presence means the run completed): written count, frames and
  bytes, shards, clips dropped by filter name, captions by origin, captioner failures, the text
  embedding entry, and every skipped file with its reason (`SKIP_REASONS`) and the decoder's message.

A file that cannot be used is skipped, counted and listed, never fatal; so is a clip a captioner
fails on (`captioner.on_failure`). The output folder must not already hold shards or a manifest.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import glob
import io
import json
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from vdit.data import filters, records
from vdit.data.filters import FilterOptions

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
    "vanished": "the file was listed but was gone (or unreadable) when its turn came",
    "split_error": "shot detection failed on the decoded frames",
}
RUNNERS = ("local", "beam")
ON_FAILURE = ("keep", "drop")


class Skip(Exception):
    """A file that is not written; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ShotOptions:
    """The shots section of configs/prepare.py (vdit/data/shots.py)."""

    enabled: bool = False  # cut videos at shot boundaries (PySceneDetect's ContentDetector)
    threshold: float = 27.0  # ContentDetector's cut threshold (lower: more cuts)
    min_seconds: float = 0.0  # shots (and pieces of long shots) shorter than this are dropped
    max_seconds: float = (
        0.0  # shots longer than this are cut into clips of at most this (0: no cap)
    )

    def __post_init__(self):
        if self.threshold <= 0:
            raise ValueError(f"threshold={self.threshold} must be > 0")
        if self.min_seconds < 0 or self.max_seconds < 0:
            raise ValueError("min_seconds and max_seconds must be >= 0 (0 = off)")
        if self.max_seconds and self.min_seconds > self.max_seconds:
            raise ValueError(f"min_seconds={self.min_seconds} > max_seconds={self.max_seconds}")


@dataclasses.dataclass(frozen=True)
class CaptionerOptions:
    """The captioner section of configs/prepare.py (vdit/data/captioner.py)."""

    path: str = ""  # a local Hugging Face image-to-text model folder ("" = no captioner)
    frames: int = 4  # frames sampled evenly from a clip, tiled into the one image captioned
    batch_size: int = 8  # clips per generate() call
    prompt: str = ""  # text prompt given with the image (models that take one), "" = none
    max_new_tokens: int = 48  # caption length cap, in the model's tokens
    keep_given: bool = True  # keep a caption from the captions file or a sidecar (else re-caption)
    on_failure: str = "keep"  # the model fails on a clip: "keep" its given caption | "drop" it

    def __post_init__(self):
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure={self.on_failure!r}: choose from {ON_FAILURE}")
        if self.frames < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("frames, batch_size and max_new_tokens must be >= 1")


@dataclasses.dataclass(frozen=True)
class TextEncoderOptions:
    """The text_encoder section of configs/prepare.py (vdit/text/encoder.py)."""

    path: str = ""  # a local T5 / UMT5 encoder folder (transformers) ("" = no embeddings)
    max_len: int = 512  # tokens per caption at most (Wan: 512)
    batch_size: int = 16  # captions per encoder call

    def __post_init__(self):
        if self.max_len < 1 or self.batch_size < 1:
            raise ValueError("max_len and batch_size must be >= 1")


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    shard_size: int = 1000  # records per shard
    max_frames: int = 0  # keep the first N frames (0: all)
    max_side: int = 0  # downsize so the longer side is at most N pixels (0: native size)
    encoding: str = "raw"  # frames in a record: "raw" (lossless) or "mp4" (H.264, see records.py)
    workers: int = 0  # worker processes (0: in the calling process); output is the same
    runner: str = "local"  # "local" (process pool) | "beam" (Apache Beam; beam_prepare.py)
    beam_options: str = ""  # Beam pipeline options, e.g. "--runner=DataflowRunner --project=P"
    report_examples: int = 8  # clips per drop reason shown in report/ (0: no report)
    shots: ShotOptions = ShotOptions()
    filters: FilterOptions = FilterOptions()
    captioner: CaptionerOptions = CaptionerOptions()
    text_encoder: TextEncoderOptions = TextEncoderOptions()

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
        if self.runner not in RUNNERS:
            raise ValueError(f"runner={self.runner!r}: choose from {RUNNERS}")
        if self.report_examples < 0:
            raise ValueError(f"report_examples={self.report_examples} must be >= 0")


def options_from_config(config) -> PrepareOptions:
    """configs/prepare.py -> PrepareOptions (each section strictly: an unknown key is an error)."""
    from vdit import configlib

    sections = {
        "shots": ShotOptions,
        "filters": FilterOptions,
        "captioner": CaptionerOptions,
        "text_encoder": TextEncoderOptions,
    }
    parts = {k: configlib.build(cls, config[k], k) for k, cls in sections.items() if k in config}
    top = {k: v for k, v in config.items() if k not in sections}
    import ml_collections

    return configlib.build(PrepareOptions, ml_collections.ConfigDict(top), "config", **parts)


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


def _video_frames(path: str) -> tuple[Iterator[np.ndarray], float]:
    """A video's RGB frames, decoded one at a time in this process (PyAV: no ffmpeg subprocess,
    which would have to start, and print its header in time, in every worker), and its frame rate."""
    import av

    container = av.open(path)
    try:
        stream = container.streams.video[0]
    except IndexError:
        container.close()
        raise ValueError("no video stream") from None
    rate = stream.average_rate or stream.guessed_rate

    def frames():
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        finally:
            container.close()

    return frames(), float(rate or 0.0)


def _frames(path: str, ext: str) -> tuple[Iterator[np.ndarray], float]:
    """A frame iterator and the frame rate (0 if unknown) of a media file."""
    import imageio.v3 as iio

    if ext in VIDEO_EXTS:
        return _video_frames(path)
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
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise Skip("vanished", _short(e)) from None
    if size == 0:
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


LIST_EXTS = (".txt", ".lst")  # --input=FILE with one of these: a list of paths, one a line


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str) -> bool:
    """A URL of a filesystem Apache Beam reads (gs://, s3://, hdfs://, ...), not a local path."""
    return bool(_SCHEME.match(path))


def _filesystems():
    from vdit.data import beam_prepare

    beam_prepare.require()
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def _list_remote(spec: str) -> tuple[str, list[str]]:
    """A Beam filesystem folder URL (all files under it) or glob -> (root, sorted relative paths)."""
    fs = _filesystems()
    pattern = spec if glob.has_magic(spec) else spec.rstrip("/") + "/**"
    prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    root = prefix[: prefix.rfind("/") + 1]
    paths = [m.path for result in fs.match([pattern]) for m in result.metadata_list]
    rels = {p[len(root) :] for p in paths if p.startswith(root)}
    return root, sorted(r for r in rels if r and not any(x.startswith(".") for x in r.split("/")))


def _read_text(path: str) -> str:
    if is_remote(path):
        with _filesystems().open(path) as f:
            return f.read().decode("utf-8")
    with open(path, encoding="utf-8") as f:
        return f.read()


@contextlib.contextmanager
def _local(path: str) -> Iterator[str]:
    """A local path for `path`: itself, or a temporary copy of a Beam filesystem URL's file
    (copied in 1 MiB pieces; removed afterwards). A file that cannot be opened is Skip("vanished")."""
    if not is_remote(path):
        yield path
        return
    import shutil
    import tempfile

    fs = _filesystems()
    fd, tmp = tempfile.mkstemp(suffix=os.path.splitext(path)[1].lower())
    try:
        try:
            with fs.open(path) as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except Exception as e:  # gone, or unreadable
            raise Skip("vanished", _short(e)) from None
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def list_inputs(spec: str, exclude: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """--input -> (root, sorted relative paths): a folder (walked), a glob (relative to its
    folder part), or a list file (paths one a line, relative to the list's folder unless absolute),
    locally, or a folder URL or glob on a filesystem Apache Beam reads (gs://, s3://, hdfs://)."""
    if is_remote(spec):
        return _list_remote(spec)
    if os.path.isdir(spec):
        return spec, list_files(spec, exclude)
    if os.path.isfile(spec) and spec.endswith(LIST_EXTS):
        root = os.path.dirname(os.path.abspath(spec))
        with open(spec, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        return root, sorted({_norm(os.path.relpath(os.path.join(root, ln), root)) for ln in lines})
    if glob.has_magic(spec):
        parts = re.split(r"[*?\[]", spec, maxsplit=1)[0]
        root = parts if parts.endswith(os.sep) else os.path.dirname(parts) or "."
        excluded = {os.path.realpath(p) for p in exclude}
        paths = [
            p
            for p in glob.glob(spec, recursive=True)
            if os.path.isfile(p) and os.path.realpath(p) not in excluded
        ]
        return root, sorted(_norm(os.path.relpath(p, root)) for p in paths)
    raise ValueError(
        f"input {spec!r} is neither a folder, a glob, nor a list file ({'/'.join(LIST_EXTS)})"
    )


@dataclasses.dataclass(frozen=True)
class Job:
    """One input file: its place in the output order, where it is, and its given caption."""

    index: int
    path: str
    rel: str
    caption: str
    origin: str  # "jsonl" | "sidecar" | "none"


def make_jobs(root: str, files: list[str], by_file: dict[str, str]) -> list[Job]:
    media_stems, all_files = _media_stems(files), set(files)
    jobs = []
    for rel in files:
        stem, ext = os.path.splitext(rel)
        if ext.lower() == SIDECAR_EXT and stem in media_stems:
            continue  # a caption, read with its media file
        if rel in by_file:
            caption, origin = by_file[rel], "jsonl"
        elif (sidecar := stem + SIDECAR_EXT) in all_files or (
            not is_remote(root) and os.path.isfile(os.path.join(root, sidecar))
        ):
            caption, origin = _read_text(os.path.join(root, sidecar)).strip(), "sidecar"
        else:
            caption, origin = "", "none"
        jobs.append(Job(len(jobs), os.path.join(root, rel), rel, caption, origin))
    return jobs


# ----------------------------------------------------------------------------------------------
# The per-file work: one implementation, run by every runner
# ----------------------------------------------------------------------------------------------
THUMB_SIDE = 96  # contact-sheet thumbnails: the middle frame, longer side in pixels


def _thumb(clip: np.ndarray) -> bytes:
    image = Image.fromarray(clip[len(clip) // 2])
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def process(job: Job, options: PrepareOptions) -> dict[str, Any]:
    """Everything done to one file, wherever it runs: {"index", "file", "skip" (a file not used:
    {"reason", "message"}) or "clips": [{"clip", "frame_range", "time_range", "scores",
    "dropped" (a filters.REASONS name or None), "caption", "caption_origin", "thumb" (PNG bytes),
    "record" (bytes, kept clips)}], "events": [{"event", "file", "clip", "message"}]}."""
    out: dict[str, Any] = {"index": job.index, "file": job.rel, "clips": [], "events": []}
    try:
        with _local(job.path) as path:
            video, fps, source_shape = decode(path, options)
    except Skip as e:
        return {**out, "skip": {"reason": e.reason, "message": str(e)}}
    out["source_shape"] = source_shape
    ranges = [(0, len(video), False)]
    if options.shots.enabled and len(video) > 1:
        from vdit.data import shots

        try:
            found = shots.detect(video, fps, options.shots.threshold)
        except Exception as e:
            return {**out, "skip": {"reason": "split_error", "message": _short(e)}}
        ranges = shots.clips(found, fps, options.shots.min_seconds, options.shots.max_seconds)
    clips = []
    for k, (a, b, short) in enumerate(ranges):
        clip = video[a:b]
        s = filters.scores(clip, fps, options.filters.motion)
        clips.append(
            {
                "clip": k,
                "frame_range": [a, b],
                "time_range": [a / fps, b / fps] if fps > 0 else [0.0, 0.0],
                "scores": s,
                "dropped": "too_short" if short else filters.reason(s, options.filters),
                "caption": job.caption,
                "caption_origin": job.origin,
                "thumb": _thumb(clip),
            }
        )

    def clip_name(c):
        return f"{job.rel} clip {c['clip']} (frames {c['frame_range'][0]}-{c['frame_range'][1]})"

    if options.captioner.path:
        from vdit.data import captioner

        todo = [
            c
            for c in clips
            if not c["dropped"] and not (options.captioner.keep_given and c["caption"])
        ]
        frames = [video[slice(*c["frame_range"])] for c in todo]
        for c, result in zip(todo, captioner.caption(frames, options.captioner), strict=True):
            if isinstance(result, str):
                c["caption"], c["caption_origin"] = result, "model"
                continue
            out["events"].append(
                {
                    "event": "captioner_error",
                    "file": job.rel,
                    "clip": c["clip"],
                    "message": f"{clip_name(c)}: {_short(result)}",
                }
            )
            if options.captioner.on_failure == "drop":
                c["dropped"] = "caption_failed"
    embeddings: dict[int, np.ndarray] = {}
    if options.text_encoder.path:
        from vdit.text import encoder

        kept = [c for c in clips if not c["dropped"]]
        embedder = encoder.get(options.text_encoder)
        for c, e in zip(kept, embedder.embed([c["caption"] for c in kept]), strict=True):
            embeddings[c["clip"]] = e
    for c in clips:
        if c["dropped"]:
            continue
        extra = {
            "frame_range": np.array(c["frame_range"], np.int64),
            "time_range": np.array(c["time_range"], np.float64),
            "scores": np.str_(json.dumps(c["scores"], sort_keys=True)),
            "caption_origin": np.str_(c["caption_origin"]),
        }
        if c["clip"] in embeddings:
            from vdit.data import text_embeddings

            extra[text_embeddings.MEMBER] = text_embeddings.check(embeddings[c["clip"]])
            extra[text_embeddings.ENCODER_KEY] = np.str_(embedder.name)
        try:
            c["record"] = records.encode_record(
                video[slice(*c["frame_range"])],
                c["caption"],
                fps,
                job.rel,
                options.encoding,
                extra=extra,
            )
        except Exception as e:  # ffmpeg failing to write the MP4
            return {**out, "clips": [], "skip": {"reason": "encode_error", "message": _short(e)}}
        c["shape"] = list(video[slice(*c["frame_range"])].shape[:3])
    out["clips"], out["fps"] = clips, fps
    return out


def _in_order(jobs: list[Job], options: PrepareOptions) -> Iterator[dict[str, Any]]:
    """The local runner: `process` over jobs, results in job order; with workers, at most
    2 x workers files in flight (decoded videos are large, so the pool never runs far ahead of
    the writer)."""
    if options.workers == 0:
        yield from (process(job, options) for job in jobs)
        return
    # "spawn": the caller may hold threads (JAX does), which fork would copy in an unknown state.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(options.workers, mp_context=context) as pool:
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(pool.submit(process, job, options))
            if len(pending) >= 2 * options.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------------------------
# The ordered writer: results (in job order) -> shards, near-duplicates, report, manifest
# ----------------------------------------------------------------------------------------------
def _write(
    results: Iterable[dict[str, Any]],
    out_dir: str,
    options: PrepareOptions,
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    from vdit.data import prepare_report

    writer = records.ShardWriter(out_dir, options.shard_size)
    dedup = filters.Dedup(options.filters.dedup_distance)
    report = prepare_report.Report(options.report_examples)
    skipped: list[dict[str, str]] = []
    dropped: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    uncaptioned: list[str] = []
    caption_origin: Counter[str] = Counter()
    frames_written = bytes_written = clips_seen = files = 0
    try:
        for done in results:
            files += 1
            rel = done["file"]
            events += done["events"]
            for e in done["events"]:
                if progress:
                    progress(f"{e['event']} {e['message']}")
            if "skip" in done:
                skipped.append({"file": rel, **done["skip"]})
                if progress:
                    progress(f"skip {rel}: {done['skip']['reason']}: {done['skip']['message']}")
                continue
            for c in done["clips"]:
                clips_seen += 1
                where = f"{rel} [{c['time_range'][0]:.2f}-{c['time_range'][1]:.2f}s]"
                if not c["dropped"] and (twin := dedup.check(c["scores"]["phash"], where)):
                    c["dropped"], c["duplicate_of"] = "duplicate", twin
                report.add(c, where)
                if c["dropped"]:
                    entry = {
                        "file": rel,
                        "clip": c["clip"],
                        "frame_range": c["frame_range"],
                        "reason": c["dropped"],
                    }
                    if "duplicate_of" in c:
                        entry["duplicate_of"] = c["duplicate_of"]
                    dropped.append(entry)
                    if progress:
                        progress(f"drop {where}: {c['dropped']}")
                    continue
                caption_origin[c["caption_origin"]] += 1
                if not c["caption"] and rel not in uncaptioned[-1:]:
                    uncaptioned.append(rel)
                shard, index = writer.write(c["record"])
                frames_written += c["shape"][0]
                bytes_written += len(c["record"])
                if progress:
                    progress(
                        f"ok   {where}: {tuple(done['source_shape'])} -> {tuple(c['shape'])}, "
                        f"fps {done['fps']:g}, shard {shard} record {index}"
                    )
    finally:
        writer.close()
    written = sum(s["records"] for s in writer.shards)
    by_reason = Counter(d["reason"] for d in dropped)
    manifest = {
        "format": records.FORMAT,
        "written": written,
        "frames": frames_written,
        "bytes": bytes_written,
        "shards": writer.shards,
        "files": files,
        "clips": clips_seen,
        "dropped_by_reason": {r: by_reason.get(r, 0) for r in filters.REASONS},
        "dropped": dropped,
        "skipped_count": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped": skipped,
        "events_by_name": dict(sorted(Counter(e["event"] for e in events).items())),
        "events": events,
        "captions": {k: caption_origin.get(k, 0) for k in ("jsonl", "sidecar", "model", "none")},
        "uncaptioned": uncaptioned,
    }
    if options.report_examples:
        manifest["report"] = report.write(out_dir, manifest, options)
    return manifest


def _require(options: PrepareOptions) -> None:
    """ImportError naming the extra for each enabled stage whose package is missing."""
    if options.shots.enabled:
        from vdit.data import shots

        shots.require()
    if options.filters.motion == "flow":
        try:
            import cv2  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f'filters.motion="flow" needs OpenCV ({e}); install the data extra: '
                'pip install -e ".[data]"'
            ) from None
    if options.runner == "beam":
        from vdit.data import beam_prepare

        beam_prepare.require()
    if options.captioner.path or options.text_encoder.path:
        from vdit.text import hf

        hf.require_transformers()


def prepare(
    input_dir: str,
    out_dir: str,
    captions: str | None = None,
    options: PrepareOptions = PrepareOptions(),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Prepare every media file of `input_dir` (a folder, a glob or a list file) into shards in
    out_dir; returns the manifest (also written to out_dir/manifest.json). `progress` gets one
    line per clip."""
    if not (os.path.exists(input_dir) or glob.has_magic(input_dir) or is_remote(input_dir)):
        raise ValueError(f"input folder {input_dir!r} does not exist")
    os.makedirs(out_dir, exist_ok=True)
    existing = [f for f in os.listdir(out_dir) if f.endswith(records.SHARD_SUFFIX) or f == MANIFEST]
    if existing:
        raise ValueError(
            f"output folder {out_dir!r} already holds {sorted(existing)[:3]}; "
            "choose an empty folder"
        )
    by_file = read_captions(captions) if captions else {}
    root, files = list_inputs(input_dir, exclude=(out_dir, *((captions,) if captions else ())))
    jobs = make_jobs(root, files, by_file)
    _require(options)  # a stage whose extra is missing fails here, before any work
    null_embedding = None
    if options.text_encoder.path:  # load once here: a broken encoder folder fails before any work
        from vdit.text import encoder

        embedder = encoder.get(options.text_encoder)
        null_embedding = embedder.embed([""])[0]
    if options.captioner.path:
        from vdit.data import captioner

        captioner.get(options.captioner)
    if options.runner == "beam":
        from vdit.data import beam_prepare

        results = beam_prepare.run(jobs, options, out_dir)
    else:
        results = _in_order(jobs, options)
    manifest = _write(results, out_dir, options, progress)
    manifest["captions_without_file"] = sorted(set(by_file) - set(files))
    if null_embedding is not None:
        from vdit.data import text_embeddings

        text_embeddings.save(os.path.join(out_dir, text_embeddings.NULL_FILE), null_embedding)
        manifest[text_embeddings.MANIFEST_KEY] = text_embeddings.manifest_entry(
            null_embedding.shape[1], embedder.name
        )
    manifest["options"] = dataclasses.asdict(options)
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def summary(manifest: dict[str, Any]) -> str:
    """A table of what was written, dropped by filter and skipped, by reason, with the skipped
    files."""
    rows = [
        (
            "written",
            manifest["written"],
            f"{len(manifest['shards'])} shards, "
            f"{manifest['frames']} frames, {manifest['bytes'] / 2**20:.1f} MiB "
            f"({manifest['options']['encoding']})",
        )
    ]
    rows.append(("clips", manifest["clips"], f"from {manifest['files']} files"))
    for reason, n in manifest["dropped_by_reason"].items():
        if n:
            rows.append((f"dropped: {reason}", n, filters.REASONS[reason]))
    for origin, n in manifest["captions"].items():
        rows.append((f"caption from {origin}", n, ""))
    for event, n in manifest["events_by_name"].items():
        rows.append((f"event: {event}", n, ""))
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
    if manifest["events"]:
        lines.append("")
        lines.append("events:")
        lines += [f"  {e['event']}: {e['message']}" for e in manifest["events"]]
    return "\n".join(lines)

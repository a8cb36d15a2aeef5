"""Re-captioning for `vdit prepare` (`captioner.path`): a descriptive caption for every clip from a
local Hugging Face image-to-text model (loaded with `transformers`' AutoModelForImageTextToText and
AutoProcessor, e.g. a BLIP captioning model), as DALL-E 3 and Sora re-caption their training data.

`captioner.frames` frames sampled evenly from the clip are tiled into one image (a grid, so an
image captioner sees the clip's course), `captioner.batch_size` clips go through one greedy
`generate()`. A batch that fails is retried clip by clip, so one bad clip costs only itself: its
result is the exception, which `prepare.process` counts as a `captioner_error` event and handles
by `captioner.on_failure` (keep the given caption, or drop the clip). An empty caption is a
failure too.

A real captioner: save one with `transformers` (the model and its processor,
`save_pretrained(DIR)` for both) and set `--config.captioner.path=DIR`; `captioner.prompt` is the
text prompt for models that take one (it is removed from the start of the output).
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from vdit.text import hf


def tile(clip: np.ndarray, frames: int) -> Image.Image:
    """`frames` frames sampled evenly from uint8 (T, H, W, 3), tiled row-major in a near-square
    grid (one frame: that frame)."""
    idx = np.unique(np.linspace(0, len(clip) - 1, min(frames, len(clip))).round().astype(int))
    picked = clip[idx]
    cols = math.ceil(math.sqrt(len(picked)))
    rows = math.ceil(len(picked) / cols)
    t, h, w, c = picked.shape
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, frame in enumerate(picked):
        r, k = divmod(i, cols)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = frame
    return Image.fromarray(grid)


def get(options):
    """(model, processor) of a prepare.CaptionerOptions (loaded once per process)."""
    hf.check_dir(options.path, "captioner.path")
    return hf.load("captioner", os.path.abspath(options.path))


def _generate(images: list[Image.Image], options) -> list[str]:
    import torch

    model, processor = get(options)
    kwargs = {"images": images, "return_tensors": "pt"}
    if options.prompt:
        kwargs["text"] = [options.prompt] * len(images)
    inputs = processor(**kwargs)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=options.max_new_tokens, do_sample=False)
    texts = [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    if options.prompt:
        texts = [
            t[len(options.prompt) :].strip() if t.startswith(options.prompt) else t for t in texts
        ]
    return texts


def _one(images: list[Image.Image], options) -> list[str | Exception]:
    texts = _generate(images, options)
    if len(texts) != len(images):
        raise RuntimeError(f"the captioner returned {len(texts)} captions for {len(images)} clips")
    return [t if t else ValueError("the captioner returned an empty caption") for t in texts]


def caption(clips: list[np.ndarray], options) -> list[str | Exception]:
    """A caption, or the exception that prevented it, for each clip (uint8 (T, H, W, 3))."""
    out: list[str | Exception] = []
    for i in range(0, len(clips), options.batch_size):
        images = [tile(c, options.frames) for c in clips[i : i + options.batch_size]]
        try:
            out += _one(images, options)
        except Exception:  # retried one by one: only the clips that fail alone fail
            for image in images:
                try:
                    out += _one([image], options)
                except Exception as e:
                    out.append(e)
    return out

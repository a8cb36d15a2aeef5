"""The README's pictures of `vdit sample`'s modes: one PNG strip of frames per mode, and the inputs.

    python bench/gallery.py --workdir=runs/default --out=bench/gallery

Writes OUT/inputs/square.png and OUT/inputs/square.mp4 / OUT/inputs/circle.mp4 (procedural clips,
the inputs of the README's commands), then samples every mode from them in one packed batch and
writes OUT/MODE.png: the output's frames left to right (upscaled), given frames marked by a green
bar under them; the edit strip shows the input above its edits at two strengths. The files are
small (flat procedural colours): a few KB each.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from vdit.data import synthetic
from vdit.data.video_io import upscale, write_video
from vdit.diffusion import evaluate, modes

GREEN = np.array([40, 200, 60], np.uint8)


def strip(video: np.ndarray, given: np.ndarray | None, scale: int = 2, pad: int = 2) -> np.ndarray:
    """uint8 (T, H, W, 3) -> one image (H*scale + 4, T*(W*scale + pad), 3), given frames barred."""
    v = upscale(video, scale)
    t, h, w, _ = v.shape
    out = np.full((h + 4, t * (w + pad), 3), 255, np.uint8)
    for i in range(t):
        x = i * (w + pad)
        out[:h, x : x + w] = v[i]
        if given is not None and given[i]:
            out[h + 1 : h + 4, x : x + w] = GREEN
    return out


def main(argv=None) -> None:
    from vdit.train.load import load
    from vdit.train.samples import eval_setup

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a `vdit train` run")
    p.add_argument("--out", default="bench/gallery", help="folder of the pictures")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    loaded = load(a.workdir)
    setup = eval_setup(loaded.config)
    fps = float(loaded.config.sample.fps)
    t, h, w = 8, 32, 32
    rng = np.random.default_rng(a.seed)
    square = synthetic.render(synthetic.SampleSpec("red", "square", "right", t, h, w), rng)
    circle = synthetic.render(synthetic.SampleSpec("red", "circle", "down", t, h, w), rng)
    os.makedirs(os.path.join(a.out, "inputs"), exist_ok=True)
    write_video(os.path.join(a.out, "inputs", "square.png"), square[:1])
    write_video(os.path.join(a.out, "inputs", "square.mp4"), square, fps=fps)
    write_video(os.path.join(a.out, "inputs", "circle.mp4"), circle, fps=fps)

    leave = modes.unit(setup.compression[0], setup.patch[0])
    jobs = {
        "t2v": ("a blue circle moves up", (t, h, w), None),
        "image": ("a yellow square stands still", (1, h, w), None),
        "i2v": (
            "a red square moves right",
            (t, h, w),
            modes.place("i2v", t, h, w, image=square[:1], leave=leave),
        ),
        "extend_forward": (
            "a red square moves right",
            (t, h, w),
            modes.place("extend_forward", t, h, w, video=square[:4], leave=leave),
        ),
        "extend_backward": (
            "a red square moves right",
            (t, h, w),
            modes.place("extend_backward", t, h, w, video=square[4:], leave=leave),
        ),
        "loop": (
            "a red square moves right",
            (t, h, w),
            modes.place("loop", t, h, w, image=square[:1], leave=leave),
        ),
        "connect": (
            "a red square moves right",
            (t, h, w),
            modes.place("connect", t, h, w, video=square[:3], video_end=circle[5:], leave=leave),
        ),
        "edit_0.5": (
            "a green square moves right",
            (t, h, w),
            modes.place("edit", t, h, w, edit=square, strength=0.5),
        ),
        "edit_0.8": (
            "a green square moves right",
            (t, h, w),
            modes.place("edit", t, h, w, edit=square, strength=0.8),
        ),
    }
    reqs = [
        evaluate.request(c, shape, setup, a.seed + i, plan)
        for i, (c, shape, plan) in enumerate(jobs.values())
    ]
    videos = dict(
        zip(
            jobs,
            evaluate.generate_requests(loaded.graphdef, loaded.params, reqs, setup),
            strict=True,
        )
    )
    sizes = {}
    for name, (caption, _, plan) in jobs.items():
        if name.startswith("edit"):
            continue
        img = strip(videos[name], None if plan is None else plan.given)
        path = write_video(os.path.join(a.out, f"{name}.png"), img[None])
        sizes[path] = caption
    edit = np.concatenate(
        [strip(square, None), strip(videos["edit_0.5"], None), strip(videos["edit_0.8"], None)]
    )
    path = write_video(os.path.join(a.out, "edit.png"), edit[None])
    sizes[path] = jobs["edit_0.5"][0] + " (strengths 0.5, 0.8)"
    total = sum(os.path.getsize(f) for f in sizes) + sum(
        os.path.getsize(os.path.join(a.out, "inputs", f))
        for f in os.listdir(os.path.join(a.out, "inputs"))
    )
    for f, cap in sizes.items():
        print(json.dumps({"file": f, "caption": cap, "bytes": os.path.getsize(f)}))
    print(json.dumps({"total_bytes": total}))


if __name__ == "__main__":
    main()

"""Conditioning tasks as token masks over a sample's latent frames.

Sora samples from image and video prompts; vdit trains for that by giving some latent frames of a
sample clean (t = 0, excluded from the loss) and asking the model to generate the rest. The same masks
drive the sampler. Tokens are in (t, h, w) row-major order, so a frame is a contiguous run of tokens.

| task             | clean latent frames                          | Sora use                       |
|------------------|----------------------------------------------|--------------------------------|
| t2v              | none                                         | text-to-video, images          |
| i2v              | the first                                    | animate an image               |
| extend_forward   | the first k (1 <= k < T)                     | extend a video forward         |
| extend_backward  | the last k                                   | extend a video backward        |
| loop             | the first and the last (same content given)  | seamless loops                 |
| interpolate      | the first k1 and the last k2                 | connect two videos             |

A one-frame sample (an image) is always t2v. Every task leaves at least one latent frame to
generate: a task needs `MIN_FRAMES[task]` latent (patch-)frames, so loop and interpolate need three
(on two frames loop would give both, leaving no loss token, and interpolate would be i2v). In
training a drawn task the sample is too short for becomes t2v (`fit_task`), counted as
`task_fallback`; asked of `frame_mask` directly, it is an error.
"""

from __future__ import annotations

import numpy as np

TASKS: tuple[str, ...] = ("t2v", "i2v", "extend_forward", "extend_backward", "loop", "interpolate")
# Latent frames a task needs so that some frame is generated (and it is the task it says).
MIN_FRAMES: dict[str, int] = {
    "t2v": 1,
    "i2v": 2,
    "extend_forward": 2,
    "extend_backward": 2,
    "loop": 3,
    "interpolate": 3,
}


def frame_mask(task: str, frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Boolean (T,) mask of the latent frames given clean for `task`; at least one frame is not.
    ValueError for a sample shorter than the task's MIN_FRAMES."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if frames < MIN_FRAMES[task]:
        raise ValueError(
            f"task {task!r} needs at least {MIN_FRAMES[task]} latent frames, the sample has {frames}"
        )
    m = np.zeros(frames, bool)
    if task == "t2v":
        return m
    rng = rng or np.random.default_rng(0)
    if task == "i2v":
        m[0] = True
    elif task == "extend_forward":
        m[: rng.integers(1, frames)] = True
    elif task == "extend_backward":
        m[frames - rng.integers(1, frames) :] = True
    elif task == "loop":
        m[0] = m[-1] = True
    elif task == "interpolate":
        k1 = rng.integers(1, frames - 1)
        k2 = rng.integers(1, frames - k1)
        m[:k1] = True
        m[frames - k2 :] = True
    return m


def draw_task(weights: dict[str, float], frames: int, rng: np.random.Generator) -> str:
    """A task drawn with the given weights (images are always t2v)."""
    if frames < 2:
        return "t2v"
    names = [k for k, w in weights.items() if w > 0]
    if not names:
        return "t2v"
    p = np.array([weights[k] for k in names], np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def fit_task(task: str, frames: int) -> str:
    """`task`, or t2v for a sample of too few latent frames for it (MIN_FRAMES)."""
    return task if frames >= MIN_FRAMES[task] else "t2v"


def token_mask(frame_m: np.ndarray, tokens_per_frame: int) -> np.ndarray:
    """Per-frame mask (T,) -> per-token mask (T * tokens_per_frame,) in (t, h, w) order."""
    return np.repeat(frame_m, tokens_per_frame)

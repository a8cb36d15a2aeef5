"""Sora's prompting modes as one mechanism: reference frames placed at output positions + a start time.

Every mode of `vdit sample` is a `Plan` in pixels: a canvas of the output's size whose `given` frames
are reference frames (kept as given; in latent terms a token mask exactly like the conditioning tasks
of `vdit.data.tasks`), and optionally an SDEdit input noised to t = `strength`. `place` builds it:

| mode            | inputs              | frames given (T = --frames)                                 |
|-----------------|---------------------|-------------------------------------------------------------|
| t2v             | -                   | none (T = 1: an image)                                      |
| i2v             | image               | the image as frame 0                                        |
| extend_forward  | video               | the video's last k frames as frames 0..k-1                  |
| extend_backward | video               | the video's first k frames as frames T-k..T-1               |
| loop            | image or video      | its frames at the start, its first frame also as frame T-1  |
| connect         | video, video_end    | A's last k1 frames at the start, B's first k2 at the end    |
| edit            | edit video          | none; the video, noised to t = strength, is the start point |

k (k1 + k2) is as many frames as the inputs have, leaving at least one latent frame to generate.
Inputs of another size are resized with their aspect kept and padded (edge pixels repeated, never
cropped); inputs of another frame rate are resampled to the output's (nearest frames); every such
change is written into `Plan.notes` for the user. `to_request` turns a plan into a `SampleRequest`:
in pixel space the given frames are the latent; a latent model encodes the canvas (the given frames,
the frames between them held from the nearest given one) whole, as `vdit encode` encodes a training
clip, and keeps the latent frames all of whose pixel frames are given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from vdit.data.size import resize_video
from vdit.diffusion import sampler

MODES: tuple[str, ...] = (
    "t2v",
    "i2v",
    "extend_forward",
    "extend_backward",
    "loop",
    "connect",
    "edit",
)
# which inputs each mode reads
INPUTS: dict[str, tuple[str, ...]] = {
    "t2v": (),
    "i2v": ("image",),
    "extend_forward": ("video",),
    "extend_backward": ("video",),
    "loop": ("image|video",),
    "connect": ("video", "video_end"),
    "edit": ("edit",),
}


@dataclasses.dataclass
class Plan:
    """A mode in pixels: the output's canvas uint8 (T, H, W, 3), which of its frames are given,
    the SDEdit input and strength (None / 1.0: from noise), and what was done to the inputs."""

    canvas: np.ndarray
    given: np.ndarray  # (T,) bool
    init: np.ndarray | None = None  # uint8 (T, H, W, 3) SDEdit input
    strength: float = 1.0
    notes: list[str] = dataclasses.field(default_factory=list)


def infer_mode(mode: str | None, image, video, video_end, edit) -> str:
    """The mode asked for: `mode` when given, else the one the given inputs imply."""
    if mode:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
        return mode
    if edit is not None:
        return "edit"
    if video_end is not None:
        return "connect"
    if video is not None:
        return "extend_forward"
    if image is not None:
        return "i2v"
    return "t2v"


def check_inputs(mode: str, image, video, video_end, edit) -> None:
    """ValueError naming the input a mode lacks, or one it does not read."""
    given = {"image": image, "video": video, "video_end": video_end, "edit": edit}
    need = INPUTS[mode]
    for name in need:
        if "|" in name:
            if all(given[n] is None for n in name.split("|")):
                raise ValueError(f"mode {mode} needs --image or --video")
        elif given[name] is None:
            raise ValueError(f"mode {mode} needs --{name}")
    used = {n for name in need for n in name.split("|")}
    extra = sorted(n for n, v in given.items() if v is not None and n not in used)
    if extra:
        raise ValueError(f"mode {mode} does not read --{', --'.join(extra)}")
    if mode == "loop" and image is not None and video is not None:
        raise ValueError("mode loop takes --image or --video, not both")


def fit(
    video: np.ndarray, height: int, width: int, fps_in: float, fps_out: float, what: str
) -> tuple[np.ndarray, list[str]]:
    """uint8 (T, H, W, 3) -> (T', height, width, 3): resampled in time from fps_in to fps_out
    (nearest frames; fps_in 0 = unknown, kept), resized with the aspect kept (area filter) and
    padded to the output size by repeating edge pixels; the notes say what was done."""
    notes = []
    t, h, w = video.shape[:3]
    if fps_in > 0 and fps_out > 0 and t > 1 and abs(fps_in - fps_out) > 1e-3:
        n = max(1, int(round(t * fps_out / fps_in)))
        idx = np.minimum(np.round(np.arange(n) * fps_in / fps_out).astype(int), t - 1)
        video = video[idx]
        notes.append(f"{what}: {t} frames at {fps_in:g} fps resampled to {n} at {fps_out:g} fps")
    if (h, w) != (height, width):
        scale = min(height / h, width / w)
        nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
        video = resize_video(video, nh, nw)
        top, left = (height - nh) // 2, (width - nw) // 2
        video = np.pad(
            video,
            ((0, 0), (top, height - nh - top), (left, width - nw - left), (0, 0)),
            mode="edge",
        )
        msg = f"{what}: {h}x{w} resized to {nh}x{nw}"
        if (nh, nw) != (height, width):
            msg += f" (aspect kept) and padded to {height}x{width} with its edge pixels"
        notes.append(msg)
    return video, notes


def latent_index(frames: int, ct: int) -> np.ndarray:
    """(frames,) latent frame of each pixel frame of a causal autoencoder of time factor ct (the
    first frame alone, then ct frames per latent frame); ct = 1: the identity."""
    f = np.arange(frames)
    return f if ct == 1 else np.where(f == 0, 0, (f - 1) // ct + 1)


def unit(ct: int, pt: int) -> int:
    """Pixel frames of one latent patch-frame after the first (what a mode must leave to generate)."""
    return ct * pt


def place(
    mode: str,
    frames: int,
    height: int,
    width: int,
    *,
    image: np.ndarray | None = None,
    video: np.ndarray | None = None,
    video_end: np.ndarray | None = None,
    edit: np.ndarray | None = None,
    strength: float | None = None,
    fps: float = 0.0,
    fps_in: dict[str, float] | None = None,
    leave: int = 1,
) -> Plan:
    """The plan of `mode` for an output of (frames, height, width) at `fps`. Inputs are uint8
    (T, H, W, 3) (an image: T = 1); `fps_in` their frame rates by name (0 or absent: unknown);
    `leave`: pixel frames that must stay to generate (`unit`)."""
    check_inputs(mode, image, video, video_end, edit)
    fps_in = fps_in or {}
    notes: list[str] = []

    def get(name, x):
        y, n = fit(np.asarray(x, np.uint8), height, width, fps_in.get(name, 0.0), fps, name)
        notes.extend(n)
        return y

    canvas = np.zeros((frames, height, width, 3), np.uint8)
    given = np.zeros(frames, bool)
    room = frames - leave
    if mode != "t2v" and mode != "edit" and room < 1:
        raise ValueError(
            f"mode {mode} needs more than {leave} frame(s) to generate some; ask for more --frames"
        )

    def put(at: int, x: np.ndarray):
        canvas[at : at + len(x)] = x
        given[at : at + len(x)] = True

    def cut(x, k, name, keep):
        if len(x) > k:
            notes.append(f"{name}: {len(x)} frames, its {keep} {k} kept as given frames")
            return x[-k:] if keep == "last" else x[:k]
        return x

    init = None
    if mode == "i2v":
        img = get("image", image)
        if len(img) > 1:
            notes.append(f"image: {len(img)} frames, its first used")
        put(0, img[:1])
    elif mode == "extend_forward":
        put(0, cut(get("video", video), room, "video", "last"))
    elif mode == "extend_backward":
        v = cut(get("video", video), room, "video", "first")
        put(frames - len(v), v)
    elif mode == "loop":
        src = get("image", image) if image is not None else get("video", video)
        first = src[:1]
        put(0, cut(src, max(1, room - 1), "video" if image is None else "image", "first"))
        put(frames - 1, first)
    elif mode == "connect":
        a, b = get("video", video), get("video_end", video_end)
        k1 = min(len(a), max(1, room // 2), room - 1)
        k2 = min(len(b), room - min(len(a), k1))
        if k1 < 1 or k2 < 1:
            raise ValueError(f"mode connect needs more --frames than {frames} to join two videos")
        put(0, cut(a, k1, "video", "last"))
        put(frames - k2, cut(b, k2, "video_end", "first"))
    elif mode == "edit":
        if strength is None:
            raise ValueError("mode edit needs --strength in [0, 1] (0 = the input, 1 = ignore it)")
        e = get("edit", edit)
        if len(e) < frames:
            raise ValueError(
                f"--edit has {len(e)} frames at {fps:g} fps, fewer than --frames={frames}; ask for "
                f"--frames={len(e)} or fewer"
            )
        if len(e) > frames:
            notes.append(f"edit: {len(e)} frames, its first {frames} edited")
        init = e[:frames]
    if strength is not None and mode != "edit":
        raise ValueError("--strength is the SDEdit strength of --edit; give --edit=VIDEO with it")
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise ValueError(f"--strength={strength}: must be in [0, 1] (0 = the input, 1 = ignore it)")
    return Plan(canvas, given, init, 1.0 if strength is None else float(strength), notes)


def to_request(
    plan: Plan,
    prompt: str,
    grid: tuple[int, int, int],
    *,
    patch: tuple[int, int, int],
    compression: tuple[int, int, int],
    seed: int = 0,
    encode: Callable[[np.ndarray], np.ndarray] | None = None,
    text_embedding: np.ndarray | None = None,
) -> sampler.SampleRequest:
    """The sampler's request for `plan` on the latent `grid`. `encode`: pixels (T, H, W, 3) in
    [-1, 1] -> the model's (normalised) latent; None: pixel space (the identity)."""
    ct, pt = compression[0], patch[0]
    if compression != (1, 1, 1) and encode is None:
        raise ValueError("a latent model needs its VAE (autoencoder.vae) to encode given frames")

    def lat(pixels: np.ndarray) -> np.ndarray:
        x = pixels.astype(np.float32) / 127.5 - 1.0
        return x if encode is None else np.asarray(encode(x), np.float32)

    t_lat = grid[0]
    cond_latent = cond_frames = init = None
    if plan.given.any():
        idx = latent_index(len(plan.given), ct)
        lat_given = (
            np.array([plan.given[idx == j].all() for j in range(t_lat)])
            if t_lat > 1
            else (plan.given[:1].copy())
        )
        canvas = plan.canvas
        if encode is not None:  # hold given frames over the frames to generate before encoding
            canvas = _hold(plan.canvas, plan.given)
        z = lat(canvas)
        if t_lat == 1 and pt > 1:
            cond_frames = lat_given[:1]
        else:
            cond_frames = lat_given.reshape(-1, pt).all(axis=1)
        if not cond_frames.any():
            raise ValueError(
                "the given frames fill no whole latent frame of the model; give more frames"
            )
        if cond_frames.all():
            raise ValueError("every latent frame is given: nothing is left to generate")
        cond_latent = z[:t_lat]
    if plan.init is not None:
        init = lat(plan.init)[:t_lat]
    return sampler.SampleRequest(
        prompt,
        tuple(grid),
        seed=seed,
        cond_latent=cond_latent,
        cond_frames=cond_frames,
        init_latent=init,
        strength=plan.strength,
        text_embedding=text_embedding,
    )


def _hold(canvas: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Each frame not given replaced by the nearest given frame (earlier on ties)."""
    idx = np.flatnonzero(given)
    f = np.arange(len(given))
    nearest = idx[np.argmin(np.abs(f[:, None] - idx[None, :]), axis=1)]
    return canvas[nearest]

"""Synthetic-domain evaluation: sample captions of the procedural data and score what comes out.

Because the training data is procedural, a generated video can be checked automatically: the detector
reads the colour of the moving object and its direction, and both are compared with the prompt.
Chance is 1/6 for colour and 1/4 for motion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from vdit.data import detector, synthetic
from vdit.data.video_io import to_uint8
from vdit.diffusion import modes, sampler


@dataclasses.dataclass(frozen=True)
class EvalSetup:
    patch: tuple[int, int, int]
    channels: int
    flow_cfg: object
    steps: int = 25
    cfg_scale: float = 3.0
    text_len: int = 64
    compression: tuple[int, int, int] = (1, 1, 1)  # the autoencoder's (time, height, width) factors
    # latent (T, H, W, C) -> pixels (T', H', W', 3) in [-1, 1]; None: the latent is pixels (identity)
    decode: Callable[[np.ndarray], np.ndarray] | None = None
    # pixels (T', H', W', 3) in [-1, 1] -> the normalised latent; None: the latent is pixels
    encode: Callable[[np.ndarray], np.ndarray] | None = None
    row_len: int | None = None  # video tokens per packed row (None: fitted to the requests)
    null_text: np.ndarray | None = None  # precomputed-text models: the empty caption's embedding

    def latent_grid(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Pixel (frames, height, width) -> the latent grid sampled for it (a causal autoencoder
        keeps 1 + (frames - 1) // ct latent frames; they decode to 1 + (t - 1) * ct frames)."""
        (frames, height, width), (ct, ch, cw) = shape, self.compression
        if height % ch or width % cw:
            raise ValueError(
                f"{height}x{width} is not a multiple of the autoencoder's spatial "
                f"compression {ch}x{cw}"
            )
        return (frames if ct == 1 else 1 + (frames - 1) // ct, height // ch, width // cw)


def prompts(n: int, seed: int = 1234, image_fraction: float = 0.0) -> list[str]:
    """n captions of random (colour, shape, direction), evenly covering colours and directions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        color = list(synthetic.COLORS)[i % len(synthetic.COLORS)]
        shape = synthetic.SHAPES[rng.integers(len(synthetic.SHAPES))]
        still = rng.random() < image_fraction
        direction = (
            synthetic.STILL
            if still
            else synthetic.DIRECTIONS[
                (i // len(synthetic.COLORS) + rng.integers(len(synthetic.DIRECTIONS)))
                % len(synthetic.DIRECTIONS)
            ]
        )
        frames = 1 if still else 8
        out.append(synthetic.caption(synthetic.SampleSpec(color, shape, direction, frames, 32, 32)))
    return out


def generate(
    graphdef,
    params,
    captions: list[str],
    shape: tuple[int, int, int],
    setup: EvalSetup,
    seed: int = 0,
    plans: list[modes.Plan | None] | None = None,
    text_embeddings: list[np.ndarray | None] | None = None,
) -> list[np.ndarray]:
    """Pixel-space samples (uint8 (T, H, W, 3)) for each caption at (frames, height, width); latent
    models sample the latent grid of that size and decode it with `setup.decode`. `plans`: a
    prompting mode per caption (`modes.place`; None: text only), all packed into shared rows."""
    n = len(captions)
    shapes = [tuple(shape)] * n
    return generate_requests(
        graphdef,
        params,
        [
            request(
                c,
                s,
                setup,
                seed + i,
                None if plans is None else plans[i],
                None if text_embeddings is None else text_embeddings[i],
            )
            for i, (c, s) in enumerate(zip(captions, shapes, strict=True))
        ],
        setup,
    )


def request(
    caption: str,
    shape: tuple[int, int, int],
    setup: EvalSetup,
    seed: int = 0,
    plan: modes.Plan | None = None,
    text_embedding: np.ndarray | None = None,
) -> sampler.SampleRequest:
    """The sampler's request for one caption at pixel (frames, height, width), in a mode."""
    grid = setup.latent_grid(tuple(shape))
    if plan is None:
        return sampler.SampleRequest(caption, grid, seed=seed, text_embedding=text_embedding)
    return modes.to_request(
        plan,
        caption,
        grid,
        patch=setup.patch,
        compression=setup.compression,
        seed=seed,
        encode=setup.encode,
        text_embedding=text_embedding,
    )


def generate_requests(graphdef, params, reqs: list, setup: EvalSetup) -> list[np.ndarray]:
    """Pixel-space samples (uint8) of sampler requests, packed together."""
    if setup.compression != (1, 1, 1) and setup.decode is None:
        raise ValueError(
            "autoencoder.vae: a latent model needs its VAE work directory to turn "
            "samples into pixels"
        )
    lat = sampler.sample(
        graphdef,
        params,
        reqs,
        patch=setup.patch,
        channels=setup.channels,
        flow_cfg=setup.flow_cfg,
        steps=setup.steps,
        cfg_scale=setup.cfg_scale,
        text_len=setup.text_len,
        row_len=setup.row_len,
        null_text=setup.null_text,
    )
    return [to_uint8(setup.decode(x) if setup.decode else x) for x in lat]


def evaluate(
    graphdef,
    params,
    setup: EvalSetup,
    n: int = 48,
    shape: tuple[int, int, int] = (8, 32, 32),
    seed: int = 0,
) -> dict[str, float]:
    caps = prompts(n, seed=1234 + seed)
    videos = generate(graphdef, params, caps, shape, setup, seed=seed)
    return detector.score(videos, caps)


# ------------------------------------------------------------------------------------------------
# The prompting modes (vdit eval --modes)
# ------------------------------------------------------------------------------------------------
STRENGTHS = (0.0, 0.3, 0.6, 1.0)  # SDEdit strengths evaluated


def _spec(caption: str, frames: int, height: int, width: int) -> synthetic.SampleSpec:
    _, color, shape, _, direction = caption.split()  # "a red square moves right"
    return synthetic.SampleSpec(color, shape, direction, frames, height, width)


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference, as a fraction of 255."""
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255.0)


def _size_match(a: np.ndarray, b: np.ndarray) -> float:
    """min(r, 1 / r) of the foreground fractions of two clips (1: the object keeps its size)."""
    fa, fb = detector.detect(a).foreground_fraction, detector.detect(b).foreground_fraction
    if fa <= 0 or fb <= 0:
        return 0.0
    return float(min(fa / fb, fb / fa))


def evaluate_modes(
    graphdef,
    params,
    setup: EvalSetup,
    n: int = 8,
    shape: tuple[int, int, int] = (8, 32, 32),
    seed: int = 0,
    strengths: tuple[float, ...] = STRENGTHS,
) -> dict[str, float]:
    """Scores of every prompting mode on procedural clips, each next to its chance level.

    For `n` captions a reference clip is rendered; i2v gets its first frame, extend_forward its
    first half, extend_backward its second half, loop its first frame (at both ends), connect its
    first 3/8 and last 3/8, and edit the whole clip with a caption of another colour at each
    strength; a text-only sample of the same caption and seed is the baseline ("chance" for the
    distances). Scores (detector colours and directions; distances are mean |pixel| / 255):

    - `given_exact`: share of given frames returned bit for bit (pixel space; a latent model's
      decoded frames are not, and `given_error` is their mean distance);
    - `MODE_color` / `MODE_motion`: the generated frames' colour is the given frames' (chance 1/6),
      the whole clip moves the caption's way (chance 1/4); `MODE_size`: the object's size in
      generated vs given frames, min(r, 1/r) (chance: `t2v_size`, the text-only sample's vs the
      reference's);
    - `loop_seam`: distance of the last generated frame to the first frame (`loop_seam_chance`:
      the text-only sample's);
    - `connect_error`: distance of the generated middle frames to the reference's middle
      (`connect_error_chance`: the text-only sample's);
    - `edit_distance_S`: distance of the edit to its input at strength S (grows with S; 0 at 0),
      `edit_color_S`: the edit has the new caption's colour (chance 1/6).
    """
    t, h, w = shape
    caps = prompts(n, seed=1234 + seed)
    rng = np.random.default_rng(seed)
    refs = [synthetic.render(_spec(c, t, h, w), rng) for c in caps]
    colors = list(synthetic.COLORS)
    edit_caps = [
        c.replace(c.split()[1], colors[(colors.index(c.split()[1]) + 1) % 6]) for c in caps
    ]
    a, b = max(1, t * 3 // 8), max(1, t * 3 // 8)
    leave = modes.unit(setup.compression[0], setup.patch[0])
    jobs: list[tuple[str, int, str, modes.Plan | None]] = []
    for i, (c, ref) in enumerate(zip(caps, refs, strict=True)):
        jobs += [
            ("t2v", i, c, None),
            ("i2v", i, c, modes.place("i2v", t, h, w, image=ref[:1], leave=leave)),
            (
                "extend_forward",
                i,
                c,
                modes.place("extend_forward", t, h, w, video=ref[: t // 2], leave=leave),
            ),
            (
                "extend_backward",
                i,
                c,
                modes.place("extend_backward", t, h, w, video=ref[t - t // 2 :], leave=leave),
            ),
            ("loop", i, c, modes.place("loop", t, h, w, image=ref[:1], leave=leave)),
            (
                "connect",
                i,
                c,
                modes.place("connect", t, h, w, video=ref[:a], video_end=ref[t - b :], leave=leave),
            ),
        ]
        jobs += [
            (f"edit_{s:g}", i, edit_caps[i], modes.place("edit", t, h, w, edit=ref, strength=s))
            for s in strengths
        ]
    reqs = [request(c, shape, setup, seed + i, plan) for _, i, c, plan in jobs]
    videos = generate_requests(graphdef, params, reqs, setup)
    out: dict[str, dict[int, np.ndarray]] = {}
    plans: dict[str, dict[int, modes.Plan]] = {}
    for (name, i, _, plan), v in zip(jobs, videos, strict=True):
        out.setdefault(name, {})[i] = v
        plans.setdefault(name, {})[i] = plan

    scores: dict[str, float] = {"n": float(n)}
    exact = given = 0
    err = []
    for name in ("i2v", "extend_forward", "extend_backward", "loop", "connect"):
        for i in range(n):
            g = plans[name][i].given
            exact += int(
                np.sum(np.all(out[name][i][g] == plans[name][i].canvas[g], axis=(1, 2, 3)))
            )
            given += int(g.sum())
            err.append(_dist(out[name][i][g], plans[name][i].canvas[g]))
    scores["given_exact"] = exact / given
    scores["given_error"] = float(np.mean(err))

    base = detector.score([out["t2v"][i] for i in range(n)], caps)
    scores["t2v_color"], scores["t2v_motion"] = base["color_accuracy"], base["motion_accuracy"]
    scores["t2v_size"] = float(np.mean([_size_match(out["t2v"][i], refs[i]) for i in range(n)]))
    for name in ("i2v", "extend_forward", "extend_backward"):
        col = mot = 0
        size = []
        for i in range(n):
            g = plans[name][i].given
            gen = out[name][i][~g]
            det = detector.detect(gen)
            col += det.color == _spec(caps[i], t, h, w).color
            mot += detector.detect(out[name][i]).direction == _spec(caps[i], t, h, w).direction
            size.append(_size_match(gen, plans[name][i].canvas[g]))
        scores[f"{name}_color"], scores[f"{name}_motion"] = col / n, mot / n
        scores[f"{name}_size"] = float(np.mean(size))
    scores["loop_seam"] = float(
        np.mean([_dist(out["loop"][i][-2], out["loop"][i][0]) for i in range(n)])
    )
    scores["loop_seam_chance"] = float(
        np.mean([_dist(out["t2v"][i][-2], out["t2v"][i][0]) for i in range(n)])
    )
    mid = slice(a, t - b)
    scores["connect_error"] = float(
        np.mean([_dist(out["connect"][i][mid], refs[i][mid]) for i in range(n)])
    )
    scores["connect_error_chance"] = float(
        np.mean([_dist(out["t2v"][i][mid], refs[i][mid]) for i in range(n)])
    )
    for s in strengths:
        k = f"edit_{s:g}"
        scores[f"edit_distance_{s:g}"] = float(
            np.mean([_dist(out[k][i], refs[i]) for i in range(n)])
        )
        scores[f"edit_color_{s:g}"] = detector.score([out[k][i] for i in range(n)], edit_caps)[
            "color_accuracy"
        ]
    scores["chance_color"], scores["chance_motion"] = 1 / 6, 1 / 4
    return {k: round(v, 4) for k, v in scores.items()}

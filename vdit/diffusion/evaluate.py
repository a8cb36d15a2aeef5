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

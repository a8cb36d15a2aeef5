"""Euler ODE sampling with classifier-free guidance, at any (frames, height, width).

The sampler takes a model's graph and parameters (it never reads a work directory: the checkpoint module
or the CLI hands them down). Each request becomes one row of tokens; requests of the same size are run as
one batch, and the conditional and unconditional (empty-caption) passes share that batch. Conditioning
frames (image/video prompts) are token masks, the same as in training: their tokens are given clean with
t = 0 at every step and kept as given.

The parameters may be sharded over the devices of several processes (the train state of a multi-host
run): then every process calls `sample` with the same requests, and each gets all the samples back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from vdit.data import packing
from vdit.data.tokenizer import tokenize
from vdit.diffusion import flow


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    prompt: str
    grid: tuple[int, int, int]  # latent (T, H, W), divisible by the patch
    seed: int = 0
    cond_latent: np.ndarray | None = None  # (T, H, W, C) latent with the conditioning frames filled
    cond_frames: np.ndarray | None = None  # (T // pt,) bool: which latent patch-frames are given


def timesteps(num_steps: int, num_tokens: int, cfg: flow.FlowConfig) -> np.ndarray:
    """t from 1 to 0 in `num_steps` Euler steps, shifted for a sample of `num_tokens` tokens."""
    t = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)
    return np.asarray(flow.time_shift(jnp.asarray(t), jnp.asarray(num_tokens), cfg))


def sample(
    graphdef: nnx.GraphDef,
    params,
    requests: Sequence[SampleRequest],
    *,
    patch: tuple[int, int, int],
    channels: int,
    flow_cfg: flow.FlowConfig,
    steps: int = 25,
    cfg_scale: float = 3.0,
    text_len: int = 64,
) -> list[np.ndarray]:
    """Latents (T, H, W, C) for each request (same order). `params`: an nnx State or a pure dict.

    An image (a grid of one latent frame) under a temporal patch pt > 1 is sampled as trained: one
    temporal patch of pt frames (the pipeline repeats an image's frame), of which the first is
    returned."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    images = [patch[0] > 1 and r.grid[0] == 1 for r in requests]
    requests = [
        _image_as_patch(r, patch[0]) if im else r for r, im in zip(requests, images, strict=True)
    ]
    out: dict[int, np.ndarray] = {}
    by_grid: dict[tuple[int, int, int], list[int]] = {}
    for i, r in enumerate(requests):
        by_grid.setdefault(tuple(r.grid), []).append(i)
    for grid, idx in by_grid.items():
        lat = _sample_same_size(
            graphdef,
            params,
            [requests[i] for i in idx],
            grid,
            patch,
            channels,
            flow_cfg,
            steps,
            cfg_scale,
            text_len,
        )
        for i, x in zip(idx, lat, strict=True):
            out[i] = x
    return [out[i][:1] if images[i] else out[i] for i in range(len(requests))]


def _image_as_patch(r: SampleRequest, pt: int) -> SampleRequest:
    """A one-frame request as one whole temporal patch of pt frames (its conditioning frame, if
    any, repeated)."""
    cond = None if r.cond_latent is None else np.repeat(r.cond_latent[:1], pt, axis=0)
    return dataclasses.replace(r, grid=(pt, *r.grid[1:]), cond_latent=cond)


def _sample_same_size(
    graphdef, params, reqs, grid, patch, channels, flow_cfg, steps, cfg_scale, text_len
):
    pt, ph, pw = patch
    if any(g % q for g, q in zip(grid, patch, strict=True)):
        raise ValueError(f"latent grid {grid} is not divisible by the patch {patch}")
    n = len(reqs)
    zero = np.zeros((*grid, channels), np.float32)
    _, positions = packing.patchify(zero, patch)
    num_tokens = positions.shape[0]
    per_frame = num_tokens // (grid[0] // pt)

    # Conditioning: clean tokens and the mask.
    x_cond = np.zeros((n, num_tokens, pt * ph * pw * channels), np.float32)
    cond = np.zeros((n, num_tokens), bool)
    for i, r in enumerate(reqs):
        if r.cond_latent is not None:
            x_cond[i] = packing.patchify(np.asarray(r.cond_latent, np.float32), patch)[0]
            cond[i] = np.repeat(np.asarray(r.cond_frames, bool), per_frame)

    # Text: conditional rows then unconditional (empty caption) rows, one text row each.
    ids = [tokenize(r.prompt, text_len) for r in reqs] + [tokenize("", text_len)] * n
    c_len = max(len(t) for t in ids)
    text = np.zeros((2 * n, c_len), np.int32)
    text_seg = np.zeros((2 * n, c_len), np.int32)
    for i, t in enumerate(ids):
        text[i, : len(t)] = t
        text_seg[i, : len(t)] = 1

    noise = np.stack(
        [
            np.asarray(jax.random.normal(jax.random.key(r.seed), (num_tokens, x_cond.shape[-1])))
            for r in reqs
        ]
    )
    ts = timesteps(steps, num_tokens, flow_cfg)
    run = _euler_fn(graphdef, steps, cfg_scale)
    x = run(
        params,
        jnp.asarray(noise),
        jnp.asarray(x_cond),
        jnp.asarray(cond),
        jnp.asarray(np.broadcast_to(positions, (2 * n, *positions.shape))),
        jnp.asarray(text),
        jnp.asarray(text_seg),
        jnp.asarray(ts),
    )
    if (
        not x.is_fully_addressable
    ):  # parameters sharded over processes: every process gets all samples
        x = multihost_utils.process_allgather(x, tiled=True)
    x = np.asarray(x)
    return [packing.unpatchify(x[i], grid, patch) for i in range(n)]


def _euler_fn(graphdef, steps: int, cfg_scale: float):
    @jax.jit
    def run(params, noise, x_cond, cond, positions, text, text_seg, ts):
        n, length = noise.shape[:2]
        seg = jnp.ones((2 * n, length), jnp.int32)

        def body(i, x):
            t, t_next = ts[i], ts[i + 1]
            x = jnp.where(cond[..., None], x_cond, x)
            t_tok = jnp.where(cond, 0.0, t)
            xx = jnp.concatenate([x, x])
            tt = jnp.concatenate([t_tok, t_tok])
            model = nnx.merge(
                graphdef, params
            )  # inside the loop body: the model lives in its trace
            v = model(xx, positions, seg, tt, text, text_seg)
            v_c, v_u = v[:n], v[n:]
            v = v_u + cfg_scale * (v_c - v_u)
            return x + (t_next - t) * v

        x = jax.lax.fori_loop(0, steps, body, noise)
        return jnp.where(cond[..., None], x_cond, x)

    return run

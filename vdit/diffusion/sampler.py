"""Euler ODE sampling with classifier-free guidance, at any (frames, height, width), packed.

The sampler takes a model's graph and parameters (it never reads a work directory: the checkpoint module
or the CLI hands them down). Every mode of `vdit sample` is one `SampleRequest`: reference latent
frames placed at chosen latent positions (`cond_latent` + `cond_frames`, the token masks of
`vdit.data.tasks` that training uses: those tokens are given clean with t = 0 at every step and kept as
given) and a start time (`strength`: SDEdit noises `init_latent` to t = strength and integrates from
there; 1 starts from pure noise and ignores it, 0 returns it).

Requests of any sizes are packed into shared rows of `row_len` tokens with segment ids, by the same
grain best-fit packer as training (`vdit.data.packing.pack`); each segment follows its own time
schedule (shifted for its own token count, started at its own strength). The conditional and the
unconditional (empty-caption) passes run as one batch of twice the rows. The jitted Euler loop is
compiled once per row shape (rows, row_len, text_len, steps, text dtype) and parameter layout and kept
for later calls (`compile_stats()` counts the compiles); the guidance scale is an argument, not a
constant, so changing it compiles nothing.

The parameters may be sharded over the devices of several processes (the train state of a multi-host
run): then every process calls `sample` with the same requests, and each gets all the samples back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from vdit.data import packing
from vdit.data.tokenizer import tokenize
from vdit.diffusion import flow

MAX_ROWS_PER_CALL = 8  # rows (before doubling for guidance) per compiled call; more run in turns


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    prompt: str
    grid: tuple[int, int, int]  # latent (T, H, W), divisible by the patch
    seed: int = 0
    cond_latent: np.ndarray | None = None  # (T, H, W, C) latent with the conditioning frames filled
    cond_frames: np.ndarray | None = None  # (T // pt,) bool: which latent patch-frames are given
    init_latent: np.ndarray | None = None  # (T, H, W, C) SDEdit input, noised to t = strength
    strength: float = 1.0  # SDEdit start time S in [0, 1]: 1 = from pure noise, 0 = the input
    text_embedding: np.ndarray | None = None  # (Nc, E) caption embedding (precomputed-text models)


@dataclasses.dataclass
class CompileStats:
    compiles: int = 0
    seconds: float = 0.0
    calls: int = 0


_STATS = CompileStats()
_COMPILED: dict = {}


def compile_stats() -> CompileStats:
    """Compiles of the Euler loop so far in this process (and their total time), and calls."""
    return dataclasses.replace(_STATS)


def clear_cache() -> None:
    """Forget the compiled Euler loops (and reset `compile_stats`)."""
    _COMPILED.clear()
    _STATS.compiles, _STATS.seconds, _STATS.calls = 0, 0.0, 0


def timesteps(num_steps: int, num_tokens: int, cfg: flow.FlowConfig) -> np.ndarray:
    """t from 1 to 0 in `num_steps` Euler steps, shifted for a sample of `num_tokens` tokens."""
    t = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)
    return np.asarray(flow.time_shift(jnp.asarray(t), jnp.asarray(num_tokens), cfg))


def schedule(
    num_steps: int, num_tokens: int, cfg: flow.FlowConfig, strength: float = 1.0
) -> np.ndarray:
    """The (num_steps + 1,) times of a sample started at t = `strength`: the shifted schedule's
    unshifted times spaced evenly from the one of `strength` down to 0, so strength 1 is exactly
    `timesteps` and every strength takes `num_steps` steps; the first time is `strength` itself
    (strength 0: all zero, the input is returned)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength {strength}: must be in [0, 1]")
    if strength == 1.0:
        return timesteps(num_steps, num_tokens, cfg)
    u0 = float(flow.inverse_time_shift(np.float64(strength), num_tokens, cfg))
    u = np.linspace(u0, 0.0, num_steps + 1, dtype=np.float32)
    ts = np.array(flow.time_shift(jnp.asarray(u), jnp.asarray(num_tokens), cfg), np.float32)
    ts[0] = np.float32(strength)
    ts[-1] = 0.0
    return ts


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
    row_len: int | None = None,
    row_text_len: int | None = None,
    max_samples_per_row: int = 16,
    null_text: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Latents (T, H, W, C) for each request (same order). `params`: an nnx State or a pure dict.

    `text_len`: caption tokens kept per sample (the model's text.max_len). `row_len` / `row_text_len`:
    video / text tokens per packed row (None: fitted to the largest request, rounded up so that
    similar request files reuse the compile). `null_text`: the empty caption's (N0, E) embedding
    for a precomputed-text model (then every request needs a `text_embedding`); None: byte tokens.

    An image (a grid of one latent frame) under a temporal patch pt > 1 is sampled as trained: one
    temporal patch of pt frames (the pipeline repeats an image's frame), of which the first is
    returned."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    if not requests:
        return []
    images = [patch[0] > 1 and r.grid[0] == 1 for r in requests]
    reqs = [
        _image_as_patch(r, patch[0]) if im else r for r, im in zip(requests, images, strict=True)
    ]
    samples = [
        _sample_input(r, i, patch, channels, text_len, null_text) for i, r in enumerate(reqs)
    ]
    longest = max(s["patches"].shape[0] for s in samples)
    if row_len is None:
        row_len = _round_up(longest)
    if longest > row_len:
        raise ValueError(f"a request of {longest} tokens does not fit rows of {row_len} tokens")
    null = _null_tokens(null_text)
    if row_text_len is None:
        row_text_len = _round_up(
            max(
                sum(s["text"].shape[0] for s in samples),
                min(len(samples), max_samples_per_row) * null.shape[0],
            ),
            16,
        )
    rows = _pack(samples, row_len, row_text_len, max_samples_per_row)

    out: dict[int, np.ndarray] = {}
    for start in range(0, len(rows), MAX_ROWS_PER_CALL):
        chunk = rows[start : start + MAX_ROWS_PER_CALL]
        x = _run_rows(
            graphdef, params, chunk, reqs, patch, flow_cfg, steps, cfg_scale, null, row_text_len
        )
        for b, row in enumerate(chunk):
            seg = row["segment_ids"]
            for s, i in enumerate(row["index"]):
                if s + 1 > seg.max(initial=0):
                    break
                out[int(i)] = packing.unpatchify(x[b][seg == s + 1], reqs[int(i)].grid, patch)
    return [out[i][:1] if images[i] else out[i] for i in range(len(reqs))]


def _round_up(n: int, unit: int = 128) -> int:
    """The smallest of unit, 2 unit, 4 unit, ... that holds n (so row shapes repeat)."""
    m = unit
    while m < n:
        m *= 2
    return m


def _image_as_patch(r: SampleRequest, pt: int) -> SampleRequest:
    """A one-frame request as one whole temporal patch of pt frames (its conditioning frame and
    its SDEdit input, if any, repeated)."""

    def rep(x):
        return None if x is None else np.repeat(x[:1], pt, axis=0)

    return dataclasses.replace(
        r, grid=(pt, *r.grid[1:]), cond_latent=rep(r.cond_latent), init_latent=rep(r.init_latent)
    )


def _null_tokens(null_text: np.ndarray | None) -> np.ndarray:
    if null_text is None:
        return tokenize("", 2)
    return np.asarray(null_text, np.float32)


def _sample_input(r: SampleRequest, index: int, patch, channels, text_len, null_text) -> dict:
    """One request -> the per-sample packing input of training (`pipeline.sample_tokens`'s keys),
    its index carried as a per-sample feature. `patches` holds the given latent (zero where none)."""
    grid = tuple(r.grid)
    if any(g % q for g, q in zip(grid, patch, strict=True)):
        raise ValueError(f"latent grid {grid} is not divisible by the patch {patch}")
    zero = np.zeros((*grid, channels), np.float32)
    given, positions = packing.patchify(zero, patch)
    num_tokens = positions.shape[0]
    cond = np.zeros(num_tokens, bool)
    if r.cond_latent is not None:
        if r.cond_frames is None or len(r.cond_frames) != grid[0] // patch[0]:
            raise ValueError(f"cond_frames must mark each of the {grid[0] // patch[0]} frames")
        given = packing.patchify(np.asarray(r.cond_latent, np.float32), patch)[0]
        cond = np.repeat(np.asarray(r.cond_frames, bool), num_tokens // (grid[0] // patch[0]))
    if null_text is None:
        if r.text_embedding is not None:
            raise ValueError("a text embedding was given to a model of byte-token text")
        text = tokenize(r.prompt, text_len)
    else:
        if r.text_embedding is None:
            raise ValueError(
                "this model reads precomputed text embeddings: give each request a "
                "text_embedding (vdit sample --text_embedding=FILE.npy)"
            )
        text = np.asarray(r.text_embedding, np.float32)[:text_len]
    return {
        "patches": given.astype(np.float32),
        "positions": positions,
        "cond_mask": cond,
        "text": text,
        "grid": np.array([grid], np.int32),
        "index": np.array([index], np.int32),
    }


def _pack(samples: list[dict], row_len: int, text_len: int, max_samples: int) -> list[dict]:
    """The samples packed into rows as training packs them (grain best-fit, packing.pack)."""
    cfg = packing.PackingConfig(
        row_len=row_len,
        text_len=text_len,
        max_samples_per_row=max_samples,
        packing_bins=max(1, min(len(samples), 16)),
        seed=0,
    )
    ds = grain.MapDataset.source(samples).to_iter_dataset()
    rows = list(packing.pack(ds, cfg, sample_features=("index",)))
    seen = sorted(
        int(i) for r in rows for s, i in enumerate(r["index"]) if s < r["segment_ids"].max()
    )
    if seen != list(range(len(samples))):
        raise AssertionError(f"packing lost or repeated requests: {seen}")
    return rows


def _run_rows(graphdef, params, rows, reqs, patch, flow_cfg, steps, cfg_scale, null, text_len):
    """The Euler loop over packed `rows` (padded to a power-of-two row count); (B, L, P) latents."""
    b = 1 << max(0, math.ceil(math.log2(len(rows))))
    length = rows[0]["segment_ids"].shape[0]
    pdim = rows[0]["patches"].shape[-1]
    x_given = np.zeros((b, length, pdim), np.float32)
    start = np.zeros((b, length, pdim), np.float32)
    cond = np.zeros((b, length), bool)
    seg = np.zeros((b, length), np.int32)
    pos = np.zeros((b, length, 3), np.int32)
    ts = np.zeros((steps + 1, b, length), np.float32)
    text = np.zeros((2 * b, text_len, *rows[0]["text"].shape[1:]), rows[0]["text"].dtype)
    text_seg = np.zeros((2 * b, text_len), np.int32)
    text_pos = np.zeros((2 * b, text_len), np.int32)
    for r, row in enumerate(rows):
        x_given[r], cond[r], seg[r], pos[r] = (
            row["patches"],
            row["cond_mask"],
            row["segment_ids"],
            row["positions"],
        )
        text[r], text_seg[r], text_pos[r] = (
            row["text"],
            row["text_segment_ids"],
            row["text_positions"],
        )
        k = 0
        for s, i in enumerate(row["index"]):
            sel = seg[r] == s + 1
            if not sel.any():
                break
            req = reqs[int(i)]
            n = int(sel.sum())
            noise = np.asarray(jax.random.normal(jax.random.key(req.seed), (n, pdim)))
            t_s = schedule(steps, n, flow_cfg, req.strength)
            x0 = noise
            if req.strength < 1.0:
                if req.init_latent is None:
                    raise ValueError("a strength below 1 needs an init_latent (the SDEdit input)")
                init = packing.patchify(np.asarray(req.init_latent, np.float32), patch)[0]
                x0 = (1.0 - t_s[0]) * init + t_s[0] * noise  # x_t of flow.noise_tokens at t = S
            start[r][sel] = x0
            ts[:, r, sel] = t_s[:, None]
            # the unconditional pass: the empty caption for each segment
            text[b + r, k : k + null.shape[0]] = null
            text_seg[b + r, k : k + null.shape[0]] = s + 1
            text_pos[b + r, k : k + null.shape[0]] = np.arange(null.shape[0])
            k += null.shape[0]
    args = tuple(
        jnp.asarray(a) for a in (start, x_given, cond, pos, seg, text, text_seg, text_pos, ts)
    )
    args = (params, *args, jnp.float32(cfg_scale))
    run = _compiled(graphdef, args)
    x = run(*args)
    _STATS.calls += 1
    if not x.is_fully_addressable:  # parameters sharded over processes: every process gets all
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _compiled(graphdef, args):
    """The compiled Euler loop for these argument shapes (compiled on first use, then reused)."""
    leaves, tree = jax.tree.flatten(args)
    key = (
        graphdef,
        tree,
        tuple((a.shape, str(a.dtype), getattr(a, "sharding", None)) for a in leaves),
    )
    fn = _COMPILED.get(key)
    if fn is None:
        t0 = time.perf_counter()
        fn = _euler.lower(graphdef, *args).compile()
        _STATS.compiles += 1
        _STATS.seconds += time.perf_counter() - t0
        _COMPILED[key] = fn
    return fn


@functools.partial(jax.jit, static_argnums=0)
def _euler(graphdef, params, x, x_given, cond, positions, seg, text, text_seg, text_pos, ts, scale):
    """Euler steps over `ts` (steps + 1, B, L) per token, guided: rows 0..B-1 of the text are
    the captions, rows B..2B-1 the empty caption of each segment."""
    n = x.shape[0]
    pos2 = jnp.concatenate([positions, positions])
    seg2 = jnp.concatenate([seg, seg])

    def body(i, x):
        t, t_next = ts[i], ts[i + 1]
        x = jnp.where(cond[..., None], x_given, x)
        t_tok = jnp.where(cond, 0.0, t)
        model = nnx.merge(graphdef, params)  # inside the loop body: the model lives in its trace
        v = model(
            jnp.concatenate([x, x]),
            pos2,
            seg2,
            jnp.concatenate([t_tok, t_tok]),
            text,
            text_seg,
            text_pos,
        )
        v_c, v_u = v[:n], v[n:]
        v = v_u + scale * (v_c - v_u)
        return x + (t_next - t)[..., None] * v

    x = jax.lax.fori_loop(0, ts.shape[0] - 1, body, x)
    return jnp.where(cond[..., None], x_given, x)

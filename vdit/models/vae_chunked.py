"""Long videos in bounded memory: the causal VAE run chunk by chunk in time and tile by tile in space.

`encode_chunked` / `decode_chunked` run the network over consecutive groups of frames; each causal
convolution hands the frames its kernel still needs to the next group (`vae.ConvCache`), so chunked
== whole to float rounding. `encode_tiled` / `decode_tiled` split space into overlapping tiles
(optionally chunked in time too) and cross-fade them (`blend_ramp`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdit.models import vae
from vdit.models.vae_layers import ConvCache


@nnx.jit
def _encode_step(model: vae.CausalVAE3D, x, prev):
    cache = ConvCache(prev)
    mean, logvar = model.encode(x, cache)
    return mean, logvar, cache.new


@nnx.jit
def _decode_step(model: vae.CausalVAE3D, z, prev):
    cache = ConvCache(prev)
    return model.decode(z, cache), cache.new


def encode_chunked(model: vae.CausalVAE3D, video: jax.Array, chunk_frames: int):
    """`model.encode` over the first frame, then groups of `chunk_frames` pixel frames (a multiple of
    ct), carrying the causal caches: equal to the full encode, with memory bounded by the chunk."""
    ct = model.cfg.compression[0]
    if chunk_frames < 1 or chunk_frames % ct:
        raise ValueError(f"chunk_frames={chunk_frames} must be a positive multiple of ct={ct}")
    x = model.check_video(video)
    means, logvars, prev = [], [], None
    for start, stop in _chunks(x.shape[1], chunk_frames):
        m, lv, prev = _encode_step(model, x[:, start:stop], prev)
        means.append(m)
        logvars.append(lv)
    return jnp.concatenate(means, 1), jnp.concatenate(logvars, 1)


def decode_chunked(model: vae.CausalVAE3D, z: jax.Array, chunk_latents: int) -> jax.Array:
    """`model.decode` over the first latent frame, then groups of `chunk_latents` latent frames."""
    if chunk_latents < 1:
        raise ValueError(f"chunk_latents={chunk_latents} must be >= 1")
    outs, prev = [], None
    for start, stop in _chunks(z.shape[1], chunk_latents):
        y, prev = _decode_step(model, z[:, start:stop], prev)
        outs.append(y)
    return jnp.concatenate(outs, 1)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[0, 1), then [1, 1 + size), ... up to n."""
    return [(0, 1)] + [(s, min(s + size, n)) for s in range(1, n, size)]


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    return list(range(0, size - tile, stride)) + [size - tile]


def blend_ramp(n: int, overlap: int, left: bool, right: bool) -> np.ndarray:
    """Weights (n,) of one tile along one axis: on a side shared with a neighbour, the outer quarter of
    the overlap gets 0 (the values nearest the tile border, where its zero padding is felt), the middle
    half a linear ramp, the rest 1."""
    w = np.ones(n, np.float32)
    if overlap <= 0:
        return w
    margin = overlap // 4
    ramp = np.clip((np.arange(overlap) - margin + 1) / (overlap - 2 * margin + 1), 0.0, 1.0)
    if left:
        w[:overlap] = np.minimum(w[:overlap], ramp)
    if right:
        w[n - overlap :] = np.minimum(w[n - overlap :], ramp[::-1])
    return w


def _tiled(fn, x: jax.Array, in_tile: tuple[int, int], in_overlap: tuple[int, int], scale: int):
    """Applies `fn` to overlapping spatial tiles of x (B, T, H, W, C) and blends the outputs, whose
    spatial size is the input's times `scale` (a fraction for the encoder)."""
    h, w = x.shape[2:4]
    acc = weight = None
    ys, xs = _tile_starts(h, in_tile[0], in_overlap[0]), _tile_starts(w, in_tile[1], in_overlap[1])
    for y0 in ys:
        for x0 in xs:
            th, tw = min(in_tile[0], h), min(in_tile[1], w)
            outs = fn(x[:, :, y0 : y0 + th, x0 : x0 + tw])
            oh, ow = outs[0].shape[2:4]
            wy = blend_ramp(oh, int(in_overlap[0] * scale), y0 > 0, y0 + th < h)
            wx = blend_ramp(ow, int(in_overlap[1] * scale), x0 > 0, x0 + tw < w)
            wt = jnp.asarray(wy[:, None] * wx[None, :])[None, None, :, :, None]
            oy, ox = int(y0 * scale), int(x0 * scale)
            if acc is None:
                full = (int(h * scale), int(w * scale))
                acc = [jnp.zeros(o.shape[:2] + full + o.shape[4:], o.dtype) for o in outs]
                weight = jnp.zeros((1, 1, *full, 1), jnp.float32)
            acc = [
                a.at[:, :, oy : oy + oh, ox : ox + ow].add(o * wt)
                for a, o in zip(acc, outs, strict=True)
            ]
            weight = weight.at[:, :, oy : oy + oh, ox : ox + ow].add(wt)
    return [a / weight for a in acc]


def encode_tiled(
    model: vae.CausalVAE3D,
    video: jax.Array,
    tile: tuple[int, int],
    overlap: tuple[int, int],
    chunk_frames: int | None = None,
):
    """Encode overlapping spatial tiles (`tile`, `overlap` in latent pixels) and blend the moments;
    each tile is encoded whole or, with `chunk_frames`, chunked in time."""
    _, ch, cw = model.cfg.compression
    _check_tiling(tile, overlap)
    x = model.check_video(video)
    fn = (
        (lambda v: encode_chunked(model, v, chunk_frames))
        if chunk_frames
        else (lambda v: vae.encode_full(model, v))
    )
    mean, logvar = _tiled(
        fn, x, (tile[0] * ch, tile[1] * cw), (overlap[0] * ch, overlap[1] * cw), 1.0 / ch
    )
    return mean, logvar


def decode_tiled(
    model: vae.CausalVAE3D,
    z: jax.Array,
    tile: tuple[int, int],
    overlap: tuple[int, int],
    chunk_latents: int | None = None,
) -> jax.Array:
    """Decode overlapping latent tiles (`tile`, `overlap` in latent pixels) and blend the videos."""
    _, ch, _ = model.cfg.compression
    _check_tiling(tile, overlap)
    fn = (
        (lambda v: (decode_chunked(model, v, chunk_latents),))
        if chunk_latents
        else (lambda v: (vae.decode_full(model, v),))
    )
    return _tiled(fn, z, tuple(tile), tuple(overlap), float(ch))[0]


def _check_tiling(tile, overlap):
    if min(tile) < 1 or min(overlap) < 0 or any(o >= t for o, t in zip(overlap, tile, strict=True)):
        raise ValueError(
            f"tile {tuple(tile)} and overlap {tuple(overlap)}: need tile >= 1 and "
            "0 <= overlap < tile"
        )

"""Where a trained default model loses the object: x0-hat of real and of sampled clips, by noise level.

Tables for a work directory of the procedural domain (pixel space, 8x32x32 clips):

- real: procedural clips of the eval captions noised to t, the model's x0-hat = x_t - t * v read by
  the detector (motion accuracy) and counted in foreground blobs per frame (the data has 1), with
  the x0 and velocity MSE. Shows up to which noise level the model still places one object.
- sampled: the same captions sampled with the config's Euler steps and guidance; x0-hat at every
  third step. Shows whether sampling keeps one object or breaks it into patches.
- caption words: the velocity MSE of the same noised clips under their own caption and under one
  word changed (the opposite or a perpendicular direction, another colour, the other shape) or none
  (the empty caption), text-to-video and with the first frame given clean (i2v, the loss over the
  other frames). A word the model reads raises the MSE when it is wrong; one it ignores does not.
- frame 0's reach: the mean |change| of the velocity at each frame when the given first frame is
  replaced by a flat one at the given frames' mean value (i2v at t = 0.9): how far information
  travels in time.
- t = 1, where a sample's layout starts: the data's own mean clip given the caption (rendered
  clips) against the model's x0-hat from pure noise (averaged over noise draws), as the drift of
  the object's mass along the caption's direction from the first frame to the last (a share of
  the frame; the data's clips travel 0.30-0.50), and the x0 MSE that knowing each caption word
  is worth there (the data mean given colour and direction against the one given only the other
  word): what an ideal model gains at t = 1 by reading the word.

    python bench/denoise_probe.py --workdir=runs/default --num=12 [--cfg_scale=1]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import ndimage

from vdit.data import detector, packing, synthetic
from vdit.data.tokenizer import tokenize
from vdit.diffusion import evaluate, sampler
from vdit.train import load
from vdit.train.samples import eval_setup

SHAPE = (8, 32, 32)  # (frames, height, width) of the eval clips
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
PERPENDICULAR = {"left": "up", "right": "down", "up": "left", "down": "right"}
CHANGES = ("own", "opposite", "perpendicular", "colour", "shape", "empty")


def changed(caption: str, change: str) -> str:
    """`caption` ("a red square moves right") with one word changed (CHANGES), or ""."""
    a, color, shape, moves, direction = caption.split()
    colors = list(synthetic.COLORS)
    if change == "empty":
        return ""
    if change == "opposite":
        direction = OPPOSITE[direction]
    elif change == "perpendicular":
        direction = PERPENDICULAR[direction]
    elif change == "colour":
        color = colors[(colors.index(color) + len(colors) // 2) % len(colors)]
    elif change == "shape":
        shape = [s for s in synthetic.SHAPES if s != shape][0]
    return " ".join((a, color, shape, moves, direction))


def text_rows(captions: list[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One caption per row: token ids and segment ids (B, C)."""
    ids = [tokenize(c, text_len) for c in captions]
    text = np.zeros((len(ids), max(len(t) for t in ids)), np.int32)
    seg = np.zeros_like(text)
    for i, t in enumerate(ids):
        text[i, : len(t)], seg[i, : len(t)] = t, 1
    return text, seg


def blobs(video: np.ndarray) -> float:
    """Mean number of 4-connected foreground components per frame (the detector's foreground)."""
    x = detector._to_float(video)  # (T, H, W, 3)
    bg = np.median(x.reshape(x.shape[0], -1, 3), axis=1)[:, None, None, :]
    d = np.linalg.norm(x - bg, axis=-1)
    thr = max(detector.MIN_DISTANCE, detector.REL_DISTANCE * float(np.percentile(d, 99)))
    return float(np.mean([ndimage.label(f)[1] for f in d > thr]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--num", type=int, default=12)
    ap.add_argument("--cfg_scale", type=float, default=None, help="unset: the config's")
    args = ap.parse_args()

    loaded = load.load(args.workdir)
    setup = eval_setup(loaded.config)
    if setup.compression != (1, 1, 1):
        raise SystemExit("denoise_probe: pixel-space configs only (autoencoder.kind='identity')")
    if args.cfg_scale is not None:
        setup = dataclasses.replace(setup, cfg_scale=args.cfg_scale)
    n, patch = args.num, setup.patch
    caps = evaluate.prompts(n, seed=1234)
    specs = [synthetic.SampleSpec(c.split()[1], c.split()[2], c.split()[4], *SHAPE) for c in caps]
    rng = np.random.default_rng(0)
    real = [synthetic.render(s, rng) for s in specs]  # uint8 (T, H, W, 3)
    x0 = np.stack([packing.patchify(v / 127.5 - 1.0, patch)[0] for v in real]).astype(np.float32)
    _, pos = packing.patchify(np.zeros((*SHAPE, 3), np.float32), patch)
    num_tokens = pos.shape[0]

    text, text_seg = text_rows(caps + [""] * n, setup.text_len)
    positions = jnp.asarray(np.broadcast_to(pos, (2 * n, *pos.shape)))
    seg = jnp.ones((2 * n, num_tokens), jnp.int32)

    @jax.jit
    def velocity(params, x, t):  # (n, L, P) at scalar t -> (conditional, unconditional)
        model = nnx.merge(loaded.graphdef, params)
        t_tok = jnp.full((2 * n, num_tokens), t)
        v = model(jnp.concatenate([x, x]), positions, seg, t_tok, text, text_seg)
        return v[:n], v[n:]

    def videos(x):
        return [np.clip(packing.unpatchify(x[j], SHAPE, patch), -1, 1) for j in range(n)]

    def row(label, x0_hat):
        vids = videos(x0_hat)
        s = detector.score(vids, caps)
        return f"| {label} | {s['motion_accuracy']:.2f} | {np.mean([blobs(v) for v in vids]):.2f} |"

    print(f"{args.workdir} (step {loaded.step}), {n} captions, real data: 1.00 blobs per frame")
    print("\nreal clips noised to t (conditional x0-hat)\n")
    print("| t | motion | blobs/frame | x0 MSE | v MSE |\n|---|---|---|---|---|")
    noise = np.asarray(jax.random.normal(jax.random.key(7), x0.shape))
    for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0):
        xt = (1 - t) * x0 + t * noise
        v = np.asarray(velocity(loaded.params, jnp.asarray(xt), t)[0])
        x0_hat = xt - t * v
        mse = float(np.mean((x0_hat - x0) ** 2))
        vmse = float(np.mean((v - (noise - x0)) ** 2))
        print(f"{row(f'{t:.2f}', x0_hat)} {mse:.4f} | {vmse:.4f} |")

    print(f"\nsampling ({setup.steps} Euler steps, guidance {setup.cfg_scale}): x0-hat\n")
    print("| step, t | motion | blobs/frame |\n|---|---|---|")
    ts = sampler.timesteps(setup.steps, num_tokens, setup.flow_cfg)
    x = jnp.asarray(
        np.stack([np.asarray(jax.random.normal(jax.random.key(i), x0.shape[1:])) for i in range(n)])
    )
    for i in range(setup.steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        v_c, v_u = velocity(loaded.params, x, t)
        v = v_u + setup.cfg_scale * (v_c - v_u)
        if i % 3 == 0:
            print(row(f"{i}, {t:.3f}", np.asarray(x - t * v)))
        x = x + (t_next - t) * v
    print(row("final sample", np.asarray(x)))

    # Which caption words the model reads, and how far the given first frame reaches.
    movers = [i for i, c in enumerate(caps) if c.split()[4] in OPPOSITE]
    if not movers:
        return
    m = len(movers)
    caps_m, x0_m = [caps[i] for i in movers], x0[movers]
    positions_m, seg_m = positions[:m], seg[:m]

    @jax.jit
    def velocity_with(params, x, t_tok, text, text_seg):  # (m, L, P), per-token t
        model = nnx.merge(loaded.graphdef, params)
        return model(x, positions_m, seg_m, t_tok, text, text_seg)

    texts = {c: text_rows([changed(k, c) for k in caps_m], setup.text_len) for c in CHANGES}
    first = np.broadcast_to(pos[:, 0] == 0, (m, num_tokens))  # (m, L) the first frame's tokens
    noises = [np.asarray(jax.random.normal(jax.random.key(100 + s), x0_m.shape)) for s in range(3)]
    print(f"\ncaption words: velocity MSE of {m} moving clips under a changed caption")
    for mode, given in (("text-to-video", np.zeros_like(first)), ("first frame given", first)):
        print(f"\n{mode}\n\n| t | " + " | ".join(CHANGES) + " |")
        print("|---" * (len(CHANGES) + 1) + "|")
        gen = ~given[..., None]  # the tokens in the loss
        for t in (0.3, 0.5, 0.7, 0.9, 0.98):
            t_tok = jnp.asarray(np.where(given, 0.0, t), jnp.float32)
            xts = [jnp.asarray(np.where(gen, (1 - t) * x0_m + t * e, x0_m)) for e in noises]
            mses = []
            for c in CHANGES:
                err = []
                for xt, e in zip(xts, noises, strict=True):
                    v = np.asarray(velocity_with(loaded.params, xt, t_tok, *texts[c]))
                    err.append(np.sum(gen * (v - (e - x0_m)) ** 2) / (gen.sum() * v.shape[-1]))
                mses.append(np.mean(err))
            print(f"| {t} | " + " | ".join(f"{e:.4f}" for e in mses) + " |")

    t = 0.9
    noise = np.asarray(jax.random.normal(jax.random.key(200), x0_m.shape))
    xt = (1 - t) * x0_m + t * noise
    t_tok = jnp.asarray(np.where(first, 0.0, t), jnp.float32)
    given_real = np.where(first[..., None], x0_m, xt)
    given_flat = np.where(first[..., None], x0_m[first].mean(), xt)
    va, vb = (
        np.asarray(velocity_with(loaded.params, jnp.asarray(x), t_tok, *texts["own"]))
        for x in (given_real, given_flat)
    )
    reach = np.abs(va - vb).mean(-1)  # (m, L)
    frames = [float(reach[:, pos[:, 0] == k].mean()) for k in range(1, SHAPE[0])]
    print(
        f"\nframe 0's reach (t = {t}): mean |dv| at frames 1..{SHAPE[0] - 1} when the given first"
    )
    print("frame is replaced by a flat one\n")
    print("| " + " | ".join(f"frame {k}" for k in range(1, SHAPE[0])) + " |")
    print("|---" * len(frames) + "|\n| " + " | ".join(f"{f:.4f}" for f in frames) + " |")
    layout_at_noise(loaded, patch, pos, x0.shape[-1], setup.text_len)


BACKGROUND = np.asarray(synthetic.BACKGROUND, np.float32) / 127.5 - 1.0  # (3,) in [-1, 1]
AXIS_SIGN = {"left": (2, -1), "right": (2, 1), "up": (1, -1), "down": (1, 1)}  # (T, H, W) axis


def drift(clip: np.ndarray, direction: str) -> float:
    """How far the object's mass moves along `direction` from the first frame to the last, as a
    share of the frame's extent on that axis. clip (T, H, W, 3) in [-1, 1]; the mass is each
    pixel's distance from the background colour above its frame's smallest."""
    mass = np.linalg.norm(clip - BACKGROUND, axis=-1)  # (T, H, W)
    mass = mass - mass.min(axis=(1, 2), keepdims=True)
    axis, sign = AXIS_SIGN[direction]  # columns for left/right, rows for up/down
    profile = mass.sum(axis=3 - axis)  # (T, extent): summed over the other axis
    at = np.arange(profile.shape[1]) + 0.5
    centre = profile @ at / np.maximum(profile.sum(axis=1), 1e-9)  # (T,)
    return float((centre[-1] - centre[0]) * sign / profile.shape[1])


def layout_at_noise(
    loaded, patch, pos, patch_dim: int, text_len: int, renders: int = 200, draws: int = 8
) -> None:
    """The t = 1 table (module docstring): data mean vs the model's x0-hat, per direction."""
    colors, rng = ("red", "blue"), np.random.default_rng(1)

    def mean_clip(colors_, directions):
        clips = [
            synthetic.render(
                synthetic.SampleSpec(
                    colors_[rng.integers(len(colors_))],
                    synthetic.SHAPES[rng.integers(2)],
                    directions[rng.integers(len(directions))],
                    *SHAPE,
                ),
                rng,
            )
            for _ in range(renders)
        ]
        return np.mean(clips, axis=0) / 127.5 - 1.0  # (T, H, W, 3)

    all_colors = tuple(synthetic.COLORS)
    num_tokens = pos.shape[0]
    positions = jnp.asarray(np.broadcast_to(pos, (draws, *pos.shape)))
    seg = jnp.ones((draws, num_tokens), jnp.int32)
    t_tok = jnp.ones((draws, num_tokens), jnp.float32)
    noise = jax.random.normal(jax.random.key(300), (draws, num_tokens, patch_dim))

    @jax.jit
    def x0_at_noise(params, text, text_seg):  # t = 1: x0-hat = x_1 - v, averaged over the draws
        v = nnx.merge(loaded.graphdef, params)(noise, positions, seg, t_tok, text, text_seg)
        return jnp.mean(noise - v, axis=0)  # (L, P)

    print("\nt = 1: drift of the object along the caption's direction, first frame to last")
    print("(share of the frame; data clips travel 0.30-0.50), and the x0 MSE a word is worth\n")
    print("| caption | data mean | model x0-hat | colour worth | direction worth |")
    print("|---|---:|---:|---:|---:|")
    for color in colors:
        for direction in synthetic.DIRECTIONS:
            both = mean_clip((color,), (direction,))
            gain_dir = float(np.mean((both - mean_clip((color,), synthetic.DIRECTIONS)) ** 2))
            gain_col = float(np.mean((both - mean_clip(all_colors, (direction,))) ** 2))
            # the model's captions alternate the two shapes, as the data mean mixes them
            caps = [
                synthetic.caption(
                    synthetic.SampleSpec(color, synthetic.SHAPES[i % 2], direction, *SHAPE)
                )
                for i in range(draws)
            ]
            x0_hat = x0_at_noise(loaded.params, *map(jnp.asarray, text_rows(caps, text_len)))
            hat = packing.unpatchify(np.asarray(x0_hat), SHAPE, patch)
            print(
                f"| a {color} shape moves {direction} | {drift(both, direction):+.2f} "
                f"| {drift(hat, direction):+.2f} "
                f"| {gain_col:.4f} | {gain_dir:.4f} |"
            )


if __name__ == "__main__":
    main()

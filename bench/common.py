"""What several benchmarks share: a DiT train task of a given shape, built from configs/default.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np

from vdit import configlib
from vdit.train.dit_task import DiTTask

ROOT = Path(__file__).resolve().parents[1]


def default_config(arg: str | None = None):
    spec = importlib.util.spec_from_file_location("vdit_default", ROOT / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def dit_task(
    *,
    width: int,
    depth: int,
    heads: int,
    patch: int,
    channels: int,
    text_len: int,
    attn_block: int,
    remat: str = "none",
    steps: int = 100,
    mlp_dim: int = 0,
) -> DiTTask:
    """The DiT task (state, step, shardings) of a model of this shape on one device: a latent
    model of `channels` channels and spatial patch `patch`, a small byte-level text encoder of
    `text_len` tokens, chunked attention; no data pipeline (the benchmark feeds its own rows).
    `mlp_dim` 0 keeps the default's MLP ratio (4)."""
    c = default_config(f"mu/{patch}")
    c.model.update(
        width=width,
        depth=depth,
        heads=heads,
        attn_impl="chunked",
        attn_block=attn_block,
        remat=remat,
        mlp_dim=mlp_dim,
    )
    c.model.text.update(kind="bytes", max_len=text_len, width=64, depth=1, heads=2)
    c.autoencoder.update(kind="latent", compression=(1, 1, 1), channels=channels)
    c.data.text_len = max(c.data.text_len, text_len)
    c.train.steps = steps
    c = configlib.load(c, 1, plan_only=True)
    return DiTTask(c, jax.devices()[:1], data=False)


# The B/2-like shape that bench/peer_dit.py matches to diffusers' Wan DiT.
WIDTH, DEPTH, HEADS, FFN, TEXT_DIM, CHANNELS = 768, 12, 12, 3072, 512, 16


def b2_task(dtype: str, overrides: list[str]) -> DiTTask:
    """The B/2-like DiT of bench/peer_dit.py (precomputed text, 16 latent channels, patch 1x2x2)
    on one device, in `dtype`, with config overrides KEY=VALUE (booleans as 0/1)."""
    c = default_config("B/2")
    c.model.update(width=WIDTH, depth=DEPTH, heads=HEADS, mlp_ratio=FFN / WIDTH, dtype=dtype)
    c.model.text.update(kind="precomputed", width=TEXT_DIM)
    c.autoencoder.update(kind="latent", compression=(1, 1, 1), channels=CHANNELS)
    c.optim.update(weight_decay=0.0, grad_clip=1.0, ema_decay=0.99, b1=0.9, b2=0.99)
    c.mesh.data = 1
    for o in overrides:
        key, _, value = o.partition("=")
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = type(node[last])(value) if not isinstance(node[last], bool) else value == "1"
    c = configlib.load(c, 1, plan_only=True)
    return DiTTask(c, jax.devices()[:1], data=False)


def b2_batch(latent: tuple[int, int, int], text_len: int, rng) -> dict[str, np.ndarray]:
    """One sample in one row of the packed contract: no padding."""
    t, h, w = latent
    gt, gh, gw = t, h // 2, w // 2
    n = gt * gh * gw
    pos = np.stack(np.meshgrid(*map(np.arange, (gt, gh, gw)), indexing="ij"), -1).reshape(1, n, 3)
    return {
        "patches": rng.standard_normal((1, n, 4 * CHANNELS)).astype(np.float32),
        "segment_ids": np.ones((1, n), np.int32),
        "positions": pos.astype(np.int32),
        "text": rng.standard_normal((1, text_len, TEXT_DIM)).astype(np.float32),
        "text_segment_ids": np.ones((1, text_len), np.int32),
        "text_positions": np.arange(text_len, dtype=np.int32)[None],
        "cond_mask": np.zeros((1, n), bool),
        "loss_mask": np.ones((1, n), bool),
        "grid": np.array([[[gt, gh, gw]]], np.int32),
    }

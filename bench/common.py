"""What several benchmarks share: a DiT train task of a given shape, built from configs/default.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax

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
) -> DiTTask:
    """The DiT task (state, step, shardings) of a model of this shape on one device: a latent
    model of `channels` channels and spatial patch `patch`, a small byte-level text encoder of
    `text_len` tokens, chunked attention; no data pipeline (the benchmark feeds its own rows)."""
    c = default_config(f"mu/{patch}")
    c.model.update(
        width=width,
        depth=depth,
        heads=heads,
        attn_impl="chunked",
        attn_block=attn_block,
        remat=remat,
    )
    c.model.text.update(kind="bytes", max_len=text_len, width=64, depth=1, heads=2)
    c.autoencoder.update(kind="latent", compression=(1, 1, 1), channels=channels)
    c.data.text_len = max(c.data.text_len, text_len)
    c.train.steps = steps
    c = configlib.load(c, 1, plan_only=True)
    return DiTTask(c, jax.devices()[:1], data=False)

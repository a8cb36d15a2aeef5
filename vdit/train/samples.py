"""The fixed-seed sample grid written during training to WORKDIR/samples/, with its detector scores."""

from __future__ import annotations

import os

import jax
import ml_collections

from vdit import configlib
from vdit.data import detector
from vdit.data.video_io import tile, upscale, write_video
from vdit.diffusion.evaluate import EvalSetup, generate


def eval_setup(c: ml_collections.ConfigDict) -> EvalSetup:
    return EvalSetup(patch=configlib.patch_size(c), channels=c.autoencoder.channels,
                     flow_cfg=configlib.flow_config(c), steps=c.sample.steps,
                     cfg_scale=c.sample.cfg_scale, text_len=c.model.text.max_len)


def write_sample_grid(c: ml_collections.ConfigDict, trainer, state, workdir: str, step: int,
                      writer=None) -> dict[str, float]:
    """Sample `c.sample.grid_prompts` (seed 0) with the EMA (or raw) params; write an MP4 grid."""
    prompts = list(c.sample.grid_prompts)
    if not prompts:
        return {}
    params = state["ema"] if c.sample.use_ema else state["params"]
    videos = generate(trainer.graphdef, params, prompts, tuple(c.sample.grid_shape), eval_setup(c))
    scores = detector.score(videos, prompts)
    if jax.process_index() == 0:
        grid = upscale(tile(videos, cols=min(4, len(videos))), 4)
        path = os.path.join(workdir, "samples", f"step_{step:07d}.mp4")
        write_video(path, grid, fps=c.sample.fps)
        if writer is not None:
            writer.write_video("samples", step, grid, c.sample.fps)
    return {f"grid_{k}": v for k, v in scores.items() if k in ("color_accuracy", "motion_accuracy")}

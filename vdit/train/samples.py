"""The fixed-seed sample grid written during training to WORKDIR/samples/, with its detector scores."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdit import configlib
from vdit.data import detector
from vdit.data.video_io import tile, upscale, write_video
from vdit.diffusion.evaluate import EvalSetup, generate
from vdit.models import vae_chunked
from vdit.train import load

log = logging.getLogger(__name__)


def eval_setup(c: ml_collections.ConfigDict) -> EvalSetup:
    """Sampling settings of config `c`; a latent model decodes with the VAE of `autoencoder.vae`
    (no decoder when it is empty: `generate` then refuses)."""
    return EvalSetup(
        patch=configlib.patch_size(c),
        channels=c.autoencoder.channels,
        flow_cfg=configlib.flow_config(c),
        steps=c.sample.steps,
        cfg_scale=c.sample.cfg_scale,
        text_len=c.model.text.max_len,
        compression=tuple(c.autoencoder.compression),
        decode=decoder(c),
        encode=encoder(c),
    )


def decoder(c: ml_collections.ConfigDict):
    """The latent -> pixels function of a latent config (None for pixel space or without a VAE)."""
    ae = c.autoencoder
    if ae.kind != "latent" or not ae.get("vae", ""):
        return None
    step = ae.get("vae_step", -1)
    return latent_decoder(ae.vae, None if step < 0 else step)


def encoder(c: ml_collections.ConfigDict):
    """The pixels -> latent function of a latent config (None for pixel space or without a VAE):
    given frames of `vdit sample` are encoded as `vdit encode` encodes a training clip (the
    posterior mean, the whole clip at once), then normalised with the VAE's latent statistics."""
    ae = c.autoencoder
    if ae.kind != "latent" or not ae.get("vae", ""):
        return None
    step = ae.get("vae_step", -1)
    return latent_encoder(ae.vae, None if step < 0 else step)


def latent_encoder(workdir: str, step: int | None = None, chunk_frames: int = 16):
    """A function video (T, H, W, 3) in [-1, 1] -> normalised latent (1 + (T - 1) // ct, h, w, Z):
    the VAE's posterior mean, encoded in causal chunks (equal to the whole-clip encode)."""
    model = load.cached(os.fspath(workdir), step).model()
    ct = model.cfg.compression[0]
    chunk = -(-chunk_frames // ct) * ct

    def encode(video: np.ndarray) -> np.ndarray:
        x = jnp.asarray(video, jnp.float32)[None]
        mean, _ = vae_chunked.encode_chunked(model, x, chunk)
        return np.asarray(model.normalize(mean)[0])

    encode.model = model
    return encode


def latent_decoder(workdir: str, step: int | None = None, chunk_latents: int = 4):
    """The pixels of normalised latents, as DiT samples are: a function latent (t, h, w, Z) ->
    video (1 + (t - 1) * ct, h * ch, w * cw, 3) in [-1, 1] that undoes the VAE's latent statistics
    and decodes in temporal chunks (bounded memory for any length). The VAE is loaded once."""
    model = load.cached(os.fspath(workdir), step).model()

    def decode(latent: np.ndarray) -> np.ndarray:
        z = model.denormalize(jnp.asarray(latent, jnp.float32))[None]
        return np.asarray(vae_chunked.decode_chunked(model, z, chunk_latents)[0])

    decode.model = model
    return decode


def check_vae(c: ml_collections.ConfigDict, manifest: dict) -> None:
    """Refuses a VAE (autoencoder.vae) other than the one the latents were encoded with: its latent
    statistics or compression differ from the manifest's."""
    dec = decoder(c)
    if dec is None:
        return
    v, model = manifest["vae"], dec.model
    same = (
        tuple(v["compression"]) == tuple(model.cfg.compression)
        and np.allclose(v["latent_mean"], np.asarray(model.latent_mean[...]), atol=1e-6)
        and np.allclose(v["latent_std"], np.asarray(model.latent_std[...]), atol=1e-6)
    )
    if not same:
        raise ValueError(
            f"autoencoder.vae={c.autoencoder.vae!r} (step "
            f"{c.autoencoder.get('vae_step', -1)}) is not the VAE the latents at "
            f"data.latents.path were encoded with ({v['workdir']!r}, step {v['step']}): "
            "its compression or latent statistics differ; set autoencoder.vae_step"
        )


def write_sample_grid(
    c: ml_collections.ConfigDict, graphdef, params, workdir: str, step: int, writer=None
) -> dict[str, float]:
    """Sample `c.sample.grid_prompts` (seed 0) with `params`; write an MP4 grid under `workdir`."""
    prompts = list(c.sample.grid_prompts)
    if not prompts:
        return {}
    if c.autoencoder.kind == "latent" and not c.autoencoder.get("vae", ""):
        log.warning("no sample grid: autoencoder.vae names no VAE to decode latents with")
        return {}
    videos = generate(graphdef, params, prompts, tuple(c.sample.grid_shape), eval_setup(c))
    scores = detector.score(videos, prompts)
    if jax.process_index() == 0:
        grid = upscale(tile(videos, cols=min(4, len(videos))), 4)
        path = os.path.join(workdir, "samples", f"step_{step:07d}.mp4")
        write_video(path, grid, fps=c.sample.fps)
        if writer is not None:
            writer.write_video("samples", step, grid, c.sample.fps)
    return {f"grid_{k}": v for k, v in scores.items() if k in ("color_accuracy", "motion_accuracy")}

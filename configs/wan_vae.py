"""Wan2.1's VAE (diffusers' AutoencoderKLWan) as a vdit VAE config: `vae.arch="wan"`
(vdit/models/wan_vae.py), its weights mapped by vdit/interop/wan_vae.py.

    vdit train --config=configs/wan_vae.py:tiny --workdir=runs/wan-vae-tiny   # a tiny one, on CPU
    vdit train --config=configs/wan_vae.py --workdir=runs/wan-vae \\
               --config.train.init_from=IMPORTED_VAE_DIR                        # fine-tune Wan2.1's

The argument after ':' picks the size: "2.1" (the default: Wan2.1's VAE, base 96 x (1, 2, 4, 4), 2
ResBlocks per level, time halved by the last two downsamplings, 16 latent channels, its published
latents_mean / latents_std as the statistics) or "tiny" (base 8, for tests). The network is
exactly diffusers' (every field of the `vae` section follows from its config.json: see
`vae_config_from_diffusers`); the training settings are configs/vae.py's, overridable with
--config.FIELD=VALUE. Note that VAE training recomputes the latent statistics at its end
(`train.stats_samples`), as for any vdit VAE.
"""

import importlib.util
import os

import ml_collections

from vdit.interop import wan_vae

# AutoencoderKLWan settings of each size (the others take diffusers' defaults: Wan2.1's)
SIZES = {
    "2.1": {},
    "tiny": {
        "base_dim": 8,
        "latents_mean": [0.0] * 16,
        "latents_std": [1.0] * 16,
    },
}
DEFAULT_VARIANT = "2.1"


def _vae_config() -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vae.py")
    spec = importlib.util.spec_from_file_location("vdit_vae_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or DEFAULT_VARIANT
    if size not in SIZES:
        raise ValueError(f"configs/wan_vae.py:{size}: not one of {', '.join(SIZES)}")
    return wan_vae.vae_config_from_diffusers(SIZES[size], base=_vae_config())

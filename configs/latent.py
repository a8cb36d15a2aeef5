"""A DiT trained on the latents of a causal VAE (the Sora recipe: compress, then diffuse).

The three steps, each resumable:

    vdit train   --config=configs/vae.py --workdir=runs/vae                  # 1. the VAE
    vdit prepare --input=VIDEOS --out=data/records                           # 2a. videos -> records
    vdit encode  --config=configs/latent.py --vae=runs/vae \\
                 --input=data/records --out=data/latents                    # 2b. records -> latents
    vdit train   --config=configs/latent.py --workdir=runs/latent \\
                 --config.data.latents.path=data/latents --config.autoencoder.vae=runs/vae
    vdit sample  --workdir=runs/latent --frames=17 --height=64 --width=64    # decoded by the VAE

Everything else is configs/default.py (the argument after ':' is the variant, here with patch 2 on
the 8x-compressed latent). `vdit encode` reads this config too: the patch (model.patch_t and the
variant's p), data.max_tokens_per_sample, data.time_fit, data.frame_stride and data.max_fps decide
the size of every latent, so each is a whole number of patches under the cap as encoded. Give both
commands the same config (and the same --config.FIELD overrides of those fields): latents of another
patch lose the remainder (counted as `data_latent_cut`), latents over the cap are rejected (counted as
`data_rejected_over_cap`).
"""

import importlib.util
import os

DEFAULT_VARIANT = "Ti/2"


def _default():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    spec = importlib.util.spec_from_file_location("vdit_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None):
    c = _default().get_config(arg or DEFAULT_VARIANT)
    c.autoencoder.kind = "latent"
    c.autoencoder.compression = (4, 8, 8)  # configs/vae.py: 4x in time, 8x8 in space
    c.autoencoder.channels = 16  # configs/vae.py: vae.latent_channels
    c.autoencoder.vae = ""  # the VAE work directory (required to write samples)
    c.autoencoder.vae_step = -1  # its step the latents were encoded with (-1: the latest)
    c.data.source = "latents"
    c.data.latents.path = ""  # the folder `vdit encode` wrote (required)
    c.data.latents.sample_posterior = True  # a fresh posterior sample at every use (False: mean)
    c.data.row_len = 1024  # a 17x128x128 video is 5 x 8 x 8 = 320 tokens at patch 1x2x2
    c.data.max_tokens_per_sample = 1024
    c.sample.grid_shape = (17, 64, 64)  # pixels: 5 latent frames of 8x8 -> 80 tokens
    return c

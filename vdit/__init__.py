"""vdit: video diffusion transformers and a causal video VAE in JAX (README.md, BUILD.md).

Importing the package (every `vdit` command does so before JAX starts) sets one default: on a
machine with no TPU attached, libtpu's lock file guards no chip, so `ALLOW_MULTIPLE_LIBTPU_LOAD=1`
(unless set) lets every process load libtpu. Without it, a JAX process started without
`JAX_PLATFORMS=cpu` (a `vdit train` on a CPU machine with the `tpu` extra) holds the lock for its
whole life, and `vdit compile`, which needs libtpu as its compiler, fails while it runs. Where a TPU
is attached (`/dev/accel*`, `/dev/vfio/<n>`) the lock keeps guarding the chips.
"""

import glob
import os


def tpu_attached() -> bool:
    """Whether TPU chips are attached to this machine (the device files a TPU VM exposes)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


if not tpu_attached():
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

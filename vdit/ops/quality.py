"""Image quality metrics of videos in [-1, 1]: PSNR and SSIM (VAE evaluation and benchmarks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2), over all their elements."""
    mse = jnp.mean(jnp.square(jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def _gauss_matrix(n: int, win: int, sigma: float = 1.5) -> np.ndarray:
    """(n - win + 1, n): each row a normalised Gaussian window (a 'valid' 1D filter as a matmul)."""
    g = np.exp(-0.5 * ((np.arange(win) - (win - 1) / 2) / sigma) ** 2)
    g /= g.sum()
    m = np.zeros((n - win + 1, n), np.float32)
    for i in range(n - win + 1):
        m[i, i : i + win] = g
    return m


def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) of videos
    (..., H, W, C) in [-1, 1], per frame and channel on [0, 1] values, averaged. The window shrinks
    to the image on sides under 11 pixels."""
    x = (jnp.clip(x, -1, 1) + 1) / 2
    y = (jnp.clip(y, -1, 1) + 1) / 2
    h, w = x.shape[-3:-1]
    win = min(11, h, w)
    gh, gw = jnp.asarray(_gauss_matrix(h, win)), jnp.asarray(_gauss_matrix(w, win))
    f = lambda a: jnp.einsum("ih,...hwc,jw->...ijc", gh, a, gw)
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return jnp.mean(s)

"""Real photographs as camera-pan videos: a virtual camera moving across a still photo.

The photos are the samples that ship inside the scikit-image wheel (`skimage.data`; nothing is
downloaded). They are split by photo: `TRAIN` photos feed training, `HELDOUT` photos are only ever
evaluated on.

`pan_video(photo, frames, height, width, rng)` moves a crop window with the output's aspect ratio
across the photo: a random scale (a share of the largest such window that fits), random start and
end positions no further apart than `max_speed` window sides per frame, a linear or eased
(smoothstep) path and an optional slight zoom. Every frame is resampled from the photo with its
own float box (sub-pixel positions) by PIL's bicubic filter, which widens with the downscale
factor (antialiased: nothing aliases). `frames=1` gives a still image.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

COLOR = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "stereo_motorcycle",
)
GREY = ("camera", "coins", "moon", "brick", "grass", "gravel", "page", "text")
HELDOUT = ("chelsea", "coffee", "rocket")  # never trained on
TRAIN = tuple(n for n in COLOR + GREY if n not in HELDOUT)


@functools.cache
def _load(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError(
            "the photo sources need scikit-image (its sample photos ship inside the "
            "wheel): pip install scikit-image"
        ) from e
    if name not in COLOR + GREY:
        raise ValueError(f"unknown photo {name!r}; choose from {COLOR + GREY}")
    image = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity): the left view
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"photo {name!r} is {image.dtype} {image.shape}, expected uint8 RGB")
    image.setflags(write=False)
    return image


def photos(names: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """name -> uint8 (H, W, 3) photo (grey ones replicated to RGB); read-only, cached."""
    return {n: _load(n) for n in names}


def largest_window(photo_hw: tuple[int, int], aspect: float) -> tuple[float, float]:
    """(height, width) of the largest window of aspect ratio width/height inside the photo."""
    ph, pw = photo_hw
    h = min(float(ph), pw / aspect)
    return h, h * aspect


def pan_boxes(
    photo_hw: tuple[int, int],
    frames: int,
    height: int,
    width: int,
    rng: np.random.Generator,
    min_scale: float = 0.3,
    max_speed: float = 0.08,
    zoom: float = 0.1,
    eased: float = 0.5,
) -> np.ndarray:
    """float (frames, 4) crop boxes (x0, y0, x1, y1) in photo pixels, one per frame.

    The window has the aspect width/height; its size is a share in [min_scale, 1] of the largest
    one that fits (but never under the output size when the photo allows); the last frame's window
    is up to `zoom` smaller or larger; the window's position moves from a random start to a random
    end at most `max_speed` window sides per frame away, along a linear path or (with probability
    `eased`) a smoothstep one."""
    ph, pw = photo_hw
    big_h, big_w = largest_window(photo_hw, width / height)
    lo = min(1.0, max(min_scale, height / big_h))
    s0 = rng.uniform(lo, 1.0)
    s1 = float(np.clip(s0 * (1 + rng.uniform(-zoom, zoom)), lo, 1.0)) if frames > 1 else s0
    sizes = np.array([[big_w * s0, big_h * s0], [big_w * s1, big_h * s1]])  # (w, h) start, end
    start = rng.uniform(0, 1, 2) * (np.array([pw, ph]) - sizes[0])
    reach = max_speed * (frames - 1) * sizes[1]
    room = np.maximum(0.0, np.array([pw, ph]) - sizes[1])
    end = rng.uniform(np.clip(start - reach, 0, room), np.clip(start + reach, 0, room))
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    if rng.random() < eased:
        t = t * t * (3 - 2 * t)
    size = sizes[0] + t[:, None] * (sizes[1] - sizes[0])
    pos = start + t[:, None] * (end - start)
    pos = np.clip(pos, 0, np.maximum(0.0, np.array([pw, ph]) - size))  # stay inside the photo
    return np.concatenate([pos, pos + size], axis=1)


def render(photo: np.ndarray, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (len(boxes), height, width, 3): each float box of the photo resampled to the output
    (PIL bicubic, whose support widens with the downscale factor, so downscaling is antialiased).
    A box of exactly the output size at integer coordinates is a plain crop."""
    image = Image.fromarray(np.asarray(photo))
    return np.stack(
        [
            np.asarray(
                image.resize(
                    (width, height), Image.Resampling.BICUBIC, box=tuple(float(v) for v in b)
                )
            )
            for b in boxes
        ]
    )


def pan_video(
    photo: np.ndarray, frames: int, height: int, width: int, rng: np.random.Generator, **path
) -> np.ndarray:
    """uint8 (frames, height, width, 3): a camera panning across `photo` (see `pan_boxes` for the
    path's keyword arguments). A function of the photo and the rng's state."""
    boxes = pan_boxes(photo.shape[:2], frames, height, width, rng, **path)
    return render(photo, boxes, height, width)

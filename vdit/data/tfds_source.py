"""A locally prepared TensorFlow Datasets dataset as a training source (`data.source = "tfds"`).

`tfds.data_source(name, split=..., data_dir=..., download=False)` opens the dataset's ArrayRecord
files for random access; nothing is downloaded or generated. The dataset must have been prepared in
ArrayRecord format (`download_and_prepare(file_format="array_record")`, or `tfds build
--file_format=array_record`). Each example becomes the pipeline's element dict:

- `video_key`: frames as uint8 (T, H, W, C), or one image (H, W, C) as a one-frame video. One
  channel is repeated to RGB, a fourth (alpha) is dropped. Any other shape or dtype reaches the
  pipeline as it is and is rejected there with a reason (`bad_shape`).
- `caption_key`: a Text feature (bytes, decoded as UTF-8), a string, or a ClassLabel (its class
  name, e.g. UCF101's action); "" for no caption key.
- `fps`: the configured nominal frame rate when > 0 (TFDS examples carry none).

TFDS decodes its `Video` and `Image` features with TensorFlow: reading such a dataset needs
`tensorflow` installed (a dataset whose frames are a `Tensor` feature does not).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class TfdsConfig:
    name: str = ""  # registered or prepared dataset name, optionally with config/version
    split: str = "train"  # TFDS split string ("train", "train[:90%]", ...)
    data_dir: str = ""  # where it was prepared ("" = TFDS's default, ~/tensorflow_datasets)
    video_key: str = "video"  # feature holding the frames
    caption_key: str = ""  # feature holding the caption ("" = no captions)
    fps: float = 0.0  # nominal frame rate reported with each sample (0 = unknown)


def _open(cfg: TfdsConfig):
    import tensorflow_datasets as tfds

    where = (
        f"data.tfds.name={cfg.name!r}, data.tfds.split={cfg.split!r}, data.tfds.data_dir="
        f"{cfg.data_dir or '(TFDS default)'!r}"
    )
    try:
        return tfds.data_source(
            cfg.name, split=cfg.split, data_dir=cfg.data_dir or None, download=False
        )
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "tensorflow":
            raise ValueError(
                f"{where}: its features decode with TensorFlow, which is not "
                "installed (pip install tensorflow)"
            ) from None
        raise
    except (
        Exception
    ) as e:  # DatasetNotFoundError, AssertionError (not prepared), ValueError (split)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"{where}: cannot open a prepared dataset ({type(e).__name__}: {first}); "
            "prepare it locally in ArrayRecord format first, nothing is downloaded"
        ) from None


class TfdsVideos:
    """Random-access source (a grain MapDataset source) over a prepared TFDS split."""

    def __init__(self, cfg: TfdsConfig):
        self.cfg = cfg
        self._ds = _open(cfg)
        features = self._ds.dataset_info.features
        keys = sorted(features.keys())
        if cfg.video_key not in features:
            raise ValueError(
                f"data.tfds.video_key={cfg.video_key!r} is not a feature of "
                f"{cfg.name!r}; its features are {keys}"
            )
        if cfg.caption_key and cfg.caption_key not in features:
            raise ValueError(
                f"data.tfds.caption_key={cfg.caption_key!r} is not a feature of "
                f"{cfg.name!r}; its features are {keys} ('' for no captions)"
            )
        label = features[cfg.caption_key] if cfg.caption_key else None
        self._names = tuple(label.names) if hasattr(label, "names") else None  # ClassLabel

    def __len__(self) -> int:
        return len(self._ds)

    def _caption(self, value: Any) -> str:
        if self._names is not None:
            return self._names[int(value)]
        value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        try:
            example = self._ds[index]
            video = np.asarray(example[self.cfg.video_key])
            caption = self._caption(example[self.cfg.caption_key]) if self.cfg.caption_key else ""
        except Exception as e:  # a corrupt record or an undecodable feature
            return {
                "video": None,
                "caption": "",
                "index": index,
                "decode_error": f"example {index}: {type(e).__name__}: {e}",
            }
        if video.ndim == 3:  # an image feature: one frame
            video = video[None]
        if video.ndim == 4 and video.shape[-1] == 1:
            video = np.repeat(video, 3, axis=-1)
        elif video.ndim == 4 and video.shape[-1] == 4:
            video = video[..., :3]
        element = {"video": video, "caption": caption, "index": index}
        if self.cfg.fps > 0:
            element["fps"] = self.cfg.fps
        return element

    def __repr__(self) -> str:
        return f"TfdsVideos({self.cfg.name!r}, split={self.cfg.split!r}, {len(self)} examples)"

"""The DiT's data settings: the config's `data` section as one typed value, and every check on it.

`PipelineConfig`'s fields are the `data` section's (configs/default.py, where every default and its
comment lives) plus the four it takes from other sections (the patch, the autoencoder's compression
and channels, the caption length), so building one is construction: `PipelineConfig.from_sections`.
The parts take views of it named by their own dataclasses (`size`, `packing`, `token_drop`, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from vdit.data import sources, tasks
from vdit.data.latents import LatentsConfig
from vdit.data.packing import PackingConfig
from vdit.data.records import RecordsConfig
from vdit.data.size import TIME_FITS, SizePolicy
from vdit.data.synthetic import SyntheticConfig
from vdit.data.tfds_source import TfdsConfig
from vdit.data.token_drop import TokenDrop


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The fields of configs/default.py's `data` section, by the same names (see the comments there).
    With data.source="latents" the size fields (max_tokens_per_sample, time_fit, frame_stride,
    max_fps) say how the latents were encoded (`vdit encode` reads them from the same config): the
    pipeline checks latents against the cap and the patch and applies nothing else to them."""

    source: str  # one of sources.SOURCES
    seed: int  # shuffling, caption dropout, task draws, packing (and the synthetic source)
    synthetic: SyntheticConfig
    records: RecordsConfig
    tfds: TfdsConfig
    latents: LatentsConfig
    batch_rows: int  # global rows per step (split over processes)
    row_len: int  # L: tokens per row
    text_len: int  # C: text tokens per row
    max_samples_per_row: int  # S
    packing_bins: int  # rows packed together
    max_tokens_per_sample: int  # larger samples are resized down (never cropped)
    time_fit: str  # one of size.TIME_FITS
    frame_stride: int  # keep every k-th source frame
    max_fps: float  # > 0: sources with a higher "fps" are strided down to at most this
    min_side: int  # short side (pixels) kept under the cap by taking fewer frames first; 0: off
    token_drop: TokenDrop
    caption_dropout: float  # empty caption rate (classifier-free guidance)
    tasks: tuple[tuple[str, float], ...]  # (task, weight) of data.tasks, in the config's order
    workers: int  # grain worker processes (0: in the training process)
    max_consecutive_rejections: int  # more rejected samples in a row is an error
    # From other sections:
    patch: tuple[int, int, int]  # (model.patch_t, p, p) of model.variant
    compression: tuple[int, int, int]  # autoencoder.compression
    channels: int  # autoencoder.channels (3: pixels)
    text_max_len: int  # model.text.max_len: caption tokens kept per sample
    # Held out for the eval loss (sources.split); 0 in configs written before it existed.
    eval_samples: int = 0
    # model.text.kind and .width: "precomputed" reads each record's caption embedding (E wide)
    text_kind: str = "bytes"
    text_width: int = 0

    @classmethod
    def from_sections(
        cls,
        data: Mapping[str, Any],
        *,
        patch: tuple[int, int, int],
        compression: tuple[int, int, int],
        channels: int,
        text_max_len: int,
        text_kind: str = "bytes",
        text_width: int = 0,
    ) -> PipelineConfig:
        """From the `data` section (a dict, e.g. ConfigDict.to_dict()) and the other sections'
        fields. A section written before records/tfds/latents existed gets their empty defaults."""
        d = as_tuples(dict(data))
        d.setdefault("min_side", 0)  # a section written before the floor existed: no floor
        own = {f.name for f in dataclasses.fields(cls)} - {
            "patch",
            "compression",
            "channels",
            "text_max_len",
            "text_kind",
            "text_width",
        }
        for key in d:
            if key not in own:
                raise ValueError(f"data.{key}: not a data field; remove it from the config")
        return cls(
            **{
                **d,
                "synthetic": section(SyntheticConfig, "synthetic", d["synthetic"], seed=d["seed"]),
                "records": section(RecordsConfig, "records", d.get("records", {})),
                "tfds": section(TfdsConfig, "tfds", d.get("tfds", {})),
                "latents": section(LatentsConfig, "latents", d.get("latents", {})),
                "token_drop": section(TokenDrop, "token_drop", d["token_drop"]),
                "tasks": tuple((k, float(v)) for k, v in d["tasks"].items()),
                # a config saved before the setting existed gets its default
                "max_consecutive_rejections": d.get("max_consecutive_rejections", 1000),
            },
            patch=tuple(patch),
            compression=tuple(compression),
            channels=channels,
            text_max_len=text_max_len,
            text_kind=text_kind,
            text_width=text_width,
        )

    @property
    def size(self) -> SizePolicy:
        return _view(SizePolicy, self)

    @property
    def packing(self) -> PackingConfig:
        return _view(PackingConfig, self)


def as_tuples(x: Any) -> Any:
    """Lists (as config overrides may give) -> tuples, through nested dicts."""
    if isinstance(x, dict):
        return {k: as_tuples(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return tuple(as_tuples(v) for v in x)
    return x


def section(cls, name: str, values: Mapping[str, Any], **extra: Any):
    """`cls(**values, **extra)` for the config section data.`name`; ValueError naming a key that is
    not one of its fields."""
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields or key in extra:
            raise ValueError(f"data.{name}.{key}: not a field of data.{name}; remove it")
    return cls(**values, **extra)


def _view(cls, cfg: PipelineConfig):
    """The dataclass `cls` built from the fields of `cfg` of the same names."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def validate(cfg: PipelineConfig) -> None:
    """Every check on the data settings; ValueError naming the field."""
    if cfg.max_tokens_per_sample > cfg.row_len:
        raise ValueError(
            f"data.max_tokens_per_sample={cfg.max_tokens_per_sample} exceeds "
            f"data.row_len={cfg.row_len}"
        )
    if cfg.text_max_len > cfg.text_len:
        raise ValueError(
            f"model.text.max_len={cfg.text_max_len} exceeds data.text_len={cfg.text_len}"
        )
    for name, weight in cfg.tasks:
        if name not in tasks.TASKS:
            raise ValueError(f"data.tasks.{name}: unknown task; choose from {tasks.TASKS}")
        if weight < 0:
            raise ValueError(f"data.tasks.{name}: weight {weight} is negative")
    cfg.token_drop.validate()
    if cfg.max_consecutive_rejections < 1:
        raise ValueError(
            f"data.max_consecutive_rejections={cfg.max_consecutive_rejections} must be >= 1"
        )
    if cfg.time_fit not in TIME_FITS:
        raise ValueError(f"data.time_fit={cfg.time_fit!r}: choose 'resample' or 'trim'")
    if cfg.frame_stride < 1:
        raise ValueError(f"data.frame_stride={cfg.frame_stride} must be >= 1")
    if cfg.max_fps < 0:
        raise ValueError(f"data.max_fps={cfg.max_fps} must be >= 0 (0 = off)")
    if cfg.min_side < 0:
        raise ValueError(f"data.min_side={cfg.min_side} must be >= 0 (0 = off)")
    if cfg.source not in sources.SOURCES:
        raise ValueError(f"data.source={cfg.source!r}: choose from {sources.SOURCES}")
    if cfg.source == "records" and not cfg.records.path:
        raise ValueError(
            "data.records.path: required with data.source='records' (a folder of "
            "shards written by `vdit prepare`, or a glob of them)"
        )
    if cfg.source == "latents" and not cfg.latents.path:
        raise ValueError(
            "data.latents.path: required with data.source='latents' (a folder "
            "written by `vdit encode`)"
        )
    if (cfg.source == "latents") != (cfg.compression != (1, 1, 1) or cfg.channels != 3):
        raise ValueError(
            f"data.source={cfg.source!r} with autoencoder compression "
            f"{cfg.compression} and {cfg.channels} channels: latents "
            "(autoencoder.kind='latent') train from data.source='latents', pixels "
            "(autoencoder.kind='identity') from the other sources"
        )
    if cfg.source == "tfds":
        for field in ("name", "split", "video_key"):
            if not getattr(cfg.tfds, field):
                raise ValueError(f"data.tfds.{field}: required with data.source='tfds'")
        if cfg.tfds.fps < 0:
            raise ValueError(f"data.tfds.fps={cfg.tfds.fps} must be >= 0 (0 = unknown)")
    if cfg.eval_samples < 0:
        raise ValueError(f"data.eval_samples={cfg.eval_samples} must be >= 0 (0: no eval_loss)")
    if not 0 <= cfg.caption_dropout < 1:
        raise ValueError(f"data.caption_dropout: {cfg.caption_dropout} is not in [0, 1)")
    unit = (cfg.patch[1] * cfg.compression[1], cfg.patch[2] * cfg.compression[2])
    for hw in cfg.synthetic.size_choices if cfg.source == "synthetic" else ():
        if hw[0] < unit[0] or hw[1] < unit[1]:
            raise ValueError(
                f"data.synthetic.size_choices: {hw} is smaller than one patch {unit} in pixels"
            )


def warnings(cfg: PipelineConfig) -> list[str]:
    """Settings under which the pipeline loses a whole class of samples (rejected, trained as
    another task, or kept under the resolution floor): one line each, naming the setting. The
    config is valid; `vdit.configlib.load` logs these."""
    out = []
    pt, ct = cfg.patch[0], cfg.compression[0]
    policy = cfg.size
    if pt > 2:  # 1 < latent frames < pt: no whole temporal patch (images are repeated to one)
        lo, hi = (2, pt - 1) if ct == 1 else (ct + 1, (pt - 1) * ct)
        out.append(
            f"model.patch_t={pt}: videos of {lo} to {hi} frames (2 to {pt - 1} latent frames) "
            "make no whole temporal patch and are rejected (data_rejected_too_short)"
        )
    if cfg.source == "synthetic":
        latent = {}
        for f in cfg.synthetic.frame_choices:
            stride = policy.fps_stride({"video": np.empty((f, 0)), "fps": cfg.synthetic.fps})
            latent[f] = policy.latent_frames((f - 1) // stride + 1)
        short = [f for f, lf in latent.items() if 1 < lf < pt]
        if short:
            out.append(
                f"data.synthetic.frame_choices: videos of {short} frames are all rejected as "
                f"too_short under model.patch_t={pt}"
            )
        videos = [lf // pt for lf in latent.values() if lf >= pt and lf > 1]
        if cfg.synthetic.image_fraction < 1 and videos:
            for name, weight in cfg.tasks:
                if weight > 0 and max(videos) < tasks.MIN_FRAMES[name]:
                    out.append(
                        f"data.tasks.{name}: every video of data.synthetic.frame_choices has "
                        f"fewer than {tasks.MIN_FRAMES[name]} latent patch-frames; it trains as "
                        "t2v instead (data_task_fallback)"
                    )
    if cfg.min_side > 0:
        uh, uw = cfg.patch[1] * cfg.compression[1], cfg.patch[2] * cfg.compression[2]
        n = max(1, cfg.min_side // uh) * max(1, cfg.min_side // uw)
        if n > cfg.max_tokens_per_sample:
            out.append(
                f"data.min_side={cfg.min_side}: one {cfg.min_side}x{cfg.min_side} frame is {n} "
                f"tokens, over data.max_tokens_per_sample={cfg.max_tokens_per_sample}; samples "
                "over the cap are scaled down under it"
            )
    return out

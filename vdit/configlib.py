"""From an ml_collections config to the typed settings each part takes, with validation.

`load(config, num_devices)` resolves the variant string, checks every constraint that would otherwise
fail deep inside a compile, and raises ValueError naming the field. The parts never see the whole
config: `model_config`, `pipeline_config`, `flow_config` hand each only the fields it uses.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import ml_collections

from vdit.data import config as data_config
from vdit.data import tokenizer
from vdit.data.vae_data import VAEDataConfig
from vdit.diffusion.flow import FlowConfig
from vdit.models.discriminator import DiscConfig
from vdit.models.dit import DiTConfig
from vdit.models.text import TextEncoderConfig
from vdit.models.vae import LossConfig, VAEConfig
from vdit.parallel.mesh import resolve_mesh_shape
from vdit.parallel.sharding import DEFAULT_RULES

log = logging.getLogger(__name__)

# (width, depth, heads): DiT paper sizes (S, B, L, XL), DeiT-Ti, and "mu" for tests.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "mu": (64, 2, 4),
    "Ti": (192, 4, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def default_rules() -> tuple[tuple[str, object], ...]:
    return DEFAULT_RULES


def parse_variant(variant: str) -> tuple[str, int]:
    """ "S/2" -> ("S", 2)."""
    name, _, p = variant.partition("/")
    if name not in MODEL_SIZES or not p.isdigit() or int(p) < 1:
        raise ValueError(
            f"model.variant={variant!r}: expected NAME/p with NAME in {sorted(MODEL_SIZES)} and p a "
            "positive patch size, e.g. 'S/2'"
        )
    return name, int(p)


def _fail(field: str, msg: str) -> None:
    raise ValueError(f"{field}: {msg}")


def build(
    cls,
    section: ml_collections.ConfigDict,
    name: str,
    *,
    config_only: tuple[str, ...] = (),
    **extra,
):
    """`cls(...)` from the config `section` (called `name`) whose fields it names, plus `extra`
    (fields that come from other sections): the section's names are the dataclass's, so building is
    construction. A key of the section that is neither a field nor one of `config_only` (settings
    the config resolves itself, such as model.variant) is refused by name, never ignored. The
    dataclass checks its own fields; its error is re-raised naming the field in the config
    ("model.heads: ...")."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = section.to_dict()
    for key in values:
        if key not in names and key not in config_only and key not in extra:
            raise ValueError(f"{name}.{key}: not a setting of {cls.__name__}; remove it")
    fields = {k: v for k, v in values.items() if k in names and k not in extra}
    try:
        return cls(**fields, **extra)
    except ValueError as e:
        raise ValueError(f"{name}.{e}") from None


# "identity": pixels in [-1, 1], what the pixel sources produce. "latent": samples encoded by a VAE of
# `autoencoder.compression` and `autoencoder.channels` (`vdit encode`), read with
# data.source="latents"; `autoencoder.vae` names the VAE work directory whose decoder turns sampled
# latents into pixels.
AUTOENCODER_KINDS = ("identity", "latent")


def load(
    config: ml_collections.ConfigDict, num_devices: int | None = None, *, plan_only: bool = False
):
    """Resolve and validate; returns an unlocked copy with width/depth/heads filled in.

    `plan_only=True` is for tools that need only shapes (compiling for a topology, FLOP counts): it
    accepts `autoencoder.kind="latent"` without a latents folder (data.source may stay a pixel one).
    """
    c = ml_collections.ConfigDict(config.to_dict())
    kind = c.get("kind", "dit")
    if kind == "vae":
        return load_vae(c, num_devices)
    if kind != "dit":
        _fail("kind", f"{kind!r} is not one of ('dit', 'vae')")
    name, p = parse_variant(c.model.variant)
    w, d, h = MODEL_SIZES[name]
    c.model.width = c.model.width or w
    c.model.depth = c.model.depth or d
    c.model.heads = c.model.heads or h
    m = c.model
    model_config(c)  # the model's own checks (vdit/models/dit.py, text.py), naming the field
    flow_config(c)
    ae = c.autoencoder
    if ae.kind not in AUTOENCODER_KINDS:
        _fail("autoencoder.kind", f"{ae.kind!r} is not one of {AUTOENCODER_KINDS}")
    if ae.kind == "latent" and not plan_only and c.data.source != "latents":
        _fail(
            "data.source",
            f"{c.data.source!r} gives pixels; autoencoder.kind='latent' trains on "
            "data.source='latents' (a folder written by `vdit encode`)",
        )
    if ae.kind == "identity" and c.data.source == "latents":
        _fail(
            "autoencoder.kind",
            "'identity' is pixel space; data.source='latents' needs "
            "autoencoder.kind='latent' with the VAE's compression and channels",
        )
    if ae.kind == "latent" and (
        len(ae.compression) != 3 or min(ae.compression) < 1 or ae.channels < 1
    ):
        _fail(
            "autoencoder.compression",
            f"{tuple(ae.compression)} and {ae.channels} channels: "
            "expected three positive factors (time, height, width) and positive channels",
        )
    if ae.kind == "identity" and (tuple(ae.compression) != (1, 1, 1) or ae.channels != 3):
        _fail(
            "autoencoder.compression",
            "the identity autoencoder is pixel space: compression "
            f"(1, 1, 1) and 3 channels, got {tuple(c.autoencoder.compression)} and "
            f"{c.autoencoder.channels}",
        )

    try:
        sample_grid(c, tuple(c.sample.grid_shape))
    except ValueError as e:
        _fail("sample.grid_shape", str(e))

    dc = c.data
    if plan_only and ae.kind == "latent" and not (dc.source == "latents" and dc.latents.path):
        with dc.unlocked():
            dc.source = "latents"  # shapes only: no folder is read
            dc.latents = ml_collections.ConfigDict(
                {"path": "(planning only)", "sample_posterior": True}
            )
    data_config.validate(pipeline_config(c))  # every check on the data section
    for warning in data_config.warnings(pipeline_config(c)):  # valid, but a class of samples lost
        log.warning("%s", warning)

    if num_devices is not None:
        dcn = c.mesh.get("dcn_data", 1)
        if dcn < 1 or num_devices % dcn:
            _fail("mesh.dcn_data", f"{num_devices} devices do not split into {dcn} equal slices")
        try:
            mesh = resolve_mesh_shape(dict(c.mesh), num_devices // dcn)
        except ValueError as e:
            raise ValueError(f"mesh: {e}") from None
        mesh["data"] *= dcn
        rows_split = mesh["data"] * mesh["fsdp"]
        if dc.batch_rows % rows_split:
            _fail(
                "data.batch_rows",
                f"{dc.batch_rows} rows do not split over mesh data x fsdp = "
                f"{mesh['data']} x {mesh['fsdp']}",
            )
        if m.heads % mesh["tensor"]:
            _fail("model.heads", f"{m.heads} heads do not split over mesh.tensor={mesh['tensor']}")
        if dc.row_len % mesh["sequence"]:
            _fail(
                "data.row_len",
                f"{dc.row_len} tokens do not split over mesh.sequence={mesh['sequence']}",
            )
    if c.train.steps < 1:
        _fail("train.steps", f"{c.train.steps} must be >= 1")
    if c.train.get("peak_flops_per_device", 0.0) < 0:
        _fail(
            "train.peak_flops_per_device",
            f"{c.train.peak_flops_per_device} must be >= 0 (0: from the device kind)",
        )
    if c.train.checkpoint_every < 1:
        _fail("train.checkpoint_every", f"{c.train.checkpoint_every} must be >= 1")
    if c.train.get("eval_every", 0) < 0:
        _fail("train.eval_every", f"{c.train.eval_every} must be >= 0 (0: only at the end)")
    ts = tuple(c.train.get("eval_timesteps", (0.5,)))
    if not ts or not all(0.0 < t <= 1.0 for t in ts):
        _fail("train.eval_timesteps", f"{ts}: give one or more timesteps in (0, 1]")
    return c


def patch_size(c: ml_collections.ConfigDict) -> tuple[int, int, int]:
    _, p = parse_variant(c.model.variant)
    return (c.model.patch_t, p, p)


def model_config(c: ml_collections.ConfigDict) -> DiTConfig:
    m = c.model
    text = build(
        TextEncoderConfig,
        m.text,
        "model.text",
        attn_impl=m.attn_impl,
        vocab_size=tokenizer.VOCAB_SIZE,
    )
    return build(
        DiTConfig,
        m,
        "model",
        config_only=("variant", "patch_t"),  # resolved into width/depth/heads and the patch
        patch=patch_size(c),
        channels=c.autoencoder.channels,
        text=text,
    )


def pipeline_config(c: ml_collections.ConfigDict) -> data_config.PipelineConfig:
    return data_config.PipelineConfig.from_sections(
        c.data.to_dict(),
        patch=patch_size(c),
        compression=tuple(c.autoencoder.compression),
        channels=c.autoencoder.channels,
        text_max_len=c.model.text.max_len,
        text_kind=c.model.text.kind,
        text_width=c.model.text.width,
    )


def flow_config(c: ml_collections.ConfigDict) -> FlowConfig:
    return build(FlowConfig, c.flow, "flow")


def sample_grid(c: ml_collections.ConfigDict, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The latent grid (T, H, W) sampled for a pixel (frames, height, width), checked: ValueError
    naming what the patch and the autoencoder cannot tile. One latent frame is an image, sampled
    as one temporal patch of model.patch_t frames (as trained) whatever the patch."""
    frames, height, width = shape
    pt, ph, pw = patch_size(c)
    ct, ch, cw = tuple(c.autoencoder.compression)
    if min(shape) < 1:
        raise ValueError(f"{tuple(shape)}: frames, height and width must be >= 1")
    lt = frames if ct == 1 else 1 + (frames - 1) // ct
    unit_h, unit_w = ph * ch, pw * cw
    if height % unit_h or width % unit_w:
        raise ValueError(
            f"{height}x{width} pixels: height and width must be multiples of {unit_h} and {unit_w} "
            f"(the patch {ph}x{pw} times the autoencoder's compression {ch}x{cw})"
        )
    if ct > 1 and (frames - 1) % ct:
        raise ValueError(
            f"{frames} frames: the causal autoencoder (time compression {ct}) decodes "
            f"1 + {ct} * k frames; ask for {1 + (frames - 1) // ct * ct}"
        )
    if lt > 1 and lt % pt:
        raise ValueError(
            f"{frames} frames are {lt} latent frames, not a whole number of temporal patches of "
            f"model.patch_t={pt} (one frame, an image, is always possible)"
        )
    return lt, height // ch, width // cw


def tokens_per_sample(c: ml_collections.ConfigDict, frames: int, height: int, width: int) -> int:
    pt, ph, pw = patch_size(c)
    comp = tuple(c.autoencoder.compression)
    lt = frames if comp[0] == 1 else 1 + (frames - 1) // comp[0]
    lt = pt if lt == 1 else lt  # an image: one temporal patch
    return math.prod((lt // pt, height // comp[1] // ph, width // comp[2] // pw))


# ----------------------------------------------------------------------------------------------------
# The causal VAE (config.kind == "vae", configs/vae.py)
# ----------------------------------------------------------------------------------------------------
def load_vae(c: ml_collections.ConfigDict, num_devices: int | None = None):
    """Validate a VAE config (configs/vae.py); returns it. Errors name the field."""
    # fields added after the first VAE checkpoints: their defaults, so older configs still load
    if "disc_weight" not in c.loss:
        c.loss.disc_weight = 0.0
    if "disc_start" not in c.loss:
        c.loss.disc_start = 0
    if "disc_adaptive" not in c.loss:
        c.loss.disc_adaptive = False
    if "disc" not in c:
        c.disc = ml_collections.ConfigDict(
            {
                "channels": 32,
                "layers": 3,
                "temporal_kernel": 1,
                "lr": 1e-4,
                "b1": 0.5,
                "b2": 0.9,
                "grad_clip": 1.0,
            }
        )
    # the network's, the objective's and the discriminator's own checks, naming the field
    build(LossConfig, c.loss, "loss")
    disc_config(c)
    vc = vae_config(c)
    d = c.data
    # fields added after the first VAE checkpoints: their defaults, so older configs still load
    if "source" not in d:
        d.source = "synthetic"
    if "pan_fraction" not in d:
        d.pan_fraction = 0.5
    if "records" not in d:
        d.records = ml_collections.ConfigDict({"path": ""})
    VAEDataConfig.from_section(d.to_dict()).validate(vc.compression)  # every data.* check
    if num_devices is not None:
        try:
            resolve_mesh_shape(dict(c.mesh), num_devices // max(c.mesh.get("dcn_data", 1), 1))
        except ValueError as e:
            raise ValueError(f"mesh: {e}") from None
    t = c.train
    for field in ("steps", "checkpoint_every", "log_every", "eval_every"):
        if t[field] < 1:
            _fail(f"train.{field}", f"{t[field]} must be >= 1")
    if t.stats_samples < 1:
        _fail("train.stats_samples", f"{t.stats_samples} must be >= 1")
    if not 0 <= t.video_samples <= d.eval_samples:
        _fail("train.video_samples", f"{t.video_samples} is not in [0, data.eval_samples]")
    return c


def vae_config(c: ml_collections.ConfigDict) -> VAEConfig:
    v = c.vae
    return build(
        VAEConfig,
        v,
        "vae",
        channel_mults=tuple(v.channel_mults),
        temporal_down=tuple(bool(x) for x in v.temporal_down),
        latent_mean=tuple(float(x) for x in v.get("latent_mean", ())),
        latent_std=tuple(float(x) for x in v.get("latent_std", ())),
    )


def disc_config(c: ml_collections.ConfigDict) -> DiscConfig:
    """The patch discriminator of a VAE config (network and optimizer), in the VAE's dtypes."""
    return build(DiscConfig, c.disc, "disc", dtype=c.vae.dtype, param_dtype=c.vae.param_dtype)

"""diffusers' `AutoencoderKLWan` (Wan2.1's VAE) <-> vdit's `CausalVAE3D(arch="wan")`, both ways.

    c = vae_config_from_diffusers(json.load(open("vae/config.json")))  # a VAE config, kind="vae"
    params, buffers = params_from_diffusers(tensors, c)                 # {name: array} -> nnx trees
    tensors = params_to_diffusers(params, buffers, c)                   # and back, tensor for tensor
    json.dump(diffusers_config(c, buffers), open("config.json", "w"))   # AutoencoderKLWan's

The module tree of vdit/models/wan_vae.py follows diffusers' names; a tensor's name differs where
nnx needs it to, by the rules of `diffusers_name`, and its layout by that of the layer:

    Conv3d weight  (O, I, kt, kh, kw)  <->  kernel (kt, kh, kw, I, O)
    Conv2d weight  (O, I, kh, kw)      <->  kernel (kh, kw, I, O)       (resample.1 <-> spatial)
    1x1 Conv2d     (O, I, 1, 1)        <->  kernel (I, O)               (attention to_qkv, proj)
    RMS norm gamma (C, 1, 1, 1) or (C, 1, 1) for the attention's  <->  scale (C,)
    biases         (C,)                <->  bias (C,)

The latent statistics are no tensors in diffusers: they are config.json's `latents_mean` /
`latents_std`, which the config carries (`vae.latent_mean`, `vae.latent_std`: the buffers' values
at creation) and `diffusers_config` writes from the buffers. Wan2.2's VAE (`is_residual`,
`patch_size`), encoder attention at other scales (`attn_scales`) and a decoder of another width
(`decoder_base_dim`) are refused by name. Nothing here imports torch or diffusers.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from vdit import configlib
from vdit.export.tensors import nest
from vdit.models import vae

CLASS = "AutoencoderKLWan"

# AutoencoderKLWan's settings and their defaults (the Wan2.1 VAE), as its __init__ has them
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
DEFAULTS: dict[str, Any] = {
    "base_dim": 96,
    "decoder_base_dim": None,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": list(WAN21_LATENTS_MEAN),
    "latents_std": list(WAN21_LATENTS_STD),
    "is_residual": False,
    "in_channels": 3,
    "out_channels": 3,
    "patch_size": None,
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 8,
}


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def _base_config() -> ml_collections.ConfigDict:
    """configs/vae.py's config (the VAE's training settings) of the checkout this vdit runs from."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "configs", "vae.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            "no configs/vae.py beside this vdit package to take the VAE's training settings from; "
            "pass base= (a config of kind 'vae', e.g. configs/wan_vae.py's)"
        )
    spec = importlib.util.spec_from_file_location("vdit_vae_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def vae_config_from_diffusers(
    cfg: Mapping[str, Any], base: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """The vdit VAE config (kind "vae", loaded) of the `AutoencoderKLWan` that config.json `cfg`
    describes: `base` (default configs/vae.py's) with its `vae` section replaced by the Wan
    architecture of `cfg` (missing settings take AutoencoderKLWan's defaults). ValueError names a
    setting vdit cannot represent."""
    if cfg.get("_class_name", CLASS) != CLASS:
        raise ValueError(f"config.json: _class_name {cfg['_class_name']!r}, expected {CLASS}")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in DEFAULTS)
    if unknown:
        raise ValueError(f"config.json: unknown settings {unknown} (not in {CLASS})")
    get = {**DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}

    def need(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"config.json: {key}={get[key]!r}: {what}")

    need("is_residual", not get["is_residual"], "Wan2.2's residual VAE is not supported")
    need("patch_size", get["patch_size"] is None, "Wan2.2's patchified VAE is not supported")
    need("attn_scales", not list(get["attn_scales"]), "encoder attention is mid-block only")
    need(
        "decoder_base_dim",
        get["decoder_base_dim"] in (None, get["base_dim"]),
        "vdit's decoder has the encoder's base width",
    )
    need("dropout", float(get["dropout"]) == 0.0, "vdit's VAE has no dropout")
    need(
        "out_channels",
        get["out_channels"] == get["in_channels"],
        f"vdit decodes as many channels as it encodes ({get['in_channels']})",
    )
    c = ml_collections.ConfigDict((base if base is not None else _base_config()).to_dict())
    old = c.get("vae", ml_collections.ConfigDict())
    c.kind = "vae"
    c.vae = ml_collections.ConfigDict(
        {
            "arch": "wan",
            "in_channels": int(get["in_channels"]),
            "latent_channels": int(get["z_dim"]),
            "base_channels": int(get["base_dim"]),
            "channel_mults": tuple(int(m) for m in get["dim_mult"]),
            "blocks_per_level": int(get["num_res_blocks"]),
            "temporal_down": tuple(bool(t) for t in get["temperal_downsample"]),
            **vae.WAN_FIXED,
            "dtype": old.get("dtype", "float32"),
            "param_dtype": old.get("param_dtype", "float32"),
            "latent_mean": tuple(float(x) for x in get["latents_mean"]),
            "latent_std": tuple(float(x) for x in get["latents_std"]),
        }
    )
    c = configlib.load(c)
    ct, cs, _ = configlib.vae_config(c).compression
    for key, have in (("scale_factor_temporal", ct), ("scale_factor_spatial", cs)):
        need(key, get[key] in (None, have), f"the architecture compresses by {have}")
    return c


def diffusers_config(c: ml_collections.ConfigDict, buffers: Mapping | None = None) -> dict:
    """The config.json of the `AutoencoderKLWan` equal to the VAE of config `c` (arch "wan"), its
    latents_mean / latents_std those of `buffers` (the model's latent statistics), or without them
    the config's (mean 0 and std 1 if it has none)."""
    cfg = configlib.vae_config(c)
    if cfg.arch != "wan":
        raise ValueError(f"vae.arch={cfg.arch!r}: only arch='wan' is an {CLASS}")
    z = cfg.latent_channels
    if buffers is not None:
        mean = np.asarray(buffers["latent_mean"], np.float64)
        std = np.asarray(buffers["latent_std"], np.float64)
    else:
        mean = np.asarray(cfg.latent_mean or (0.0,) * z, np.float64)
        std = np.asarray(cfg.latent_std or (1.0,) * z, np.float64)
    ct, cs, _ = cfg.compression
    return {
        "_class_name": CLASS,
        "base_dim": cfg.base_channels,
        "decoder_base_dim": None,
        "z_dim": z,
        "dim_mult": list(cfg.channel_mults),
        "num_res_blocks": cfg.blocks_per_level,
        "attn_scales": [],
        "temperal_downsample": list(cfg.temporal_down),
        "dropout": 0.0,
        "latents_mean": _shortest(mean),
        "latents_std": _shortest(std),
        "is_residual": False,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "patch_size": None,
        "scale_factor_temporal": ct,
        "scale_factor_spatial": cs,
    }


def _shortest(values: np.ndarray) -> list[float]:
    """Float32 values as the shortest decimals that read back to them (0.1, not 0.10000000149)."""
    return [float(str(np.float32(x))) for x in values]


# ----------------------------------------------------------------------------------------------
# Names and layouts
# ----------------------------------------------------------------------------------------------
_RENAMES = (
    (r"^encoder\.quant_conv\.", "quant_conv."),
    (r"^decoder\.post_quant_conv\.", "post_quant_conv."),
    (r"\.upsampler\.", ".upsamplers.0."),
    (r"\.spatial\.", ".resample.1."),
    (r"\.kernel$", ".weight"),
    (r"\.scale$", ".gamma"),
)


def diffusers_name(vdit_name: str) -> str:
    """A vdit parameter name (tree path joined by '.') -> its diffusers state-dict name."""
    for pattern, repl in _RENAMES:
        vdit_name = re.sub(pattern, repl, vdit_name)
    return vdit_name


def _layout(name: str, ndim: int) -> str:
    """How a vdit leaf is laid out in torch: conv3d | conv2d | conv1x1 | gamma3 | gamma2 | plain."""
    if name.endswith(".kernel"):
        return {5: "conv3d", 4: "conv2d", 2: "conv1x1"}[ndim]
    if name.endswith(".scale"):
        return "gamma2" if ".attentions." in name else "gamma3"
    return "plain"


def _to_torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "conv3d":
        kt, kh, kw, i, o = shape
        return (o, i, kt, kh, kw)
    if layout == "conv2d":
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if layout == "conv1x1":
        i, o = shape
        return (o, i, 1, 1)
    if layout == "gamma3":
        return (shape[0], 1, 1, 1)
    if layout == "gamma2":
        return (shape[0], 1, 1)
    return tuple(shape)


def _to_torch(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv3d":
        a = a.transpose(4, 3, 0, 1, 2)
    elif layout == "conv2d":
        a = a.transpose(3, 2, 0, 1)
    elif layout == "conv1x1":
        a = a.T[:, :, None, None]
    elif layout in ("gamma3", "gamma2"):
        a = a.reshape(_to_torch_shape(a.shape, layout))
    return np.ascontiguousarray(a)


def _from_torch(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv3d":
        a = a.transpose(2, 3, 4, 1, 0)
    elif layout == "conv2d":
        a = a.transpose(2, 3, 1, 0)
    elif layout == "conv1x1":
        a = a[:, :, 0, 0].T
    elif layout in ("gamma3", "gamma2"):
        a = a.reshape(-1)
    return np.ascontiguousarray(a)


def _abstract(c: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(params, buffers) of config `c`'s VAE as pure dicts of ShapeDtypeStructs (nothing computed)."""
    cfg = configlib.vae_config(c)
    if cfg.arch != "wan":
        raise ValueError(f"vae.arch={cfg.arch!r}: only arch='wan' maps to an {CLASS}")
    model = nnx.eval_shape(lambda: vae.CausalVAE3D(cfg, rngs=nnx.Rngs(0)))
    _, params, buffers = nnx.split(model, nnx.Param, vae.LatentStat)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)


def _flat(tree: Any) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(str(k.key) for k in path): leaf for path, leaf in flat}


def mapping(c: ml_collections.ConfigDict) -> dict[str, tuple[str, str, tuple, tuple]]:
    """{diffusers name: (vdit name, layout, vdit shape, diffusers shape)} of config `c`'s VAE, in
    vdit's name order."""
    params, _ = _abstract(c)
    out = {}
    for name, leaf in _flat(params).items():
        lay = _layout(name, len(leaf.shape))
        out[diffusers_name(name)] = (name, lay, tuple(leaf.shape), _to_torch_shape(leaf.shape, lay))
    return out


def _mismatch(what: str, missing, unknown, bad) -> None:
    if missing or unknown or bad:
        parts = [
            f"{len(items)} {kind} ({', '.join(items)})"
            for kind, items in (("missing", missing), ("unknown", unknown), ("mis-shaped", bad))
            if items
        ]
        raise ValueError(f"{what}: " + "; ".join(parts))


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------
def params_from_diffusers(
    tensors: Mapping[str, np.ndarray], c: ml_collections.ConfigDict
) -> tuple[dict, dict]:
    """(params, buffers): nnx pure dicts of numpy arrays (the config's param_dtype) of config
    `c`'s VAE from diffusers' state-dict tensors `tensors` (a mapping, read one tensor at a time;
    with a `shape(name)` method the shapes are checked before any data is read). The buffers are
    the config's latent statistics. Missing, unknown and mis-shaped tensors raise one ValueError
    naming all of them."""
    table = mapping(c)
    shape_of = getattr(tensors, "shape", lambda n: tuple(tensors[n].shape))
    missing = sorted(n for n in table if n not in tensors)
    unknown = sorted(n for n in tensors if n not in table)
    bad = [
        f"{n} is {tuple(shape_of(n))}, expected {table[n][3]}"
        for n in table
        if n in tensors and tuple(shape_of(n)) != table[n][3]
    ]
    _mismatch(f"the tensors do not match the {CLASS} of the config", missing, unknown, bad)
    cfg = configlib.vae_config(c)
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    flat = {
        v: _from_torch(np.asarray(tensors[d]), lay).astype(dtype, copy=False)
        for d, (v, lay, _, _) in table.items()
    }
    z = cfg.latent_channels
    buffers = {
        "latent_mean": np.asarray(cfg.latent_mean or (0.0,) * z, np.float32),
        "latent_std": np.asarray(cfg.latent_std or (1.0,) * z, np.float32),
    }
    return nest(flat), buffers


def params_to_diffusers(
    params: Mapping, buffers: Mapping | None, c: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
    """diffusers' state dict {name: numpy array, the parameters' dtype} of config `c`'s VAE from
    its nnx pure-dict `params` (host or device arrays, fetched one at a time). `buffers` (the
    latent statistics, which go to config.json: `diffusers_config`) are checked for shape. A tree
    that is not the config's model raises one ValueError naming its missing, unknown and
    mis-shaped leaves."""
    table = mapping(c)
    flat = _flat(params)
    by_vdit = {v: (d, lay, vs) for d, (v, lay, vs, _) in table.items()}
    missing = sorted(v for v in by_vdit if v not in flat)
    unknown = sorted(v for v in flat if v not in by_vdit)
    bad = [
        f"{v} is {tuple(flat[v].shape)}, expected {by_vdit[v][2]}"
        for v in by_vdit
        if v in flat and tuple(flat[v].shape) != by_vdit[v][2]
    ]
    if buffers is not None:
        z = configlib.vae_config(c).latent_channels
        for k in ("latent_mean", "latent_std"):
            if k not in buffers:
                missing.append(k)
            elif tuple(np.shape(buffers[k])) != (z,):
                bad.append(f"{k} is {tuple(np.shape(buffers[k]))}, expected {(z,)}")
    _mismatch(f"the parameters are not the {CLASS} of the config", missing, unknown, bad)
    return {d: _to_torch(np.asarray(flat[v]), lay) for d, (v, lay, _, _) in table.items()}


def parameter_count(c: ml_collections.ConfigDict) -> int:
    return sum(math.prod(s) for _, _, s, _ in mapping(c).values())

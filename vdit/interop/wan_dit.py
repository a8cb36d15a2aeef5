"""diffusers' `WanTransformer3DModel` (Wan2.1 text-to-video) <-> vdit's `VideoDiT`: config and tensors.

The two compute the same function (tests/test_wan_parity.py): vdit's block with `cross_norm="layer"`,
`qk_norm=True`, `mlp_dim=ffn_dim`, precomputed text of `text_dim`, and Wan's RoPE split. Tensors:

| diffusers                                              | vdit                             | layout          |
|--------------------------------------------------------|----------------------------------|-----------------|
| patch_embedding.weight (D, C, pt, ph, pw)              | patch_embed.kernel (pt*ph*pw*C, D)| conv -> (P, D)  |
| condition_embedder.time_embedder.linear_1/2            | time_fc1 / time_fc2              | weight.T        |
| condition_embedder.time_proj                           | time_proj                        | weight.T        |
| condition_embedder.text_embedder.linear_1/2            | text_proj / text_out             | weight.T        |
| blocks.i.scale_shift_table (1, 6, D)                   | blocks.modulation[i] (6, D)      | [0]             |
| blocks.i.attn1.{to_q,to_k,to_v,to_out.0}               | blocks.self_attn.{q,k,v,o}[i]    | weight.T        |
| blocks.i.attn1.norm_q/norm_k.weight                    | blocks.self_attn.norm_q/k.scale  |                 |
| blocks.i.attn2.*                                       | blocks.cross_attn.*              | as attn1        |
| blocks.i.norm2.weight / .bias                          | blocks.norm_cross.scale / .bias  |                 |
| blocks.i.ffn.net.0.proj / ffn.net.2                    | blocks.mlp.fc1 / fc2             | weight.T        |
| scale_shift_table (1, 2, D)                            | head_modulation (2, D)           | [0]             |
| proj_out                                               | head                             | weight.T        |

Linear weights are (out, in) in PyTorch and kernels (in, out) in vdit; a bias maps as it is. With
`model.scan_layers` (the default) vdit stacks the blocks' tensors on a leading layer axis; unrolled
they are `blocks.i.*`. Patch values are ordered (pt, ph, pw, C) on both sides (the unpatchify of
diffusers' output and vdit's `packing.patchify`), so the output projection needs only the
transpose. Timesteps: diffusers takes 1000 * t of vdit's t in [0, 1] (x_t = (1 - t) x0 + t noise,
velocity noise - x0 on both sides).

Not mapped (refused by name): the image-to-video parts (`image_dim`, `added_kv_proj_dim`), a
`qk_norm` other than "rms_norm_across_heads", `freq_dim` other than 256, `eps` other than 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import ml_collections
import numpy as np
from flax import nnx

from vdit import configlib
from vdit.models.dit import VideoDiT

CLASS = "WanTransformer3DModel"
# every config.json setting diffusers' WanTransformer3DModel takes (others are refused)
SETTINGS = {
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "qk_norm",
    "eps",
    "image_dim",
    "added_kv_proj_dim",
    "rope_max_seq_len",
    "pos_embed_seq_len",
}


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def config_from_diffusers(cfg: dict, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The vdit config of the model diffusers' config.json `cfg` describes: `base` (e.g.
    configs/wan.py) with the model's sizes and options replaced. ValueError names a setting vdit
    cannot represent."""
    if cfg.get("_class_name", CLASS) != CLASS:
        raise ValueError(f"config.json: _class_name {cfg['_class_name']!r}, expected {CLASS}")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in SETTINGS)
    if unknown:
        raise ValueError(f"config.json: unknown settings {unknown} (not in {CLASS})")
    get = lambda k, d: cfg.get(k, d)

    def need(key: str, ok: bool, what: str):
        if not ok:
            raise ValueError(f"config.json: {key}={cfg.get(key)!r}: {what}")

    need("image_dim", get("image_dim", None) is None, "image-to-video models are not supported")
    need(
        "added_kv_proj_dim",
        get("added_kv_proj_dim", None) is None,
        "image-to-video models are not supported",
    )
    need(
        "pos_embed_seq_len",
        get("pos_embed_seq_len", None) is None,
        "image-to-video models are not supported",
    )
    need(
        "qk_norm",
        get("qk_norm", "rms_norm_across_heads") == "rms_norm_across_heads",
        "vdit normalizes q and k over the whole width ('rms_norm_across_heads') only",
    )
    need("freq_dim", get("freq_dim", 256) == 256, "vdit's timestep embedding has 256 frequencies")
    need("eps", float(get("eps", 1e-6)) == 1e-6, "vdit's norms use eps 1e-6")
    patch = tuple(int(p) for p in get("patch_size", (1, 2, 2)))
    need("patch_size", len(patch) == 3 and patch[1] == patch[2], "expected (pt, p, p)")
    cin = int(get("in_channels", 16))
    cout = get("out_channels", None)
    need("out_channels", cout in (None, cin), f"vdit predicts as many channels as in ({cin})")
    heads, head_dim = int(get("num_attention_heads", 40)), int(get("attention_head_dim", 128))

    c = ml_collections.ConfigDict(base.to_dict())
    m = c.model
    m.variant = f"mu/{patch[1]}"  # the variant gives the spatial patch; the sizes are set
    m.patch_t = patch[0]
    m.width, m.heads, m.depth = heads * head_dim, heads, int(get("num_layers", 40))
    m.mlp_dim = int(get("ffn_dim", 13824))
    m.qk_norm = True
    m.cross_norm = "layer" if get("cross_attn_norm", True) else "none"
    m.pos_embed = "none"  # RoPE only
    m.text_pool = False  # no pooled text in the modulation
    m.text.kind = "precomputed"
    m.text.width = int(get("text_dim", 4096))
    c.autoencoder.channels = cin
    return c


def diffusers_config(c: ml_collections.ConfigDict) -> dict:
    """The config.json of the `WanTransformer3DModel` equal to the vdit config `c`'s DiT;
    ValueError names a setting diffusers' model lacks."""
    cfg = configlib.model_config(c)
    if not cfg.qk_norm:
        raise ValueError("model.qk_norm=False: Wan's attention always normalizes q and k")
    if cfg.cross_norm == "rms":
        raise ValueError(
            "model.cross_norm='rms': Wan's cross-attention norm is a LayerNorm ('layer') or none"
        )
    if cfg.pos_embed != "none":
        raise ValueError(
            f"model.pos_embed={cfg.pos_embed!r}: Wan has no absolute position embedding (RoPE only)"
        )
    if cfg.text_pool:
        raise ValueError("model.text_pool=True: Wan has no pooled text in its modulation")
    if cfg.text.kind != "precomputed":
        raise ValueError(
            f"model.text.kind={cfg.text.kind!r}: Wan takes precomputed text embeddings only"
        )
    if cfg.rope_theta != 10_000.0:
        raise ValueError(f"model.rope_theta={cfg.rope_theta}: Wan's RoPE base is 10000")
    return {
        "_class_name": CLASS,
        "patch_size": list(cfg.patch),
        "num_attention_heads": cfg.heads,
        "attention_head_dim": cfg.width // cfg.heads,
        "in_channels": cfg.channels,
        "out_channels": cfg.channels,
        "text_dim": cfg.text.width,
        "freq_dim": 256,
        "ffn_dim": cfg.mlp_hidden,
        "num_layers": cfg.depth,
        "cross_attn_norm": cfg.cross_norm == "layer",
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------
# (vdit name, diffusers name, layout) of the top level and of one block
_TOP = [
    ("patch_embed", "patch_embedding", "conv"),
    ("time_fc1", "condition_embedder.time_embedder.linear_1", "linear"),
    ("time_fc2", "condition_embedder.time_embedder.linear_2", "linear"),
    ("time_proj", "condition_embedder.time_proj", "linear"),
    ("text_proj", "condition_embedder.text_embedder.linear_1", "linear"),
    ("text_out", "condition_embedder.text_embedder.linear_2", "linear"),
    ("head", "proj_out", "linear"),
]
_BLOCK = [
    *[
        (f"{a}.{v}", f"{b}.{d}", "linear")
        for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for v, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))
    ],
    ("mlp.fc1", "ffn.net.0.proj", "linear"),
    ("mlp.fc2", "ffn.net.2", "linear"),
]
_BLOCK_PLAIN = [  # (vdit name, diffusers name, layout), whole names
    ("modulation", "scale_shift_table", "table"),
    *[
        (f"{a}.{n}.scale", f"{b}.{n}.weight", "copy")
        for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for n in ("norm_q", "norm_k")
    ],
    ("norm_cross.scale", "norm2.weight", "copy"),
    ("norm_cross.bias", "norm2.bias", "copy"),
]


def _entries(linear: list, plain: list) -> list[tuple[str, str, str]]:
    out = []
    for v, d, layout in linear:
        out += [(f"{v}.kernel", f"{d}.weight", layout), (f"{v}.bias", f"{d}.bias", "copy")]
    return out + plain


def abstract_params(c: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{vdit name: (shape, dtype)} of config `c`'s DiT parameters (no array is made)."""
    cfg = configlib.model_config(c)
    state = nnx.state(nnx.eval_shape(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return {
        ".".join(str(k) for k in path): (tuple(v.get_value().shape), v.get_value().dtype)
        for path, v in nnx.to_flat_state(state)
    }


def mapping(c: ml_collections.ConfigDict) -> list[tuple[str, int | None, str, str]]:
    """(vdit name, layer index into its leading axis or None, diffusers name, layout) of every
    tensor of config `c`'s model (checked: every vdit parameter is mapped exactly once)."""
    cfg = configlib.model_config(c)
    have = abstract_params(c)
    out = [(v, None, d, lay) for v, d, lay in _entries(_TOP, [])]
    out += [
        ("head_modulation", None, "scale_shift_table", "table"),
    ]
    for i in range(cfg.depth):
        for v, d, lay in _entries(_BLOCK, _BLOCK_PLAIN):
            if v.startswith("norm_cross.") and cfg.cross_norm != "layer":
                continue
            if cfg.scan_layers:
                out.append((f"blocks.{v}", i, f"blocks.{i}.{d}", lay))
            else:
                out.append((f"blocks.{i}.{v}", None, f"blocks.{i}.{d}", lay))
    mapped = {v for v, *_ in out}
    unmapped = sorted(set(have) - mapped)
    if unmapped or mapped - set(have):
        raise ValueError(
            f"this DiT config has parameters Wan lacks ({unmapped[:4]}) or lacks mapped ones "
            f"({sorted(mapped - set(have))[:4]}): set the options of configs/wan.py"
        )
    return out


def _to_diffusers_shape(shape: tuple[int, ...], layout: str, patch, channels) -> tuple[int, ...]:
    if layout == "linear":
        return tuple(reversed(shape))
    if layout == "conv":
        return (shape[1], channels, *patch)
    if layout == "table":
        return (1, *shape)
    return shape


def _to_vdit(a: np.ndarray, layout: str, vdit_shape: tuple[int, ...]) -> np.ndarray:
    if layout == "linear":
        return a.T
    if layout == "conv":  # (D, C, pt, ph, pw) -> (pt, ph, pw, C, D) -> (P, D)
        return a.transpose(2, 3, 4, 1, 0).reshape(vdit_shape)
    if layout == "table":
        return a[0]
    return a


def _to_diffusers(a: np.ndarray, layout: str, patch, channels) -> np.ndarray:
    if layout == "linear":
        return a.T
    if layout == "conv":
        return a.reshape(*patch, channels, a.shape[-1]).transpose(4, 3, 0, 1, 2)
    if layout == "table":
        return a[None]
    return a


def params_from_diffusers(
    tensors: Mapping[str, np.ndarray], c: ml_collections.ConfigDict, dtype=np.float32
) -> dict[str, np.ndarray]:
    """{vdit name: array (`dtype`)} of config `c`'s DiT from diffusers' tensors (a mapping; looked
    up one at a time, in its own order). Missing or unknown tensors and shape mismatches raise one
    ValueError that names them, before any tensor data is read."""
    table = _checked(tensors, c)
    shapes = abstract_params(c)
    out: dict[str, np.ndarray] = {}
    where = {d: (v, layer, lay) for v, layer, d, lay in table}
    for d in tensors:  # in the source's order (file by file)
        v, layer, lay = where[d]
        shape = shapes[v][0]
        if layer is None:
            out[v] = np.ascontiguousarray(_to_vdit(tensors[d], lay, shape), dtype=dtype)
        else:
            if v not in out:
                out[v] = np.empty(shape, dtype)
            out[v][layer] = _to_vdit(tensors[d], lay, shape[1:])
    return out


class Built:
    """One vdit tensor made from diffusers' on demand (`astype` or `np.asarray` makes it): its
    shape and dtype are known before, so a writer can plan files and hold one file's tensors."""

    def __init__(self, make: Callable[[], np.ndarray], shape: tuple[int, ...], dtype):
        self.make, self.shape, self.dtype = make, shape, np.dtype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return self.make().astype(dtype, copy=False)

    def __array__(self, dtype=None, copy=None):
        a = self.make()
        return a if dtype is None else a.astype(dtype)


def lazy_params_from_diffusers(
    tensors: Mapping[str, np.ndarray], c: ml_collections.ConfigDict, dtype=np.float32
) -> dict[str, Built]:
    """As `params_from_diffusers` (the same checks, first), but each vdit tensor is made when it
    is asked for, from its diffusers tensors (all of its layers): memory for one tensor."""
    table = _checked(tensors, c)
    shapes = abstract_params(c)
    parts: dict[str, list[tuple[int | None, str, str]]] = {}
    for v, layer, d, lay in table:
        parts.setdefault(v, []).append((layer, d, lay))

    def make(v: str) -> np.ndarray:
        shape = shapes[v][0]
        layer, d, lay = parts[v][0]
        if layer is None:  # a tensor of its own, not one layer of a stack
            return np.ascontiguousarray(_to_vdit(tensors[d], lay, shape), dtype=dtype)
        out = np.empty(shape, dtype)
        for layer, d, lay in parts[v]:
            out[layer] = _to_vdit(tensors[d], lay, shape[1:])
        return out

    return {v: Built(lambda v=v: make(v), shapes[v][0], dtype) for v in sorted(parts)}


def _checked(tensors: Mapping[str, np.ndarray], c: ml_collections.ConfigDict) -> list:
    """`mapping(c)`, after checking `tensors` against it (names and shapes, no data read)."""
    cfg = configlib.model_config(c)
    shapes = abstract_params(c)
    table = mapping(c)
    shape_of = getattr(tensors, "shape", lambda n: tuple(tensors[n].shape))
    missing = [d for _, _, d, _ in table if d not in tensors]
    unknown = sorted(set(tensors) - {d for _, _, d, _ in table})
    bad = []
    for v, layer, d, lay in table:
        if d in tensors:
            want = shapes[v][0][1:] if layer is not None else shapes[v][0]
            want = _to_diffusers_shape(want, lay, cfg.patch, cfg.channels)
            if tuple(shape_of(d)) != want:
                bad.append(f"{d} is {tuple(shape_of(d))}, expected {want}")
    if missing or unknown or bad:
        parts = []
        for what, items in (("missing", missing), ("unknown", unknown), ("mis-shaped", bad)):
            if items:
                more = f" and {len(items) - 4} more" if len(items) > 4 else ""
                parts.append(f"{len(items)} {what} ({', '.join(items[:4])}{more})")
        raise ValueError(
            f"the diffusers tensors do not match the {CLASS} of their config.json: "
            + "; ".join(parts)
        )
    return table


def params_to_diffusers(
    params: Mapping[str, np.ndarray] | Callable[[str], np.ndarray], c: ml_collections.ConfigDict
) -> tuple[dict[str, tuple[tuple[int, ...], str]], Callable[[str], np.ndarray]]:
    """diffusers' tensors of config `c`'s DiT from vdit's ({vdit name: array}, or a function of
    the name): ({diffusers name: (shape, vdit name)}, get(diffusers name) -> array), so that a
    writer makes one tensor at a time."""
    cfg = configlib.model_config(c)
    shapes = abstract_params(c)
    lookup = params if callable(params) else params.__getitem__
    where: dict[str, tuple[str, int | None, str]] = {}
    specs = {}
    for v, layer, d, lay in mapping(c):
        shape = shapes[v][0][1:] if layer is not None else shapes[v][0]
        specs[d] = (_to_diffusers_shape(shape, lay, cfg.patch, cfg.channels), v)
        where[d] = (v, layer, lay)

    def get(name: str) -> np.ndarray:
        v, layer, lay = where[name]
        a = lookup(v)
        a = np.asarray(a if layer is None else a[layer])  # one layer leaves the device
        return np.ascontiguousarray(_to_diffusers(a, lay, cfg.patch, cfg.channels))

    return specs, get

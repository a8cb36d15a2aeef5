"""The DiT as serialized StableHLO (`jax.export`): two programs for stated shapes, the parameters
alongside as safetensors, runnable without vdit's model code.

    forward.stablehlo   (params, x (B, L, P), positions (B, L, 3), segment_ids (B, L), t (B, L),
                         text (B, C) int32 [or (B, C, E) float32 embeddings],
                         text_segment_ids (B, C)) -> velocity (B, L, P)         B = 2 * batch
    step.stablehlo      (params, x (N, L, P), positions (N, L, 3), text (2N, C), text_segment_ids
                         (2N, C), t (), t_next (), cfg_scale ()) -> x at t_next  N = batch:
                         one Euler step of the sampler with classifier-free guidance, the first N
                         text rows the captions, the last N the empty caption
    stablehlo.json      platforms, shapes and dtypes of every input and output, and `params`:
                         the tensor names in the order the programs take them (a tuple, first
                         argument)

L is the token count of one sample of the stated (frames, height, width), P the patch size, C the
text length (model.text.max_len). The programs take the parameters in the export's dtype and cast
them to the model's parameter dtype inside. Attention is the block-skipping "chunked" JAX kernel on
every platform (portable; a TPU-only export keeps the config's choice, which may be splash).
`load(out)` reads the programs and parameters back with `jax.export.deserialize` and safetensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdit import configlib
from vdit.export import tensors
from vdit.train import load as loader

FORWARD = "forward.stablehlo"
STEP = "step.stablehlo"
MANIFEST = "stablehlo.json"
PLATFORMS = ("cpu", "tpu", "cuda")


def input_shapes(c, shape: Sequence[int], batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The activations of the forward program for `batch` samples of pixel `shape` (frames,
    height, width): B = 2 * batch rows (guided and unguided), L tokens each."""
    try:
        length = configlib.tokens_per_sample(c, *shape)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--shape={','.join(map(str, shape))}: {e}") from None
    patch_dim = int(np.prod(configlib.patch_size(c))) * c.autoencoder.channels
    b, n_text = 2 * batch, c.model.text.max_len
    text = (
        jax.ShapeDtypeStruct((b, n_text, c.model.text.width), jnp.float32)
        if c.model.text.kind == "precomputed"
        else jax.ShapeDtypeStruct((b, n_text), jnp.int32)
    )
    return {
        "x": jax.ShapeDtypeStruct((b, length, patch_dim), jnp.float32),
        "positions": jax.ShapeDtypeStruct((b, length, 3), jnp.int32),
        "segment_ids": jax.ShapeDtypeStruct((b, length), jnp.int32),
        "t": jax.ShapeDtypeStruct((b, length), jnp.float32),
        "text": text,
        "text_segment_ids": jax.ShapeDtypeStruct((b, n_text), jnp.int32),
    }


def _check_shape(c, shape: Sequence[int]) -> None:
    from vdit.diffusion.evaluate import EvalSetup

    setup = EvalSetup(
        patch=configlib.patch_size(c),
        channels=c.autoencoder.channels,
        flow_cfg=None,
        compression=tuple(c.autoencoder.compression),
    )
    try:
        grid = setup.latent_grid(tuple(shape))
    except ValueError as e:
        raise ValueError(f"--shape={','.join(map(str, shape))}: {e}") from None
    if any(g % p for g, p in zip(grid, setup.patch, strict=True)) or min(grid) < 1:
        raise ValueError(
            f"--shape={','.join(map(str, shape))}: its latent grid {grid} is not whole patches "
            f"{setup.patch} of the model"
        )


def programs(graphdef: nnx.GraphDef, like: dict) -> tuple[list[str], Callable, Callable]:
    """(parameter names in order, forward, guided step) of a model: functions of (a tuple of the
    parameters, in any dtype: cast to `like`'s, the activations)."""
    names = list(tensors.names(like))
    target = [a.dtype for a in tensors.names(like).values()]

    def model(flat):
        cast = {n: p.astype(d) for n, p, d in zip(names, flat, target, strict=True)}
        return nnx.merge(graphdef, tensors.unflatten(like, cast))

    def forward(flat, x, positions, segment_ids, t, text, text_segment_ids):
        return model(flat)(x, positions, segment_ids, t, text, text_segment_ids)

    def step(flat, x, positions, text, text_segment_ids, t, t_next, cfg_scale):
        n, length = x.shape[:2]
        seg = jnp.ones((2 * n, length), jnp.int32)
        tt = jnp.full((2 * n, length), t, jnp.float32)
        pos = jnp.concatenate([positions, positions])
        v = model(flat)(jnp.concatenate([x, x]), pos, seg, tt, text, text_segment_ids)
        v_c, v_u = v[:n], v[n:]
        return x + (t_next - t) * (v_u + cfg_scale * (v_c - v_u))

    return names, forward, step


def export(
    out: str,
    loaded: loader.Loaded,
    *,
    dtype,
    shape: Sequence[int],
    batch: int,
    platforms: Sequence[str] = PLATFORMS,
) -> dict:
    """Serialize the forward pass and the guided step of `loaded` (a DiT) into `out`; returns the
    manifest (written by process 0, like the programs)."""
    c = loaded.config.copy_and_resolve_references()
    if c.get("kind", "dit") != "dit":
        raise ValueError(
            "--format=stablehlo exports the DiT's denoiser; export a VAE as safetensors or orbax"
        )
    _check_shape(c, shape)
    if tuple(platforms) != ("tpu",):
        with c.unlocked():
            c.model.attn_impl = "chunked"  # one portable kernel for every platform
    fn, _ = loader.model_fn(c)
    graphdef = nnx.split(nnx.eval_shape(lambda: fn(nnx.Rngs(0))))[0]
    names, forward, step = programs(graphdef, loaded.params)
    flat = tuple(
        jax.ShapeDtypeStruct(a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype)
        for a in tensors.names(loaded.params).values()
    )
    act = input_shapes(c, shape, batch)
    n = batch
    half = lambda s: jax.ShapeDtypeStruct((n, *s.shape[1:]), s.dtype)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    step_args = (
        half(act["x"]),
        half(act["positions"]),
        act["text"],
        act["text_segment_ids"],
        scalar,
        scalar,
        scalar,
    )
    manifest = {
        "platforms": list(platforms),
        "jax_version": jax.__version__,
        "attn_impl": c.model.attn_impl,
        "params": names,
        "params_dtype": np.dtype(dtype).name,
        "programs": {},
    }
    for file, f, args, arg_names in (
        (FORWARD, forward, tuple(act.values()), list(act)),
        (
            STEP,
            step,
            step_args,
            ["x", "positions", "text", "text_segment_ids", "t", "t_next", "cfg_scale"],
        ),
    ):
        try:
            exp = jax.export.export(jax.jit(f), platforms=tuple(platforms))(flat, *args)
        except Exception as e:  # a platform jax cannot lower this program for: say which
            raise ValueError(
                f"--platforms={','.join(platforms)}: lowering for them failed "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); give fewer platforms"
            ) from None
        if jax.process_index() == 0:
            with open(os.path.join(out, file), "wb") as fh:
                fh.write(exp.serialize())
        manifest["programs"][file] = {
            "inputs": {k: _describe(a) for k, a in zip(arg_names, args, strict=True)},
            "outputs": [_describe(a) for a in exp.out_avals],
            "calling_convention_version": exp.calling_convention_version,
            "platforms": list(exp.platforms),
        }
    if jax.process_index() == 0:
        with open(os.path.join(out, MANIFEST), "w") as fh:
            json.dump(manifest, fh, indent=1)
    return manifest


def _describe(a) -> dict:
    return {"shape": list(a.shape), "dtype": np.dtype(a.dtype).name}


def load(out: str | os.PathLike) -> tuple[dict, tuple[np.ndarray, ...], dict]:
    """(the manifest, the parameters in the programs' order, {file: jax.export.Exported}) of a
    StableHLO export: `exported[FORWARD].call(params, x, ...)` runs the model."""
    out = os.fspath(out)
    with open(os.path.join(out, MANIFEST)) as f:
        manifest = json.load(f)
    by_name = {}
    for arrays in tensors.read(out):  # checksummed safetensors
        by_name.update(arrays)
    params = tuple(by_name[n] for n in manifest["params"])
    exported = {}
    for file in manifest["programs"]:
        with open(os.path.join(out, file), "rb") as f:
            exported[file] = jax.export.deserialize(bytearray(f.read()))
    return manifest, params, exported

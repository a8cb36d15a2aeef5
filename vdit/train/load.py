"""One loader for inference: a work directory's checkpoint or an export -> (config, model), nothing else.

    loaded = load(workdir)                  # latest step, the config's EMA choice, first local device
    loaded = load(workdir, step=500, ema=False)
    loaded = load("exports/default")        # a directory written by `vdit export` (BUILD.md)
    video = generate(loaded.graphdef, loaded.params, ...)   # or loaded.model() for an nnx module

It reads the config stored with the checkpoint (or the export's config.json), builds the model's
abstract parameters from it (the DiT or the VAE, by `config.kind`), and restores only those arrays
(`ema` or `params`, and the VAE's latent statistics): no optimizer state is read or built, no
trainer is made. It serves `vdit sample`, `vdit eval`, `vdit encode`, `vdit export` and the sample
grids; `restore_export` also gives `train.init_from` its starting parameters. An export is read with
safetensors, json and orbax only: nothing on any load path unpickles.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from vdit import configlib
from vdit.export import tensors
from vdit.models import vae
from vdit.models.dit import VideoDiT
from vdit.parallel.mesh import MESH_AXES, make_mesh
from vdit.parallel.sharding import param_shardings
from vdit.train.checkpoint import STATE, read_config_and_step
from vdit.train.state import ModelFn, split_model, with_shardings


def model_fn(c: ml_collections.ConfigDict) -> tuple[ModelFn, type | None]:
    """The constructor (rngs -> module) of a loaded config's model, and its buffer variable type
    (the VAE's latent statistics; None for the DiT)."""
    if c.get("kind", "dit") == "vae":
        cfg = configlib.vae_config(c)
        return (lambda rngs: vae.CausalVAE3D(cfg, rngs=rngs)), vae.LatentStat
    cfg = configlib.model_config(c)
    return (lambda rngs: VideoDiT(cfg, rngs=rngs)), None


@dataclasses.dataclass
class Loaded:
    """A model read out of a checkpoint: its config, graph and parameters (EMA or raw)."""

    config: ml_collections.ConfigDict  # the checkpoint's config, loaded (validated)
    graphdef: nnx.GraphDef
    params: dict  # pure dict of arrays
    buffers: dict | None  # the VAE's latent statistics (None for the DiT)
    step: int
    ema: bool = True  # whether `params` are the EMA parameters (else the raw ones)

    def model(self) -> nnx.Module:
        if self.buffers is None:
            return nnx.merge(self.graphdef, self.params)
        return nnx.merge(self.graphdef, self.params, self.buffers)


EXPORT = "export.json"  # what an export directory holds: format, step, source, dtype, tensors
EXPORT_CONFIG = "config.json"  # the config of the exported model (the checkpoint's, as JSON)
ORBAX_PARAMS = "params"  # the orbax item of a params-only export


def load(
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    ema: bool | None = None,
    devices=None,
    shard: bool = False,
) -> Loaded:
    """The model of WORKDIR/checkpoints at `step` (default: the latest) with its EMA (`ema=True`)
    or raw parameters, replicated over `devices` (default: the first local device). `ema=None`
    takes the config's choice (`sample.use_ema` of a DiT; the EMA for the VAE). `shard=True` lays
    the parameters out over `devices` (default: every device of every process) on the `fsdp` axis
    by the rules table instead, so that no host need hold the whole model (`vdit export`).

    WORKDIR may also be a directory written by `vdit export` (safetensors or orbax format): its
    one set of parameters is loaded (a `step` or `ema` other than the exported one is refused)."""
    if is_export(workdir):
        return _load_export(os.fspath(workdir), step, ema, devices)
    directory = os.path.join(os.fspath(workdir), "checkpoints")
    c, step = read_config(workdir, step)
    if ema is None:
        ema = bool(c.sample.use_ema) if "sample" in c else True
    mesh = _mesh(devices, shard)
    graphdef, params_target, buffers_target = model_targets(c, mesh)
    target: dict[str, Any] = {"ema" if ema else "params": params_target}
    if buffers_target is not None:
        target["stats"] = buffers_target
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(os.path.abspath(directory), str(step), STATE),
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ),
    )
    return Loaded(
        config=c,
        graphdef=graphdef,
        params=restored["ema" if ema else "params"],
        buffers=restored.get("stats"),
        step=step,
        ema=ema,
    )


def read_config(
    workdir: str | os.PathLike, step: int | None = None
) -> tuple[ml_collections.ConfigDict, int]:
    """(the config stored with WORKDIR/checkpoints at `step`, loaded; the step): no array is read,
    so a command can check its arguments against the model before loading it."""
    directory = os.path.join(os.fspath(workdir), "checkpoints")
    stored, step = read_config_and_step(directory, step)
    return configlib.load(ml_collections.ConfigDict(stored)), step


def model_targets(c: ml_collections.ConfigDict, mesh: Mesh) -> tuple[nnx.GraphDef, dict, Any]:
    """(graphdef, abstract params, abstract buffers or None) of config `c`'s model laid out on
    `mesh` by the rules table (the config's mesh section is set to `mesh`'s shape)."""
    with c.unlocked():  # the config of the model as loaded: laid out over `mesh`
        c.mesh = ml_collections.ConfigDict({a: int(mesh.shape[a]) for a in MESH_AXES})
    rules = tuple(tuple(r) for r in c.sharding.rules)
    fn, buffers = model_fn(c)
    graphdef, abstract_params, abstract_buffers = split_model(
        nnx.eval_shape(lambda: fn(nnx.Rngs(0))), buffers
    )
    params = _abstract(abstract_params, rules, mesh)
    return graphdef, params, None if buffers is None else _abstract(abstract_buffers, rules, mesh)


# ----------------------------------------------------------------------------------------------
# Exports (vdit/export/, BUILD.md "Exporting checkpoints")
# ----------------------------------------------------------------------------------------------
def is_export(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), EXPORT))


def read_export(out: str | os.PathLike) -> tuple[dict, ml_collections.ConfigDict]:
    """(the export's description, its model's config, loaded) of an export directory."""
    out = os.fspath(out)
    if not os.path.isdir(out):
        raise FileNotFoundError(f"{out} does not exist; give a directory written by `vdit export`")
    try:
        with open(os.path.join(out, EXPORT)) as f:
            meta = json.load(f)
        with open(os.path.join(out, EXPORT_CONFIG)) as f:
            stored = json.load(f)
        fmt = meta["format"]
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{out}: no {os.path.basename(e.filename)}; give a directory written by `vdit export`"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{out}: unreadable export description ({e}); export again") from None
    if fmt not in ("safetensors", "orbax", "stablehlo"):
        raise ValueError(f"{out}/{EXPORT}: unknown format {fmt!r}; export again")
    # an export serves inference and init_from: its data section need not name data that exists
    return meta, configlib.load(ml_collections.ConfigDict(stored), plan_only=True)


def restore_export(
    out: str | os.PathLike, params_target: dict, buffers_target=None, *, what: str = "the config"
) -> tuple:
    """(params, buffers or None) of an export directory laid out as the targets say (abstract
    arrays with shardings: any mesh; floating tensors cast to the targets' dtypes). The tensors
    are checked against the targets first: a config whose model does not match them, a missing,
    truncated or altered file each raise naming it (`what` names where the targets come from)."""
    out = os.fspath(out)
    meta, _ = read_export(out)
    targets = {"params": params_target}
    if buffers_target is not None:
        targets["buffers"] = buffers_target
    flat = {n: t for part in targets.values() for n, t in tensors.names(part).items()}
    if meta["format"] == "orbax":
        stored = {n: tuple(s) for n, s in meta.get("tensors", {}).items()}
        expected = {n: tuple(t.shape) for n, t in flat.items()}
        if stored != expected:
            bad = sorted(set(stored) ^ set(expected)) or sorted(
                n for n in stored if stored[n] != expected[n]
            )
            raise ValueError(
                f"{out}: its tensors do not match the model {what} describes (first: {bad[0]}, "
                f"{stored.get(bad[0])} exported vs {expected.get(bad[0])}); export again"
            )
        target = {"params": params_target}
        if buffers_target is not None:
            target["stats"] = buffers_target
        restored = ocp.PyTreeCheckpointer().restore(
            os.path.join(os.path.abspath(out), ORBAX_PARAMS),
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
            ),
        )
        return restored["params"], restored.get("stats")
    tensors.check(out, {n: tuple(t.shape) for n, t in flat.items()}, what)
    placed = {}
    for arrays in tensors.read(out):
        for n, host in arrays.items():
            t = flat[n]
            host = host.astype(t.dtype) if tensors.floating(host.dtype) else host
            placed[n] = jax.make_array_from_callback(t.shape, t.sharding, lambda i, h=host: h[i])
    params = tensors.unflatten(params_target, placed)
    return params, None if buffers_target is None else tensors.unflatten(buffers_target, placed)


def _load_export(out: str, step: int | None, ema: bool | None, devices) -> Loaded:
    meta, c = read_export(out)
    if meta["format"] == "stablehlo":
        raise ValueError(
            f"{out} is a StableHLO export (a compiled program, BUILD.md); load it with "
            "vdit.export.stablehlo.load, or export safetensors for `vdit sample`"
        )
    if step is not None and int(step) != int(meta["step"]):
        raise FileNotFoundError(f"{out} is an export of step {meta['step']}, not of step {step}")
    if ema is not None and ema != (meta["params"] == "ema"):
        raise ValueError(
            f"{out} holds the {meta['params']} parameters, not the "
            f"{'ema' if ema else 'raw'} ones; export those from the work directory"
        )
    graphdef, params_target, buffers_target = model_targets(c, _mesh(devices, False))
    what = f"{out}/{EXPORT_CONFIG}"
    params, buffers = restore_export(out, params_target, buffers_target, what=what)
    return Loaded(c, graphdef, params, buffers, int(meta["step"]), meta["params"] == "ema")


def _mesh(devices, shard: bool) -> Mesh:
    if shard:
        devices = list(devices or jax.devices())
        return make_mesh({a: len(devices) if a == "fsdp" else 1 for a in MESH_AXES}, devices)
    return _replicated_mesh(list(devices or jax.local_devices()[:1]))


def _replicated_mesh(devices: list) -> Mesh:
    return make_mesh({a: len(devices) if a == "data" else 1 for a in MESH_AXES}, devices)


def _abstract(abstract_state: nnx.State, rules, mesh: Mesh) -> dict:
    shardings = param_shardings(abstract_state, rules, mesh)
    return with_shardings(nnx.to_pure_dict(abstract_state), shardings)


@functools.lru_cache(maxsize=4)
def cached(workdir: str, step: int | None) -> Loaded:
    """`load(workdir, step)`, once per (workdir, step) in a process (decoders of sample grids)."""
    return load(workdir, step)

"""One loader for inference: a work directory's checkpoint -> (config, model), nothing else.

    loaded = load(workdir)                  # latest step, the config's EMA choice, first local device
    loaded = load(workdir, step=500, ema=False)
    video = generate(loaded.graphdef, loaded.params, ...)   # or loaded.model() for an nnx module

It reads the config stored with the checkpoint, builds the model's abstract parameters from it (the
DiT or the VAE, by `config.kind`), and restores only those arrays (`ema` or `params`, and the VAE's
latent statistics) from the checkpoint's state: no optimizer state is read or built, no trainer is
made. It serves `vdit sample`, `vdit eval`, `vdit encode` and the sample grids.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from vdit import configlib
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

    def model(self) -> nnx.Module:
        if self.buffers is None:
            return nnx.merge(self.graphdef, self.params)
        return nnx.merge(self.graphdef, self.params, self.buffers)


def load(
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    ema: bool | None = None,
    devices=None,
) -> Loaded:
    """The model of WORKDIR/checkpoints at `step` (default: the latest) with its EMA (`ema=True`)
    or raw parameters, replicated over `devices` (default: the first local device). `ema=None`
    takes the config's choice (`sample.use_ema` of a DiT; the EMA for the VAE)."""
    directory = os.path.join(os.fspath(workdir), "checkpoints")
    c, step = read_config(workdir, step)
    if ema is None:
        ema = bool(c.sample.use_ema) if "sample" in c else True
    devices = list(devices or jax.local_devices()[:1])
    mesh = _replicated_mesh(devices)
    with c.unlocked():  # the config of the model as loaded: replicated over `devices`
        c.mesh = ml_collections.ConfigDict({a: int(mesh.shape[a]) for a in MESH_AXES})
    rules = tuple(tuple(r) for r in c.sharding.rules)
    fn, buffers = model_fn(c)
    graphdef, abstract_params, abstract_buffers = split_model(
        nnx.eval_shape(lambda: fn(nnx.Rngs(0))), buffers
    )
    target: dict[str, Any] = {
        "ema" if ema else "params": _abstract(abstract_params, rules, mesh),
    }
    if buffers is not None:
        target["stats"] = _abstract(abstract_buffers, rules, mesh)
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
    )


def read_config(
    workdir: str | os.PathLike, step: int | None = None
) -> tuple[ml_collections.ConfigDict, int]:
    """(the config stored with WORKDIR/checkpoints at `step`, loaded; the step): no array is read,
    so a command can check its arguments against the model before loading it."""
    directory = os.path.join(os.fspath(workdir), "checkpoints")
    stored, step = read_config_and_step(directory, step)
    return configlib.load(ml_collections.ConfigDict(stored)), step


def _replicated_mesh(devices: list) -> Mesh:
    return make_mesh({a: len(devices) if a == "data" else 1 for a in MESH_AXES}, devices)


def _abstract(abstract_state: nnx.State, rules, mesh: Mesh) -> dict:
    shardings = param_shardings(abstract_state, rules, mesh)
    return with_shardings(nnx.to_pure_dict(abstract_state), shardings)


@functools.lru_cache(maxsize=4)
def cached(workdir: str, step: int | None) -> Loaded:
    """`load(workdir, step)`, once per (workdir, step) in a process (decoders of sample grids)."""
    return load(workdir, step)

"""The train state every model shares: optimizer, sharded layout, sharded init, the guarded update.

A state is a plain dict of arrays, so orbax saves it as is and every leaf has an explicit sharding:

    params, opt_state, ema, step, skipped    the trained model, its optax state and EMA, counters
    stats                                    the model's buffers (non-trainable variables), if any
    {name}_params, {name}_opt_state          each auxiliary trained model (the VAE's discriminator)

`ShardedState` builds it for one model (and its auxiliaries) from the model's constructor, the
optimizer, the mesh and the rules table: the abstract state, the sharding of every leaf, the abstract
sharded state that restores onto any mesh, and the initial state placed directly in its layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vdit import configlib
from vdit.parallel.sharding import Rules, param_shardings

State = dict[str, Any]
ModelFn = Callable[[nnx.Rngs], nnx.Module]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The config's `optim` section, and the run length the schedule decays over."""

    lr: float  # peak learning rate
    warmup_steps: int  # linear warmup
    min_lr_ratio: float  # final lr = min_lr_ratio * lr (cosine)
    weight_decay: float  # decoupled, on weight matrices only (`decay_mask`)
    b1: float
    b2: float
    grad_clip: float  # global-norm clip
    ema_decay: float  # EMA of parameters
    total_steps: int  # train.steps

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> OptimConfig:
        return configlib.build(cls, c.optim, "optim", total_steps=c.train.steps)


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


# Logical axes that index a stack of vectors, not a dimension of a weight matrix: the scanned blocks
# (`nnx.vmap`'s "layers") and the rows of an adaLN modulation table (shift, scale, gate, ...).
STACK_AXES = frozenset({"layers", "modulation"})


def is_matrix(names: tuple[str | None, ...] | None, shape: tuple[int, ...]) -> bool:
    """Whether a parameter of these logical axis names (None: unnamed) and shape is a weight matrix
    (a kernel, an embedding table): two or more axes besides STACK_AXES. Biases, norm scales and
    modulation tables are vectors, stacked or not."""
    if names is None:
        return len(shape) >= 2
    return sum(n not in STACK_AXES for n in names) >= 2


def decay_mask(model_fn: ModelFn) -> dict:
    """{path: bool} of the model's parameters, as the train state holds them
    (`nnx.to_pure_dict`): True for the weight matrices weight decay applies to. Decided by logical
    axes, so a scanned model (blocks stacked on "layers") and an unrolled one decay the same
    parameters."""
    abstract = nnx.state(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))), nnx.Param)
    out: dict = {}
    for path, var in nnx.to_flat_state(abstract):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = is_matrix(var.get_metadata().get("out_sharding"), var.get_value().shape)
    return out


def make_optimizer(cfg: OptimConfig, model_fn: ModelFn) -> optax.GradientTransformation:
    """AdamW on `lr_schedule`, global-norm clipping, weight decay on the weight matrices of the
    model `model_fn` builds (`decay_mask`)."""
    schedule = lr_schedule(cfg)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(model_fn),
        ),
    )


def learning_rate(cfg: OptimConfig, step: int) -> float:
    return float(lr_schedule(cfg)(step))


def guarded_update(
    tx: optax.GradientTransformation, ema_decay: float, state: State, grads, loss: jax.Array
) -> tuple[State, jax.Array, jax.Array]:
    """The optimizer and EMA update of `state` ("params", "opt_state", "ema", "step", "skipped";
    other entries are kept). A non-finite loss or gradient norm changes nothing but the step and
    skipped counters. Returns (new state, gradient norm, finite)."""
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], params)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = {
        **state,
        "params": keep(params, state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "ema": keep(ema, state["ema"]),
        "step": state["step"] + 1,
        "skipped": state["skipped"] + (~ok).astype(jnp.int32),
    }
    return new_state, grad_norm, ok


def split_model(model: nnx.Module, buffers: type | None = None) -> tuple:
    """(graphdef, params, buffers) of a model: its nnx.Param variables and, with `buffers` (an
    nnx.Variable type), those non-trainable ones apart (None without)."""
    if buffers is None:
        graphdef, params = nnx.split(model)
        return graphdef, params, None
    return nnx.split(model, nnx.Param, buffers)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Abstract arrays that carry their sharding: restore targets for any mesh, compile inputs."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def place(tree: Any, shardings: Any) -> Any:
    """Host values laid out shard by shard (each device receives only its own slice)."""

    def put(a, sharding):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(put, tree, shardings)


@dataclasses.dataclass
class Aux:
    """An auxiliary model trained next to the main one with its own optimizer (no EMA)."""

    model_fn: ModelFn  # rngs -> module (seeded by the caller's own stream)
    tx: optax.GradientTransformation
    seed: int


class ShardedState:
    """The state of one trained model (and its auxiliaries) on a mesh, sharded by the rules table.

    `host_init=True` builds the initial model eagerly and places its values shard by shard (for
    models whose initializers draw on the host); otherwise the whole initial state is computed under
    `jax.jit` directly in its sharded layout (no full copy on one device).
    """

    def __init__(
        self,
        model_fn: ModelFn,
        tx: optax.GradientTransformation,
        mesh: Mesh,
        rules: Rules,
        seed: int,
        *,
        buffers: type | None = None,
        aux: dict[str, Aux] | None = None,
        host_init: bool = False,
    ):
        self.model_fn, self.tx, self.mesh, self.rules, self.seed = model_fn, tx, mesh, rules, seed
        self.buffers, self.aux, self.host_init = buffers, dict(aux or {}), host_init
        abstract = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
        self.graphdef, abstract_params, abstract_buffers = split_model(abstract, buffers)
        self.param_shardings = param_shardings(abstract_params, rules, mesh)
        self.buffer_shardings = (
            None if buffers is None else param_shardings(abstract_buffers, rules, mesh)
        )
        self.aux_graphdefs, self.aux_shardings = {}, {}
        for name, a in self.aux.items():
            graphdef, abstract_aux, _ = split_model(
                nnx.eval_shape(lambda a=a: a.model_fn(nnx.Rngs(0)))
            )
            self.aux_graphdefs[name] = graphdef
            self.aux_shardings[name] = param_shardings(abstract_aux, rules, mesh)
        self.abstract = jax.eval_shape(self._init)
        self.shardings = self._state_shardings()

    # --- layout -----------------------------------------------------------------------------------
    def _state_shardings(self) -> State:
        replicated = NamedSharding(self.mesh, P())
        opt = lambda tx, abstract_opt, shardings: optax.tree_utils.tree_map_params(
            tx, lambda _, s: s, abstract_opt, shardings, transform_non_params=lambda _: replicated
        )
        out = {
            "params": self.param_shardings,
            "opt_state": opt(self.tx, self.abstract["opt_state"], self.param_shardings),
            "ema": self.param_shardings,
            "step": replicated,
            "skipped": replicated,
        }
        if self.buffers is not None:
            out["stats"] = self.buffer_shardings
        for name, a in self.aux.items():
            sh = self.aux_shardings[name]
            out[f"{name}_params"] = sh
            out[f"{name}_opt_state"] = opt(a.tx, self.abstract[f"{name}_opt_state"], sh)
        return out

    def abstract_sharded(self) -> State:
        """The abstract state with every leaf's sharding: restores onto this mesh, whatever mesh saved."""
        return with_shardings(self.abstract, self.shardings)

    # --- init -------------------------------------------------------------------------------------
    def _parts(self) -> tuple[dict, dict | None, dict[str, dict]]:
        """Pure dicts of the initial (params, buffers, {aux name: params})."""
        _, params, buffers = split_model(self.model_fn(nnx.Rngs(self.seed)), self.buffers)
        aux = {
            name: nnx.to_pure_dict(nnx.state(a.model_fn(nnx.Rngs(a.seed)), nnx.Param))
            for name, a in self.aux.items()
        }
        return nnx.to_pure_dict(params), None if buffers is None else nnx.to_pure_dict(buffers), aux

    def _assemble(self, params, buffers, aux, opt_init, copy, counter) -> State:
        state = {
            "params": params,
            "opt_state": opt_init(self.tx, params, "opt_state"),
            "ema": copy(params),
            "step": counter("step"),
            "skipped": counter("skipped"),
        }
        if buffers is not None:
            state["stats"] = buffers
        for name, a in self.aux.items():
            state[f"{name}_params"] = aux[name]
            state[f"{name}_opt_state"] = opt_init(a.tx, aux[name], f"{name}_opt_state")
        return state

    def _init(self, params: dict | None = None, buffers: dict | None = None) -> State:
        fresh_params, fresh_buffers, aux = self._parts()
        return self._assemble(
            fresh_params if params is None else params,
            fresh_buffers if buffers is None else buffers,
            aux,
            opt_init=lambda tx, p, _: tx.init(p),
            copy=lambda p: jax.tree.map(jnp.copy, p),
            counter=lambda _: jnp.zeros((), jnp.int32),
        )

    def init(self, params: dict | None = None, buffers: dict | None = None) -> State:
        """The initial state in its sharded layout. `params` (and `buffers`), given in that layout
        (`model_targets`), replace the model's initial values: a start from exported parameters
        (`train.init_from`: optimizer state fresh, EMA = params, step 0; auxiliary models
        initialised as always)."""
        if not self.host_init:
            return jax.jit(self._init, out_shardings=self.shardings)(params, buffers)
        sh = self.shardings
        fresh_params, fresh_buffers, aux = self._parts()
        if params is None:
            params = place(fresh_params, sh["params"])
        if buffers is None and fresh_buffers is not None:
            buffers = place(fresh_buffers, sh["stats"])
        aux = {name: place(p, sh[f"{name}_params"]) for name, p in aux.items()}
        return self._assemble(
            params,
            buffers,
            aux,
            opt_init=lambda tx, p, key: jax.jit(tx.init, out_shardings=sh[key])(p),
            copy=lambda p: jax.jit(lambda q: jax.tree.map(jnp.copy, q), out_shardings=sh["ema"])(p),
            counter=lambda key: jax.device_put(jnp.zeros((), jnp.int32), sh[key]),
        )

    def model_targets(self) -> tuple[dict, dict | None]:
        """(params, buffers or None) as abstract arrays with their shardings: restore targets."""
        buffers = None
        if self.buffers is not None:
            buffers = with_shardings(self.abstract["stats"], self.buffer_shardings)
        return with_shardings(self.abstract["params"], self.param_shardings), buffers

    # --- models -----------------------------------------------------------------------------------
    def model(self, params: dict, buffers: dict | None = None) -> nnx.Module:
        """The model of `params` (state["params"] or state["ema"]) and its buffers (state["stats"])."""
        return (
            nnx.merge(self.graphdef, params)
            if buffers is None
            else nnx.merge(self.graphdef, params, buffers)
        )

    def aux_model(self, name: str, params: dict) -> nnx.Module:
        return nnx.merge(self.aux_graphdefs[name], params)

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract["params"]))

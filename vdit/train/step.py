"""The train state and the pure train step.

The state is a plain dict of arrays (params and EMA as pure dicts, optax state, step and skipped-step
counters), so orbax saves it as is and every leaf has an explicit sharding. Randomness is a function of
(seed, step): a resumed run draws exactly the numbers an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vdit import configlib
from vdit.diffusion import flow
from vdit.models.dit import DiTConfig, VideoDiT
from vdit.parallel.mesh import MESH_AXES, make_mesh
from vdit.parallel.sharding import Rules, activation_sharding, logical_to_spec, param_shardings

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW on `lr_schedule`, global-norm clipping, weight decay on matrices only."""
    schedule = lr_schedule(cfg)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            weight_decay=cfg.weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
        ),
    )


def learning_rate(cfg: OptimConfig, step: int) -> float:
    return float(lr_schedule(cfg)(step))


@dataclasses.dataclass
class Trainer:
    """Everything static about a run: the model's graph, the optimizer, the shardings."""

    model_cfg: DiTConfig
    flow_cfg: flow.FlowConfig
    optim_cfg: OptimConfig
    mesh: Mesh
    rules: Rules
    seed: int = 0

    def __post_init__(self):
        self.tx = make_optimizer(self.optim_cfg)
        abstract_model = nnx.eval_shape(lambda: VideoDiT(self.model_cfg, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_params = nnx.split(abstract_model)
        self.param_shardings = param_shardings(abstract_params, self.rules, self.mesh)
        self.abstract_state = jax.eval_shape(self._init)
        self.state_shardings = self._state_shardings()

    # --- state ------------------------------------------------------------------------------
    def _init(self) -> State:
        model = VideoDiT(self.model_cfg, rngs=nnx.Rngs(self.seed))
        params = nnx.to_pure_dict(nnx.state(model))
        return {
            "params": params,
            "opt_state": self.tx.init(params),
            "ema": jax.tree.map(jnp.copy, params),
            "step": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32),
        }

    def _state_shardings(self) -> State:
        replicated = NamedSharding(self.mesh, P())
        opt = optax.tree_utils.tree_map_params(
            self.tx,
            lambda _, s: s,
            self.abstract_state["opt_state"],
            self.param_shardings,
            transform_non_params=lambda _: replicated,
        )
        return {
            "params": self.param_shardings,
            "opt_state": opt,
            "ema": self.param_shardings,
            "step": replicated,
            "skipped": replicated,
        }

    def init_state(self) -> State:
        """Initialize directly into the sharded layout (no full copy on one device)."""
        return jax.jit(self._init, out_shardings=self.state_shardings)()

    def abstract_sharded_state(self) -> State:
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.state_shardings,
        )

    def batch_shardings(self, batch_keys: dict[str, int]) -> dict[str, NamedSharding]:
        """Rows over (data, fsdp), tokens over sequence. `batch_keys` maps key -> ndim."""

        def one(ndim: int, seq: str | None) -> NamedSharding:
            names = ("batch", seq) + (None,) * (ndim - 2)
            return NamedSharding(self.mesh, logical_to_spec(names[:ndim], self.rules, self.mesh))

        seq_keys = {"patches", "segment_ids", "positions", "cond_mask", "loss_mask"}
        return {k: one(n, "length" if k in seq_keys else None) for k, n in batch_keys.items()}

    def model(self, params: dict) -> VideoDiT:
        return nnx.merge(self.graphdef, params)

    # --- step -------------------------------------------------------------------------------
    def loss_fn(self, params: dict, batch: dict, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Masked velocity MSE of the packed batch at `step` (noise and t drawn from (seed, step))."""
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        k_t, k_noise = jax.random.split(key)
        x0 = batch["patches"]  # (B, L, P)
        seg = batch["segment_ids"]  # (B, L)
        t_seg = flow.sample_segment_times(k_t, batch["grid"], self.model_cfg.patch, self.flow_cfg)
        t_tok = flow.gather_segments(t_seg, seg)  # (B, L)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        xt, target, t_tok = flow.noise_tokens(x0, noise, t_tok, batch["cond_mask"])
        pred = self.model(params)(
            xt,
            batch["positions"],
            seg,
            t_tok,
            batch["text"],
            batch["text_segment_ids"],
            batch["text_positions"],
        )
        return flow.masked_mse(pred, target, batch["loss_mask"])

    def train_step(self, state: State, batch: dict) -> tuple[State, dict]:
        """One optimizer step. A step whose loss or gradients are not finite changes nothing but the
        step and skipped counters."""
        with activation_sharding(self.mesh, self.rules):
            grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
            (loss, count), grads = grad_fn(state["params"], batch, state["step"])
        new_state, grad_norm, ok = guarded_update(
            self.tx, self.optim_cfg.ema_decay, state, grads, loss
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "loss_tokens": count, "finite": ok}
        return new_state, metrics

    def jit_train_step(self, batch_shardings: dict) -> Callable:
        return jax.jit(
            self.train_step,
            in_shardings=(self.state_shardings, batch_shardings),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,),
        )


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


def optim_config(c: ml_collections.ConfigDict) -> OptimConfig:
    o = c.optim
    return OptimConfig(
        lr=o.lr,
        warmup_steps=o.warmup_steps,
        total_steps=c.train.steps,
        min_lr_ratio=o.min_lr_ratio,
        weight_decay=o.weight_decay,
        b1=o.b1,
        b2=o.b2,
        grad_clip=o.grad_clip,
        ema_decay=o.ema_decay,
    )


def make_trainer(c: ml_collections.ConfigDict, devices=None) -> Trainer:
    mesh = make_mesh({a: c.mesh[a] for a in MESH_AXES}, devices, c.mesh.get("dcn_data", 1))
    return Trainer(
        configlib.model_config(c),
        configlib.flow_config(c),
        optim_config(c),
        mesh,
        tuple(tuple(r) for r in c.sharding.rules),
        seed=c.seed,
    )

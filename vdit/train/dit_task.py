"""The DiT task: packed batches of the grain pipeline, the rectified-flow loss, the sample grid.

    batch: this process's packed rows (vdit/data/pipeline.py) -> global arrays over (data, fsdp)
    step:  masked velocity MSE, noise and t drawn from (seed, step), AdamW + EMA, NaN-step skip,
           jitted with explicit state and batch shardings and donation
    eval:  `eval_loss`, the velocity MSE of the held-out samples (data.eval_samples, disjoint from
           training) at the fixed timesteps train.eval_timesteps with fixed noise, every
           train.eval_every steps and at the end; the fixed-seed sample grid of
           `sample.grid_prompts` (vdit/train/samples.py)

Randomness is a function of (seed, step): a resumed run draws exactly the numbers an uninterrupted
one would.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from vdit import configlib, flops
from vdit.data import latents, pipeline, size, text_embeddings
from vdit.diffusion import flow
from vdit.models.dit import DiTConfig, VideoDiT
from vdit.parallel import distributed
from vdit.parallel.mesh import mesh_from_config
from vdit.parallel.sharding import activation_sharding, logical_to_spec
from vdit.parallel.topology import peak_flops_per_device
from vdit.train import samples
from vdit.train.state import OptimConfig, ShardedState, State, guarded_update, make_optimizer
from vdit.train.task import Task

# Keys split over the mesh's `sequence` axis along their second (token) dimension.
_SEQUENCE_KEYS = frozenset({"patches", "segment_ids", "positions", "cond_mask", "loss_mask"})


class DiTTask(Task):
    """The DiT's state, step and batches over a mesh."""

    logged = ("loss", "grad_norm")
    postfix = ("loss", "packing_fill")

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        devices=None,
        *,
        data: bool = True,
    ):
        """`config` is loaded (configlib.load); `data=False` builds no data pipeline (compiles,
        parameter tables, tests that feed their own batches)."""
        self.config = c = config
        self.model_cfg: DiTConfig = configlib.model_config(c)
        self.flow_cfg: flow.FlowConfig = configlib.flow_config(c)
        self.optim_cfg = OptimConfig.from_config(c)
        self.seed = c.seed
        self.mesh = mesh_from_config(c.mesh, devices)
        self.rules = tuple(tuple(r) for r in c.sharding.rules)
        model_fn = lambda rngs: VideoDiT(self.model_cfg, rngs=rngs)
        self.tx = make_optimizer(self.optim_cfg, model_fn)
        self.state = ShardedState(model_fn, self.tx, self.mesh, self.rules, c.seed)
        self._batch_shardings: dict[str, NamedSharding] | None = None
        self._step: Callable | None = None
        self._eval_rows: dict[str, np.ndarray] | None = None
        self._eval_sums: Callable | None = None
        self.peak_flops = 0.0
        if data:
            self._open_data()

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, devices) -> DiTTask:
        return cls(configlib.load(config, len(devices)), devices)

    def _open_data(self) -> None:
        c = self.config
        self.data_iter = iter(
            pipeline.build(configlib.pipeline_config(c), jax.process_index(), jax.process_count())
        )
        if c.data.source == "latents":  # the decoder of the sample grid must be the encoding VAE
            samples.check_vae(c, latents.read_manifest(c.data.latents.path))
        # peak FLOP/s of the run's devices for `mfu`: the config's, else the chip table's; 0 = unknown
        peak = float(c.train.get("peak_flops_per_device", 0.0))
        peak = peak or peak_flops_per_device(self.mesh.devices.flat[0]) or 0.0
        self.peak_flops = peak * self.mesh.devices.size

    def start(self, workdir: str) -> None:
        """Precomputed text: the data folder's empty-caption embedding is copied to
        WORKDIR/text_null.npy, what sampling's unconditional pass uses (text_embeddings.py)."""
        if self.config.model.text.kind != "precomputed" or jax.process_index() != 0:
            return
        null = pipeline.null_text(configlib.pipeline_config(self.config))
        text_embeddings.save(os.path.join(workdir, text_embeddings.NULL_FILE), null)

    # --- shardings and the step ---------------------------------------------------------------
    def batch_shardings(self, batch_keys: dict[str, int]) -> dict[str, NamedSharding]:
        """Rows over (data, fsdp), tokens over sequence. `batch_keys` maps key -> ndim."""

        def one(ndim: int, seq: str | None) -> NamedSharding:
            names = ("batch", seq) + (None,) * (ndim - 2)
            return NamedSharding(self.mesh, logical_to_spec(names[:ndim], self.rules, self.mesh))

        return {k: one(n, "length" if k in _SEQUENCE_KEYS else None) for k, n in batch_keys.items()}

    def model(self, params: dict) -> VideoDiT:
        return self.state.model(params)

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
        pred = self.denoise(params, batch, xt, t_tok)
        return flow.masked_mse(pred, target, batch["loss_mask"])

    def denoise(self, params, batch: dict, xt: jax.Array, t_tok: jax.Array) -> jax.Array:
        """The model's velocity for noised patches `xt` (B, L, P) at per-token times `t_tok`
        (B, L) of the packed `batch` (positions, segments and text)."""
        return self.model(params)(
            xt,
            batch["positions"],
            batch["segment_ids"],
            t_tok,
            batch["text"],
            batch["text_segment_ids"],
            batch["text_positions"],
        )

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
            in_shardings=(self.state.shardings, batch_shardings),
            out_shardings=(self.state.shardings, None),
            donate_argnums=(0,),
        )

    # --- the loop's hooks ---------------------------------------------------------------------
    def batch(self, step: int) -> tuple[dict[str, jax.Array], dict[str, Any]]:
        rows = next(self.data_iter)
        if self._batch_shardings is None:
            self._batch_shardings = self.batch_shardings(
                {k: np.ndim(rows[k]) for k in pipeline.DEVICE_KEYS}
            )
        seg = rows["segment_ids"]
        host = {
            "tokens": int((seg > 0).sum()),
            "slots": seg.size,
            "samples": int((rows["grid"][..., 0] > 0).sum()),
            "stats": rows["stats"].reshape(-1, len(size.STATS)).sum(0),
            "flops": flops.step_flops(self.model_cfg, seg, rows["text_segment_ids"])[
                "total_useful"
            ],
        }
        return pipeline.to_global(rows, self._batch_shardings), host

    def step(self, state: State, batch: dict) -> tuple[State, dict]:
        if self._step is None:
            self._step = self.jit_train_step(self._batch_shardings).lower(state, batch).compile()
            distributed.barrier(
                "vdit_train_step_compiled"
            )  # no process runs it before all compiled
        return self._step(state, batch)

    def summarize(self, counts: dict[str, Any], seconds: float) -> dict[str, Any]:
        n = jax.process_count()
        stats = counts["stats"]
        dropped = stats[size.DROPPED]
        out = {
            "tokens_per_s": counts["tokens"] * n / seconds,
            "packing_fill": counts["tokens"] / max(counts["slots"], 1),
            "samples_per_s": counts["samples"] * n / seconds,
            # per interval: samples resized / rejected and why, tokens dropped (data.token_drop)
            **{f"data_{k}": int(v) for k, v in zip(size.STATS, stats, strict=True)},
            "token_drop_rate": float(dropped / max(dropped + counts["tokens"], 1)),
            # model FLOPs (fwd + bwd, no recompute, no padding) per second, all processes
            "model_flops_per_s": counts["flops"] * n / seconds,
        }
        if self.peak_flops > 0:  # model FLOPs utilisation of all devices of the run
            out["mfu"] = flops.mfu(out["model_flops_per_s"], self.peak_flops)
        return out

    def _grid_due(self, done: int) -> bool:
        if self.config.model.text.kind == "precomputed":
            return False  # the grid's prompts are strings: sample with `--text_embedding` instead
        every = self.config.train.sample_every
        return done == self.config.train.steps or bool(every and done % every == 0)

    def _eval_loss_due(self, done: int) -> bool:
        every = self.config.train.get("eval_every", 0)
        on = self.config.data.get("eval_samples", 0) > 0
        return on and (done == self.config.train.steps or bool(every and done % every == 0))

    def eval_due(self, done: int) -> bool:
        return self._grid_due(done) or self._eval_loss_due(done)

    def evaluate(self, state: State, done: int, workdir: str, writer) -> dict:
        c = self.config
        scores = self.eval_loss(state["params"]) if self._eval_loss_due(done) else {}
        if self._grid_due(done):
            params = state["ema"] if c.sample.use_ema else state["params"]
            scores.update(
                samples.write_sample_grid(c, self.state.graphdef, params, workdir, done, writer)
            )
        return scores

    # --- the eval loss ------------------------------------------------------------------------
    def eval_timesteps(self) -> tuple[float, ...]:
        return tuple(float(t) for t in self.config.train.get("eval_timesteps", (0.5,)))

    def eval_rows(self) -> dict[str, np.ndarray] | None:
        """The held-out packed rows, padded with empty rows to whole global batches, each with its
        index ("row_ids", which seeds its noise): built once, the same on every process. None when
        nothing is held out (data.eval_samples=0, or a finite source too small: logged)."""
        if self._eval_rows is None:
            rows = pipeline.held_out(configlib.pipeline_config(self.config))
            if rows is None:
                self._eval_rows = {}
                return None
            rows = {k: rows[k] for k in pipeline.DEVICE_KEYS}
            n, b = len(rows["patches"]), self.config.data.batch_rows
            pad = -n % b
            rows = {
                k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                for k, v in rows.items()
            }
            rows["row_ids"] = np.arange(n + pad, dtype=np.int32)
            self._eval_rows = rows
        return self._eval_rows or None

    def _eval_batch_sums(self, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
        """(summed per-token velocity MSE at each eval timestep (K,), loss tokens) of one batch.
        The noise of a row is drawn from (train.eval_seed, timestep index, row index) alone, so it
        does not depend on the mesh, the batch size or the step."""
        ts = jnp.asarray(self.eval_timesteps(), jnp.float32)  # (K,)
        key = jax.random.key(self.config.train.get("eval_seed", 0))
        x0, seg, mask = batch["patches"], batch["segment_ids"], batch["loss_mask"]  # (B, L, P)

        def one(k_t):
            k, t = k_t
            keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, k), r))(
                batch["row_ids"]
            )
            noise = jax.vmap(lambda kr: jax.random.normal(kr, x0.shape[1:], jnp.float32))(keys)
            t_tok = jnp.where(seg > 0, t, 0.0)  # (B, L)
            xt, target, t_tok = flow.noise_tokens(x0, noise, t_tok, batch["cond_mask"])
            pred = self.denoise(params, batch, xt, t_tok)
            err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), -1)  # (B, L)
            return jnp.sum(jnp.where(mask, err, 0.0))

        with activation_sharding(self.mesh, self.rules):
            sums = jax.lax.map(one, (jnp.arange(ts.shape[0]), ts))
        return sums, mask.sum()

    def eval_loss(self, params: dict) -> dict[str, float]:
        """`eval_loss` (the mean over train.eval_timesteps of the held-out velocity MSE, each
        averaged over the held-out loss tokens) and `eval_loss_t{t}` per timestep, of `params`
        (state["params"]): the same parameters give the same figures on any mesh. Empty when
        nothing is held out."""
        rows = self.eval_rows()
        if rows is None:
            return {}
        b = self.config.data.batch_rows
        n, pi, pc = len(rows["patches"]), jax.process_index(), jax.process_count()
        shardings = self.batch_shardings({k: v.ndim for k, v in rows.items()})
        if self._eval_sums is None:
            self._eval_sums = jax.jit(self._eval_batch_sums)
        sums, count = np.zeros(len(self.eval_timesteps())), 0
        for i in range(0, n, b):
            lo = i + pi * b // pc  # this process's share of the global batch
            local = {k: v[lo : lo + b // pc] for k, v in rows.items()}
            batch = {
                k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()
            }
            s, c = jax.device_get(self._eval_sums(params, batch))
            sums += np.asarray(s, np.float64)
            count += int(c)
        per_t = sums / max(count, 1)
        out = {"eval_loss": float(per_t.mean())}
        out.update(
            {
                f"eval_loss_t{t:g}": float(v)
                for t, v in zip(self.eval_timesteps(), per_t, strict=True)
            }
        )
        return out

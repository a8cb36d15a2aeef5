"""Training the causal VAE: `train_vae(config, workdir)` (what `vdit train` runs for `kind = "vae"`).

    data: step k -> one batch of videos (or images) of one native shape, a pure function of
          (data.seed, k), so a resumed run sees the batches an uninterrupted one would; procedural,
          camera pans across photos, both, or prepared records (vdit/data/vae_data.py)
    step: L1 (+ L2) reconstruction of a posterior sample + KL, AdamW, EMA, NaN-step skip, jitted with
          explicit state shardings and donation (as the DiT's step)
    eval: held-out PSNR / SSIM of the EMA model on posterior means (`eval_psnr` / `eval_ssim` on
          procedural videos; `eval_*_pan` on pans across the held-out photos, `eval_*_records` on
          the held-out records), a side-by-side video (input | reconstruction) in WORKDIR/samples/
    end:  per-channel latent mean / std over `train.stats_samples` samples, stored in the model state
          (`state["stats"]`) of the last checkpoint, for normalising DiT latents

`load_vae(workdir)` gives the trained model (EMA parameters and latent statistics) back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
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
from vdit.data.vae_data import (  # noqa: F401 (VAEDataConfig, batch_at, heldout: re-exported)
    VAEDataConfig,
    batch_at,
    heldout,
    heldout_sets,
    sample_batch,
)
from vdit.data.video_io import tile, to_uint8, upscale, write_video
from vdit.models import discriminator, vae
from vdit.parallel.mesh import MESH_AXES, make_mesh
from vdit.parallel.sharding import Rules, activation_sharding, logical_to_spec, param_shardings
from vdit.train import step as step_lib
from vdit.train.checkpoint import Checkpointer, read_config
from vdit.train.metrics import MetricsWriter, progress_bar

log = logging.getLogger(__name__)

State = dict[str, Any]


# ----------------------------------------------------------------------------------------------------
# Image metrics
# ----------------------------------------------------------------------------------------------------
def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2), over all their elements."""
    mse = jnp.mean(jnp.square(jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def _gauss_matrix(n: int, win: int, sigma: float = 1.5) -> np.ndarray:
    """(n - win + 1, n): each row a normalised Gaussian window (a 'valid' 1D filter as a matmul)."""
    g = np.exp(-0.5 * ((np.arange(win) - (win - 1) / 2) / sigma) ** 2)
    g /= g.sum()
    m = np.zeros((n - win + 1, n), np.float32)
    for i in range(n - win + 1):
        m[i, i : i + win] = g
    return m


def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) of videos
    (..., H, W, C) in [-1, 1], per frame and channel on [0, 1] values, averaged. The window shrinks
    to the image on sides under 11 pixels."""
    x = (jnp.clip(x, -1, 1) + 1) / 2
    y = (jnp.clip(y, -1, 1) + 1) / 2
    h, w = x.shape[-3:-1]
    win = min(11, h, w)
    gh, gw = jnp.asarray(_gauss_matrix(h, win)), jnp.asarray(_gauss_matrix(w, win))
    f = lambda a: jnp.einsum("ih,...hwc,jw->...ijc", gh, a, gw)
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return jnp.mean(s)


# ----------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    kl_weight: float = 1e-4
    sample_posterior: bool = True
    disc_weight: float = (
        0.0  # > 0: adversarial term -disc_weight * mean D(recon); 0: no discriminator
    )
    disc_start: int = 0  # step from which the adversarial term applies and the discriminator trains
    disc_adaptive: bool = False  # scale disc_weight by |grad rec| / |grad adv| at the last layer


@dataclasses.dataclass(frozen=True)
class DiscOptimConfig:
    lr: float = 1e-4  # constant learning rate of the discriminator's Adam
    b1: float = 0.5
    b2: float = 0.9
    grad_clip: float = 1.0  # global-norm clip


@dataclasses.dataclass
class VAETrainer:
    """The VAE's graph, optimizer and shardings; the state is a pure dict as the DiT's."""

    model_cfg: vae.VAEConfig
    loss_cfg: LossConfig
    optim_cfg: step_lib.OptimConfig
    mesh: Mesh
    rules: Rules
    seed: int = 0
    disc_cfg: discriminator.DiscConfig = discriminator.DiscConfig()
    disc_optim: DiscOptimConfig = DiscOptimConfig()

    @property
    def disc_on(self) -> bool:
        return self.loss_cfg.disc_weight > 0

    def __post_init__(self):
        self.tx = step_lib.make_optimizer(self.optim_cfg)
        abstract = nnx.eval_shape(lambda: vae.CausalVAE3D(self.model_cfg, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_params, abstract_stats = nnx.split(
            abstract, nnx.Param, vae.LatentStat
        )
        self.param_shardings = param_shardings(abstract_params, self.rules, self.mesh)
        self.stats_shardings = param_shardings(abstract_stats, self.rules, self.mesh)
        if self.disc_on:
            o = self.disc_optim
            self.disc_tx = optax.chain(
                optax.clip_by_global_norm(o.grad_clip), optax.adam(o.lr, b1=o.b1, b2=o.b2)
            )
            abstract_d = nnx.eval_shape(self._disc)
            self.disc_graphdef, abstract_dparams = nnx.split(abstract_d, nnx.Param)
            self.disc_shardings = param_shardings(abstract_dparams, self.rules, self.mesh)
        self.abstract_state = jax.eval_shape(self._init)
        replicated = NamedSharding(self.mesh, P())
        opt_shardings = lambda tx, opt_state, shardings: optax.tree_utils.tree_map_params(
            tx, lambda _, s: s, opt_state, shardings, transform_non_params=lambda _: replicated
        )
        self.state_shardings = {
            "params": self.param_shardings,
            "opt_state": opt_shardings(
                self.tx, self.abstract_state["opt_state"], self.param_shardings
            ),
            "ema": self.param_shardings,
            "stats": self.stats_shardings,
            "step": replicated,
            "skipped": replicated,
        }
        if self.disc_on:
            self.state_shardings["disc_params"] = self.disc_shardings
            self.state_shardings["disc_opt_state"] = opt_shardings(
                self.disc_tx, self.abstract_state["disc_opt_state"], self.disc_shardings
            )

    def _disc(self) -> discriminator.PatchDiscriminator:
        # its own stream of the seed: the VAE's parameters are those of a run without it
        return discriminator.PatchDiscriminator(self.disc_cfg, rngs=nnx.Rngs(self.seed + 1))

    def _init(self) -> State:
        model = vae.CausalVAE3D(self.model_cfg, rngs=nnx.Rngs(self.seed))
        _, params, stats = nnx.split(model, nnx.Param, vae.LatentStat)
        params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
        state = {
            "params": params,
            "opt_state": self.tx.init(params),
            "ema": jax.tree.map(jnp.copy, params),
            "stats": stats,
            "step": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32),
        }
        if self.disc_on:
            dparams = nnx.to_pure_dict(nnx.state(self._disc(), nnx.Param))
            state.update(disc_params=dparams, disc_opt_state=self.disc_tx.init(dparams))
        return state

    def init_state(self) -> State:
        """The initial state in its sharded layout. The model is built eagerly (its convolution
        kernels are drawn on the host, see `vae._normal`) and placed shard by shard."""
        model = vae.CausalVAE3D(self.model_cfg, rngs=nnx.Rngs(self.seed))
        _, params, stats = nnx.split(model, nnx.Param, vae.LatentStat)

        def put(a, sharding):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

        place = lambda tree, shardings: jax.tree.map(put, tree, shardings)
        params = place(nnx.to_pure_dict(params), self.param_shardings)
        sh = self.state_shardings
        state = {
            "params": params,
            "opt_state": jax.jit(self.tx.init, out_shardings=sh["opt_state"])(params),
            "ema": jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=sh["ema"])(params),
            "stats": place(nnx.to_pure_dict(stats), self.stats_shardings),
            "step": jax.device_put(jnp.zeros((), jnp.int32), sh["step"]),
            "skipped": jax.device_put(jnp.zeros((), jnp.int32), sh["skipped"]),
        }
        if self.disc_on:
            dparams = place(
                nnx.to_pure_dict(nnx.state(self._disc(), nnx.Param)), self.disc_shardings
            )
            state["disc_params"] = dparams
            state["disc_opt_state"] = jax.jit(
                self.disc_tx.init, out_shardings=sh["disc_opt_state"]
            )(dparams)
        return state

    def abstract_sharded_state(self) -> State:
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.state_shardings,
        )

    def model(self, params: dict, stats: dict) -> vae.CausalVAE3D:
        return nnx.merge(self.graphdef, params, stats)

    def batch_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        names = ("batch",) + (None,) * (len(shape) - 1)
        return NamedSharding(self.mesh, logical_to_spec(names, self.rules, self.mesh, shape))

    def disc(self, disc_params: dict) -> discriminator.PatchDiscriminator:
        return nnx.merge(self.disc_graphdef, disc_params)

    def _reconstruction(self, params, stats, video, step):
        """(loss, metrics, reconstruction, target) of the reconstruction + KL objective."""
        lc = self.loss_cfg
        model = self.model(params, stats)
        key = jax.random.fold_in(jax.random.key(self.seed), step) if lc.sample_posterior else None
        recon, mean, logvar = model(video, key)
        target = video[:, : recon.shape[1]]  # the trailing frames no latent frame sees are dropped
        l1 = jnp.mean(jnp.abs(recon - target))
        l2 = jnp.mean(jnp.square(recon - target))
        kl = vae.kl_divergence(mean, logvar)
        loss = lc.l1_weight * l1 + lc.l2_weight * l2 + lc.kl_weight * kl
        return loss, {"l1": l1, "l2": l2, "kl": kl, "psnr": psnr(recon, target)}, recon, target

    def loss_fn(self, params, stats, video, step):
        loss, aux, _, _ = self._reconstruction(params, stats, video, step)
        return loss, aux

    def _gan_parts(self, params, stats, disc_params, video, step):
        """(reconstruction + KL loss, metrics, recon, target, reconstruction-only loss, g_adv)."""
        lc = self.loss_cfg
        loss, aux, recon, target = self._reconstruction(params, stats, video, step)
        rec = lc.l1_weight * aux["l1"] + lc.l2_weight * aux["l2"]
        g_adv = -jnp.mean(self.disc(disc_params)(recon))
        return loss, aux, recon, target, rec, g_adv

    def adaptive_weight(self, params, stats, disc_params, video, step) -> jax.Array:
        """LDM's adaptive weight |d rec / dW| / (|d g_adv / dW| + 1e-4), clipped to [0, 1e4], W the
        decoder's last convolution kernel (rec: the L1 + L2 reconstruction loss, without KL). Only
        W varies, so autodiff goes back through the last layer, not the whole network."""

        def part(i):
            def f(kernel):
                conv_out = {**params["decoder"]["conv_out"], "kernel": kernel}
                p = {**params, "decoder": {**params["decoder"], "conv_out": conv_out}}
                return self._gan_parts(p, stats, disc_params, video, step)[i]

            return jnp.linalg.norm(jax.grad(f)(params["decoder"]["conv_out"]["kernel"]))

        w = part(4) / (part(5) + 1e-4)
        return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4))

    def _gan_loss_fn(self, params, stats, disc_params, video, step):
        """The generator's loss with the adversarial term -mean D(recon), weighted by disc_weight
        (times the adaptive weight with loss.disc_adaptive) from disc_start on; by exactly 0 before,
        where the loss is the reconstruction one."""
        lc = self.loss_cfg
        loss, aux, recon, target, _, g_adv = self._gan_parts(
            params, stats, disc_params, video, step
        )
        weight = jnp.asarray(lc.disc_weight, jnp.float32)
        extra = {"g_adv": g_adv}
        if lc.disc_adaptive:
            adaptive = self.adaptive_weight(params, stats, disc_params, video, step)
            weight, extra["adaptive_weight"] = weight * adaptive, adaptive
        loss = loss + jnp.where(step >= lc.disc_start, weight, 0.0) * g_adv
        return loss, ({**aux, **extra}, recon, target)

    def _disc_update(self, state: State, real: jax.Array, fake: jax.Array):
        """Hinge-loss step of the discriminator on the step's videos and their reconstructions
        (held fixed); applied from disc_start on, when its loss and gradients are finite."""

        def d_loss_fn(dp):
            d = self.disc(dp)
            real_logits, fake_logits = d(real), d(fake)
            loss = discriminator.hinge_d_loss(real_logits, fake_logits)
            return loss, {"d_real": jnp.mean(real_logits), "d_fake": jnp.mean(fake_logits)}

        dp, dopt = state["disc_params"], state["disc_opt_state"]
        (d_loss, d_aux), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(dp)
        d_norm = optax.global_norm(d_grads)
        updates, new_opt = self.disc_tx.update(d_grads, dopt, dp)
        new_dp = optax.apply_updates(dp, updates)
        active = (
            (state["step"] >= self.loss_cfg.disc_start)
            & jnp.isfinite(d_loss)
            & jnp.isfinite(d_norm)
        )
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)
        return (
            keep(new_dp, dp),
            keep(new_opt, dopt),
            {
                "d_loss": d_loss,
                "d_grad_norm": d_norm,
                "disc_active": active.astype(jnp.float32),
                **d_aux,
            },
        )

    def train_step(self, state: State, video: jax.Array) -> tuple[State, dict]:
        if self.disc_on:
            return self._gan_train_step(state, video)
        with activation_sharding(self.mesh, self.rules):
            (loss, aux), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
                state["params"], state["stats"], video, state["step"]
            )
        new_state, grad_norm, _ = step_lib.guarded_update(
            self.tx, self.optim_cfg.ema_decay, state, grads, loss
        )
        return new_state, {"loss": loss, "grad_norm": grad_norm, **aux}

    def _gan_train_step(self, state: State, video: jax.Array) -> tuple[State, dict]:
        with activation_sharding(self.mesh, self.rules):
            (loss, (aux, recon, target)), grads = jax.value_and_grad(
                self._gan_loss_fn, has_aux=True
            )(state["params"], state["stats"], state["disc_params"], video, state["step"])
            dp, dopt, d_aux = self._disc_update(state, target, jax.lax.stop_gradient(recon))
        new_state, grad_norm, _ = step_lib.guarded_update(
            self.tx, self.optim_cfg.ema_decay, state, grads, loss
        )
        new_state = {**new_state, "disc_params": dp, "disc_opt_state": dopt}
        return new_state, {"loss": loss, "grad_norm": grad_norm, **aux, **d_aux}

    def jit_train_step(self):
        """Jitted step; retraced once per batch shape (the shapes are the finite data choices)."""
        return jax.jit(
            self.train_step, out_shardings=(self.state_shardings, None), donate_argnums=(0,)
        )


def loss_config(c: ml_collections.ConfigDict) -> LossConfig:
    return LossConfig(
        l1_weight=c.loss.l1_weight,
        l2_weight=c.loss.l2_weight,
        kl_weight=c.loss.kl_weight,
        sample_posterior=c.loss.sample_posterior,
        disc_weight=c.loss.disc_weight,
        disc_start=c.loss.disc_start,
        disc_adaptive=c.loss.disc_adaptive,
    )


def disc_config(c: ml_collections.ConfigDict) -> tuple[discriminator.DiscConfig, DiscOptimConfig]:
    d = c.disc
    return (
        discriminator.DiscConfig(
            channels=d.channels,
            layers=d.layers,
            temporal_kernel=d.temporal_kernel,
            dtype=c.vae.dtype,
            param_dtype=c.vae.param_dtype,
        ),
        DiscOptimConfig(lr=d.lr, b1=d.b1, b2=d.b2, grad_clip=d.grad_clip),
    )


def data_config(c: ml_collections.ConfigDict) -> VAEDataConfig:
    d = c.data
    return VAEDataConfig(
        seed=d.seed,
        frame_choices=tuple(d.frame_choices),
        image_fraction=d.image_fraction,
        size_choices=tuple(tuple(s) for s in d.size_choices),
        batch_size=d.batch_size,
        max_pixels=d.max_pixels,
        source=d.source,
        pan_fraction=d.pan_fraction,
        records_path=d.records.path,
        eval_samples=d.eval_samples,
    )


def make_trainer(c: ml_collections.ConfigDict, devices=None) -> VAETrainer:
    mesh = make_mesh({a: c.mesh[a] for a in MESH_AXES}, devices, c.mesh.get("dcn_data", 1))
    disc_cfg, disc_optim = disc_config(c)
    return VAETrainer(
        configlib.vae_config(c),
        loss_config(c),
        step_lib.optim_config(c),
        mesh,
        tuple(tuple(r) for r in c.sharding.rules),
        seed=c.seed,
        disc_cfg=disc_cfg,
        disc_optim=disc_optim,
    )


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------
@nnx.jit
def reconstruct(model: vae.CausalVAE3D, video: jax.Array) -> jax.Array:
    """Decode of the posterior mean."""
    mean, _ = model.encode(video)
    return model.decode(mean)


def evaluate(model: vae.CausalVAE3D, videos: list[np.ndarray]) -> tuple[dict[str, float], list]:
    """Mean PSNR / SSIM over `videos` (each (1, T, H, W, 3)); also returns the reconstructions."""
    scores, recons = [], []
    for v in videos:
        r = np.asarray(reconstruct(model, jnp.asarray(v)))
        t = v[:, : r.shape[1]]
        scores.append((float(psnr(r, t)), float(ssim(r, t))))
        recons.append(r)
    p, s = np.mean(scores, axis=0)
    return {"psnr": float(p), "ssim": float(s)}, recons


def side_by_side(videos: list[np.ndarray], recons: list[np.ndarray]) -> np.ndarray:
    """uint8 grid video of (input | reconstruction) pairs."""
    pairs = [
        np.concatenate([to_uint8(v[0, : r.shape[1]]), to_uint8(r[0])], axis=2)
        for v, r in zip(videos, recons, strict=True)
    ]
    return tile(pairs, cols=min(2, len(pairs)))


# ----------------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------------
def train_vae(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, Any]:
    """Train (or resume) the VAE to `config.train.steps`; returns the last logged metrics."""
    devices = jax.devices() if devices is None else list(devices)
    c = configlib.load(config, len(devices))
    tc = c.train
    os.makedirs(workdir, exist_ok=True)
    trainer = make_trainer(c, devices)
    dcfg = data_config(c)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state["params"]))
    log.info(
        "VAE: mesh %s, %s parameters, compression %s",
        dict(trainer.mesh.shape),
        f"{n_params:,}",
        trainer.model_cfg.compression,
    )
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=tc.checkpoint_every,
        keep=tc.keep_checkpoints,
    )
    if ckpt.latest_step() is not None:
        state, start = ckpt.restore(trainer.abstract_sharded_state())
        log.info("resumed from step %d in %s", start, workdir)
    else:
        state, start = trainer.init_state(), 0

    eval_sets = heldout_sets(dcfg, c.data.eval_samples, c.data.eval_seed)
    shown = eval_sets[next(k for k in ("records", "pan", "synthetic") if k in eval_sets)]
    step_fn = trainer.jit_train_step()
    writer = MetricsWriter(workdir)
    progress = progress_bar(start, tc.steps, tc.progress and jax.process_index() == 0)
    pending, pixels, skipped, last = [], 0, 0, {}
    t_last = time.perf_counter()
    for step in range(start, tc.steps):
        batch, n_skipped = sample_batch(dcfg, step)
        pixels += batch.size // 3
        skipped += n_skipped
        video = jax.device_put(batch, trainer.batch_sharding(batch.shape))
        state, metrics = step_fn(state, video)
        pending.append(metrics)
        done = step + 1
        progress.update(1)
        if done % tc.log_every == 0 or done == tc.steps:
            fetched = jax.device_get(pending)
            dt = time.perf_counter() - t_last
            last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
            last.update(
                lr=step_lib.learning_rate(trainer.optim_cfg, done),
                skipped_steps=int(jax.device_get(state["skipped"])),
                steps_per_s=len(fetched) / dt,
                pixels_per_s=pixels / dt,
            )
            if dcfg.source == "records":
                last["data_skipped"] = skipped
            writer.write(done, last)
            progress.set_postfix(loss=f"{last['loss']:.4f}", psnr=f"{last['psnr']:.2f}")
            pending, pixels, skipped, t_last = [], 0, 0, time.perf_counter()
        if done == tc.steps:  # latent statistics of the final EMA model, saved with it
            model = trainer.model(state["ema"], state["stats"])
            mean, std = vae.latent_statistics(
                model, (batch_at(dcfg, i, c.data.eval_seed + 1) for i in range(tc.stats_samples))
            )
            vae.set_latent_statistics(model, mean, std)
            stats = nnx.to_pure_dict(nnx.state(model, vae.LatentStat))
            state = {**state, "stats": jax.device_put(stats, trainer.stats_shardings)}
            last.update(latent_mean_abs=float(np.abs(mean).mean()), latent_std=float(std.mean()))
            writer.write(
                done, {"latent_mean_abs": last["latent_mean_abs"], "latent_std": last["latent_std"]}
            )
        if done % tc.eval_every == 0 or done == tc.steps:
            model = trainer.model(state["ema"], state["stats"])
            scores = {}
            for name, videos in eval_sets.items():
                result, recons = evaluate(model, videos)
                suffix = "" if name == "synthetic" else f"_{name}"
                scores.update({f"eval_{k}{suffix}": v for k, v in result.items()})
                if videos is shown:
                    shown_recons = recons
            writer.write(done, scores)
            last.update(scores)
            if jax.process_index() == 0 and tc.video_samples:
                grid = upscale(
                    side_by_side(shown[: tc.video_samples], shown_recons[: tc.video_samples]), 4
                )
                write_video(
                    os.path.join(workdir, "samples", f"vae_step_{done:07d}.mp4"), grid, fps=tc.fps
                )
                writer.write_video("reconstructions", done, grid, tc.fps)
        ckpt.save(done, state, config=c, force=done == tc.steps)
    progress.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    return last


@functools.lru_cache(maxsize=4)
def _cached_vae(workdir: str, step: int | None):
    return load_vae(workdir, step)


def latent_decoder(workdir: str, step: int | None = None, chunk_latents: int = 4):
    """The pixels of normalised latents, as DiT samples are: a function latent (t, h, w, Z) ->
    video (1 + (t - 1) * ct, h * ch, w * cw, 3) in [-1, 1] that undoes the VAE's latent statistics
    and decodes in temporal chunks (bounded memory for any length). The VAE is loaded once."""
    _, model = _cached_vae(os.fspath(workdir), step)

    def decode(latent: np.ndarray) -> np.ndarray:
        z = model.denormalize(jnp.asarray(latent, jnp.float32))[None]
        return np.asarray(vae.decode_chunked(model, z, chunk_latents)[0])

    decode.model = model
    return decode


def load_vae(workdir: str | os.PathLike, step: int | None = None, use_ema: bool = True):
    """(config, model) of the VAE checkpoint in WORKDIR/checkpoints: EMA (or raw) parameters and the
    stored latent statistics, on the first local device."""
    directory = os.path.join(os.fspath(workdir), "checkpoints")
    c = configlib.load(ml_collections.ConfigDict(read_config(directory, step)))
    with c.unlocked():
        c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1})
    trainer = make_trainer(c, jax.local_devices()[:1])
    with Checkpointer(directory, save_every=1, keep=None) as ckpt:
        state, _ = ckpt.restore(trainer.abstract_sharded_state(), step=step)
    return c, trainer.model(state["ema"] if use_ema else state["params"], state["stats"])

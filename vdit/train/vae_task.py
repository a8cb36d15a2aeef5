"""The VAE task (`kind = "vae"`, configs/vae.py): what the one loop needs to train the causal VAE.

    batch: step k -> one batch of videos (or images) of one native shape, a pure function of
           (data.seed, k), so a resumed run sees the batches an uninterrupted one would; procedural,
           camera pans across photos, both, or prepared records (vdit/data/vae_data.py)
    step:  L1 (+ L2) reconstruction of a posterior sample + KL, AdamW, EMA, NaN-step skip, jitted
           with explicit state shardings and donation; with loss.disc_weight > 0 also a patch
           discriminator (hinge loss, its own Adam, in the state as disc_params / disc_opt_state)
    eval:  held-out PSNR / SSIM of the EMA model on posterior means (`eval_psnr` / `eval_ssim` on
           procedural videos; `eval_*_pan` on pans across the held-out photos, `eval_*_records` on
           the held-out records), a side-by-side video (input | reconstruction) in WORKDIR/samples/
    end:   per-channel latent mean / std over `train.stats_samples` samples, stored in the model's
           buffers (`state["stats"]`) of the last checkpoint, for normalising DiT latents

`vdit.train.load.load(workdir)` gives the trained model (EMA parameters and statistics) back.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from vdit import configlib
from vdit.data import vae_data
from vdit.data.video_io import tile, to_uint8, upscale, write_video
from vdit.models import discriminator, vae
from vdit.ops.quality import psnr, ssim
from vdit.parallel.mesh import mesh_from_config
from vdit.parallel.sharding import activation_sharding, logical_to_spec
from vdit.train.state import Aux, OptimConfig, ShardedState, State, guarded_update, make_optimizer
from vdit.train.task import Task


def disc_optimizer(cfg: discriminator.DiscConfig) -> optax.GradientTransformation:
    """The discriminator's constant-rate Adam with global-norm clipping."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip), optax.adam(cfg.lr, b1=cfg.b1, b2=cfg.b2)
    )


class VAETask(Task):
    """The VAE's state (and its discriminator's), step, batches and evaluation over a mesh."""

    postfix = ("loss", "psnr")

    def __init__(self, config: ml_collections.ConfigDict, devices=None):
        """`config` is loaded (configlib.load)."""
        self.config = c = config
        self.model_cfg = configlib.vae_config(c)
        self.loss_cfg = configlib.build(vae.LossConfig, c.loss, "loss")
        self.optim_cfg = OptimConfig.from_config(c)
        self.disc_cfg = configlib.disc_config(c)
        self.disc_tx = disc_optimizer(self.disc_cfg)
        self.data_cfg = vae_data_config(c)
        self.seed = c.seed
        self.mesh = mesh_from_config(c.mesh, devices)
        self.rules = tuple(tuple(r) for r in c.sharding.rules)
        model_fn = lambda rngs: vae.CausalVAE3D(self.model_cfg, rngs=rngs)
        self.tx = make_optimizer(self.optim_cfg, model_fn)
        # the discriminator draws from its own stream of the seed: the VAE's parameters are those
        # of a run without it
        aux = {}
        if self.disc_on:
            disc_fn = lambda rngs: discriminator.PatchDiscriminator(self.disc_cfg, rngs=rngs)
            aux["disc"] = Aux(disc_fn, self.disc_tx, c.seed + 1)
        self.state = ShardedState(
            model_fn,
            self.tx,
            self.mesh,
            self.rules,
            c.seed,
            buffers=vae.LatentStat,
            aux=aux,
            host_init=True,  # convolution kernels are drawn on the host (see `vae._normal`)
        )
        self._step: Callable | None = None
        self._eval_sets: dict[str, list[np.ndarray]] | None = None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, devices) -> VAETask:
        return cls(configlib.load(config, len(devices)), devices)

    @property
    def disc_on(self) -> bool:
        return self.loss_cfg.disc_weight > 0

    def describe(self) -> str:
        return f"VAE, {super().describe()}, compression {self.model_cfg.compression}"

    # --- models -------------------------------------------------------------------------------
    def model(self, params: dict, stats: dict) -> vae.CausalVAE3D:
        return self.state.model(params, stats)

    def disc(self, disc_params: dict) -> discriminator.PatchDiscriminator:
        return self.state.aux_model("disc", disc_params)

    def batch_sharding(self, shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
        names = ("batch",) + (None,) * (len(shape) - 1)
        spec = logical_to_spec(names, self.rules, self.mesh, shape)
        return jax.sharding.NamedSharding(self.mesh, spec)

    # --- losses -------------------------------------------------------------------------------
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
        metrics = {
            "d_loss": d_loss,
            "d_grad_norm": d_norm,
            "disc_active": active.astype(jnp.float32),
            **d_aux,
        }
        return keep(new_dp, dp), keep(new_opt, dopt), metrics

    # --- the step -----------------------------------------------------------------------------
    def train_step(self, state: State, video: jax.Array) -> tuple[State, dict]:
        if self.disc_on:
            return self._gan_train_step(state, video)
        with activation_sharding(self.mesh, self.rules):
            (loss, aux), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
                state["params"], state["stats"], video, state["step"]
            )
        new_state, grad_norm, _ = guarded_update(
            self.tx, self.optim_cfg.ema_decay, state, grads, loss
        )
        return new_state, {"loss": loss, "grad_norm": grad_norm, **aux}

    def _gan_train_step(self, state: State, video: jax.Array) -> tuple[State, dict]:
        with activation_sharding(self.mesh, self.rules):
            (loss, (aux, recon, target)), grads = jax.value_and_grad(
                self._gan_loss_fn, has_aux=True
            )(state["params"], state["stats"], state["disc_params"], video, state["step"])
            dp, dopt, d_aux = self._disc_update(state, target, jax.lax.stop_gradient(recon))
        new_state, grad_norm, _ = guarded_update(
            self.tx, self.optim_cfg.ema_decay, state, grads, loss
        )
        new_state = {**new_state, "disc_params": dp, "disc_opt_state": dopt}
        return new_state, {"loss": loss, "grad_norm": grad_norm, **aux, **d_aux}

    def jit_train_step(self) -> Callable:
        """Jitted step; retraced once per batch shape (the shapes are the finite data choices)."""
        return jax.jit(
            self.train_step, out_shardings=(self.state.shardings, None), donate_argnums=(0,)
        )

    # --- the loop's hooks ---------------------------------------------------------------------
    def batch(self, step: int) -> tuple[jax.Array, dict]:
        batch, skipped = vae_data.sample_batch(self.data_cfg, step)
        host = {"pixels": batch.size // 3, "skipped": skipped}
        return jax.device_put(batch, self.batch_sharding(batch.shape)), host

    def step(self, state: State, video: jax.Array) -> tuple[State, dict]:
        if self._step is None:
            self._step = self.jit_train_step()
        return self._step(state, video)

    def summarize(self, counts: dict, seconds: float) -> dict:
        out = {"pixels_per_s": counts["pixels"] / seconds}
        if self.data_cfg.source == "records":
            out["data_skipped"] = counts["skipped"]
        return out

    def finish(self, state: State, writer) -> tuple[State, dict]:
        """Latent statistics of the final EMA model, saved with it."""
        c = self.config
        model = self.model(state["ema"], state["stats"])
        videos = (
            vae_data.batch_at(self.data_cfg, i, c.data.eval_seed + 1)
            for i in range(c.train.stats_samples)
        )
        mean, std = vae.latent_statistics(model, videos)
        vae.set_latent_statistics(model, mean, std)
        stats = nnx.to_pure_dict(nnx.state(model, vae.LatentStat))
        state = {**state, "stats": jax.device_put(stats, self.state.shardings["stats"])}
        out = {"latent_mean_abs": float(np.abs(mean).mean()), "latent_std": float(std.mean())}
        writer.write(c.train.steps, out)
        return state, out

    def eval_due(self, done: int) -> bool:
        return done % self.config.train.eval_every == 0 or done == self.config.train.steps

    def evaluate(self, state: State, done: int, workdir: str, writer) -> dict:
        c, tc = self.config, self.config.train
        if self._eval_sets is None:
            self._eval_sets = vae_data.heldout_sets(
                self.data_cfg, c.data.eval_samples, c.data.eval_seed
            )
        sets = self._eval_sets
        shown_name = next(k for k in ("records", "pan", "synthetic") if k in sets)
        model = self.model(state["ema"], state["stats"])
        scores = {}
        for name, videos in sets.items():
            result, recons = evaluate(model, videos)
            suffix = "" if name == "synthetic" else f"_{name}"
            scores.update({f"eval_{k}{suffix}": v for k, v in result.items()})
            if name == shown_name:
                shown_recons = recons
        if jax.process_index() == 0 and tc.video_samples:
            n = tc.video_samples
            grid = upscale(side_by_side(sets[shown_name][:n], shown_recons[:n]), 4)
            path = os.path.join(workdir, "samples", f"vae_step_{done:07d}.mp4")
            write_video(path, grid, fps=tc.fps)
            writer.write_video("reconstructions", done, grid, tc.fps)
        return scores


def vae_data_config(c: ml_collections.ConfigDict) -> vae_data.VAEDataConfig:
    return vae_data.VAEDataConfig.from_section(c.data.to_dict())


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
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

"""The training loop: `train_and_evaluate(config, workdir)`.

    mesh, trainer (model graph, optimizer, shardings) -> data iterator -> restore or init
    -> for each step: next batch -> global arrays -> jitted step -> metrics / checkpoint / samples

A run resumes from the latest checkpoint in WORKDIR/checkpoints by itself, with the data iterator where
it stopped, so a restarted job continues as if it had never stopped. The mesh of the resumed run may
differ from the one that saved (the state is resharded on restore); the process count may not (each
process saves its own data-iterator state).

Multi-host (after `jax.distributed.initialize`, see vdit/parallel/distributed.py), every process runs
this same function: it reads only its share of the data (`pipeline.build(..., process_index,
process_count)`) and contributes its rows to the global batch; checkpoints are saved and restored by
all processes together (orbax coordinates them, grain writes one iterator state per process); every
process runs the jitted step and the end-of-run sample grid, and only process 0 writes metrics,
TensorBoard events, samples and the progress bar.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from vdit import aot, configlib, flops
from vdit.data import latents, pipeline
from vdit.parallel import distributed
from vdit.train import step as step_lib
from vdit.train.checkpoint import Checkpointer
from vdit.train.metrics import MetricsWriter, progress_bar
from vdit.train.samples import check_vae, write_sample_grid

log = logging.getLogger(__name__)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices=None
) -> dict[str, Any]:
    """Train (or resume) to `config.train.steps`; returns the last logged metrics.

    `devices` (default: all, over every process) are the devices the mesh is built from; in a
    multi-process run they must include devices of every process. Every process calls this together.
    """
    if config.get("kind", "dit") == "vae":  # the causal VAE has its own loop (configs/vae.py)
        from vdit.train.vae_train import train_vae

        return train_vae(config, workdir, devices)
    devices = jax.devices() if devices is None else list(devices)
    missing = set(range(jax.process_count())) - {d.process_index for d in devices}
    if missing:
        raise ValueError(
            f"the mesh devices include none of processes {sorted(missing)}: a "
            "multi-process run needs a mesh over the devices of every process"
        )
    c = configlib.load(config, len(devices))
    tc = c.train
    os.makedirs(workdir, exist_ok=True)
    trainer = step_lib.make_trainer(c, devices)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state["params"]))
    log.info(
        "process %d of %d (%d of %d devices local), mesh %s, %s parameters",
        jax.process_index(),
        jax.process_count(),
        sum(d.process_index == jax.process_index() for d in devices),
        len(devices),
        dict(trainer.mesh.shape),
        f"{n_params:,}",
    )
    # peak FLOP/s of the run's devices for `mfu`: the config's, else the chip table's; 0 = unknown
    peak = float(tc.get("peak_flops_per_device", 0.0)) or (
        aot.peak_flops_per_device(devices[0]) or 0.0
    )
    peak *= len(devices)

    data = pipeline.build(configlib.pipeline_config(c), jax.process_index(), jax.process_count())
    if c.data.source == "latents":  # the decoder of the sample grid must be the encoding VAE
        check_vae(c, latents.read_manifest(c.data.latents.path))
    data_iter = iter(data)
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=tc.checkpoint_every,
        keep=tc.keep_checkpoints,
    )
    if ckpt.latest_step() is not None:
        state, start = ckpt.restore(trainer.abstract_sharded_state(), data_iter=data_iter)
        log.info("resumed from step %d in %s", start, workdir)
    else:
        state, start = trainer.init_state(), 0

    batch_shardings = None
    train_step = None
    writer = MetricsWriter(workdir)
    progress = progress_bar(start, tc.steps, tc.progress and jax.process_index() == 0)
    pending: list[dict] = []
    host = _new_host_counts()
    t_last, last = time.perf_counter(), {}
    for step in range(start, tc.steps):
        batch = next(data_iter)
        if batch_shardings is None:
            batch_shardings = trainer.batch_shardings(
                {k: np.ndim(batch[k]) for k in pipeline.DEVICE_KEYS}
            )
        global_batch = pipeline.to_global(batch, batch_shardings)
        if train_step is None:
            train_step = (
                trainer.jit_train_step(batch_shardings).lower(state, global_batch).compile()
            )
            distributed.barrier(
                "vdit_train_step_compiled"
            )  # no process runs it before all compiled
        host["tokens"] += int((batch["segment_ids"] > 0).sum())
        host["slots"] += batch["segment_ids"].size
        host["samples"] += int((batch["grid"][..., 0] > 0).sum())
        host["stats"] += batch["stats"].reshape(-1, len(pipeline.STATS)).sum(0)
        host["flops"] += flops.step_flops(
            trainer.model_cfg, batch["segment_ids"], batch["text_segment_ids"]
        )["total_useful"]
        state, metrics = train_step(state, global_batch)
        pending.append(metrics)
        done = step + 1
        progress.update(1)

        if done % tc.log_every == 0 or done == tc.steps:
            fetched = jax.device_get(pending)
            dt = time.perf_counter() - t_last
            dropped = host["stats"][pipeline.DROPPED]
            last = {
                "loss": float(np.mean([m["loss"] for m in fetched])),
                "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
                "lr": step_lib.learning_rate(trainer.optim_cfg, done),
                "skipped_steps": int(jax.device_get(state["skipped"])),
                "tokens_per_s": host["tokens"] * jax.process_count() / dt,
                "steps_per_s": len(fetched) / dt,
                "packing_fill": host["tokens"] / max(host["slots"], 1),
                "samples_per_s": host["samples"] * jax.process_count() / dt,
                # per interval: samples resized / rejected and why, tokens dropped (data.token_drop)
                **{f"data_{k}": int(v) for k, v in zip(pipeline.STATS, host["stats"], strict=True)},
                "token_drop_rate": float(dropped / max(dropped + host["tokens"], 1)),
                # model FLOPs (fwd + bwd, no recompute, no padding) per second, all processes
                "model_flops_per_s": host["flops"] * jax.process_count() / dt,
            }
            if peak > 0:  # model FLOPs utilisation of all devices of the run
                last["mfu"] = flops.mfu(last["model_flops_per_s"], peak)
            writer.write(done, last)
            progress.set_postfix(loss=f"{last['loss']:.4f}", fill=f"{last['packing_fill']:.3f}")
            pending, t_last = [], time.perf_counter()
            host = _new_host_counts()

        ckpt.save(done, state, data_iter=data_iter, config=c, force=done == tc.steps)
        if done == tc.steps or (tc.sample_every and done % tc.sample_every == 0):
            scores = write_sample_grid(c, trainer, state, workdir, done, writer)
            if scores:
                writer.write(done, scores)
                last.update(scores)
    progress.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    return last


def _new_host_counts() -> dict[str, Any]:
    return {
        "tokens": 0,
        "slots": 0,
        "samples": 0,
        "flops": 0.0,
        "stats": np.zeros(len(pipeline.STATS), np.int64),
    }

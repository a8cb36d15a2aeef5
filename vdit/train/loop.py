"""The one training loop, shared by every model: `train_and_evaluate(config, workdir)`.

    task (the model's state, step, batches, evaluation) -> restore or init
    -> for each step: batch -> jitted step -> metrics / evaluation / checkpoint -> progress

What differs between models is a `Task` (vdit/train/task.py; the DiT and the VAE are two); the loop
owns what they share. A run resumes from the latest checkpoint in WORKDIR/checkpoints by itself (with
the data iterator where it stopped, for a task that has one), so a restarted job continues as if it
had never stopped. The mesh of the resumed run may differ from the one that saved (the state is
resharded on restore); the process count may not (each process saves its own data-iterator state).

Preemption: a SIGTERM (what a TPU VM, GKE or SLURM sends before it evicts a job) makes the loop
save a checkpoint at the step it has reached, wait for the commit and return (`vdit train` exits 0);
the restarted job continues from that step. A single process catches the signal itself (a flag
checked between steps); a multi-process run asks JAX's preemption service, which sees the signal on
any host and names one step at which every process stops (`reached_preemption_sync_point`). A
process killed outright (SIGKILL, a lost node) resumes from its last committed checkpoint.

Multi-host (after `jax.distributed.initialize`, see vdit/parallel/distributed.py), every process runs
this same function: the task reads only this process's share of the data; checkpoints are saved and
restored by all processes together; only process 0 writes metrics, TensorBoard events, samples and
the progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from vdit.train import load
from vdit.train.checkpoint import Checkpointer
from vdit.train.dit_task import DiTTask
from vdit.train.metrics import FinishedSteps, MetricsWriter, progress_bar
from vdit.train.state import learning_rate
from vdit.train.task import Task
from vdit.train.vae_task import VAETask

log = logging.getLogger(__name__)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices=None
) -> dict[str, Any]:
    """Train (or resume) to `config.train.steps`; returns the last logged metrics.

    `config.kind` picks the task ("dit", the default, or "vae"). `devices` (default: all, over every
    process) are the devices the mesh is built from; in a multi-process run they must include
    devices of every process. Every process calls this together.
    """
    devices = jax.devices() if devices is None else list(devices)
    missing = set(range(jax.process_count())) - {d.process_index for d in devices}
    if missing:
        raise ValueError(
            f"the mesh devices include none of processes {sorted(missing)}: a "
            "multi-process run needs a mesh over the devices of every process"
        )
    task_type = VAETask if config.get("kind", "dit") == "vae" else DiTTask
    return run(task_type.from_config(config, devices), workdir)


class Preemption:
    """Whether to stop for a preemption notice (SIGTERM) after a step; all processes agree.

    One process: a SIGTERM handler (installed while the loop runs) sets a flag. Several: JAX's
    preemption service (`jax_enable_preemption_service`, on by default with jax.distributed)
    catches SIGTERM on any host and picks the step at which all stop; every process must ask at
    every step."""

    def __init__(self) -> None:
        self.signalled: float | None = None  # time.monotonic() of the SIGTERM

    @contextlib.contextmanager
    def installed(self):
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            yield self  # JAX's service owns SIGTERM; or no handler can be set from this thread
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _handle(self, signum, frame) -> None:
        if self.signalled is None:
            self.signalled = time.monotonic()
            log.warning("SIGTERM: saving a checkpoint after the current step, then stopping")

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is disabled
                return False
        return self.signalled is not None


def run(task: Task, workdir: str) -> dict[str, Any]:
    """The loop: restore or init, then step, log, evaluate and checkpoint to `train.steps`;
    stopped early (a checkpoint saved at the step reached) by a SIGTERM."""
    with Preemption().installed() as preemption:
        return _run(task, workdir, preemption)


def _run(task: Task, workdir: str, preemption: Preemption) -> dict[str, Any]:
    c = task.config
    tc = c.train
    os.makedirs(workdir, exist_ok=True)
    task.start(workdir)
    devices = task.state.mesh.devices.flat
    log.info(
        "process %d of %d (%d of %d devices local), %s",
        jax.process_index(),
        jax.process_count(),
        sum(d.process_index == jax.process_index() for d in devices),
        task.state.mesh.devices.size,
        task.describe(),
    )
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=tc.checkpoint_every,
        keep=tc.keep_checkpoints,
        remove_uncommitted=True,  # this run owns the directory: a killed save is garbage
    )
    if ckpt.latest_step() is not None:
        state, start = ckpt.restore(task.state.abstract_sharded(), data_iter=task.data_iter)
        log.info("resumed from step %d in %s", start, workdir)
    elif tc.get("init_from", ""):  # a `vdit export`: its parameters, a fresh optimizer, step 0
        exported = load.restore_export(
            tc.init_from, *task.state.model_targets(), what="the run's config"
        )
        state, start = task.state.init(*exported), 0
        log.info("started from the parameters exported to %s", tc.init_from)
    else:
        state, start = task.state.init(), 0

    writer = MetricsWriter(workdir)
    progress = progress_bar(start, tc.steps, tc.progress and jax.process_index() == 0)
    finished = FinishedSteps(progress)  # the bar counts steps done on the device
    pending: list[dict] = []
    counts: dict[str, Any] = {}
    t_last, last = time.perf_counter(), {}
    for step in range(start, tc.steps):
        batch, host = task.batch(step)
        for k, v in host.items():
            counts[k] = counts.get(k, 0) + v
        state, metrics = task.step(state, batch)
        pending.append(metrics)
        done = step + 1
        finished.dispatched(metrics)

        if done % tc.log_every == 0 or done == tc.steps:
            fetched = jax.device_get(pending)
            finished.flush()
            dt = time.perf_counter() - t_last
            keys = task.logged if task.logged is not None else tuple(fetched[0])
            last = {k: float(np.mean([m[k] for m in fetched])) for k in keys}
            last.update(
                lr=learning_rate(task.optim_cfg, done),
                skipped_steps=int(jax.device_get(state["skipped"])),
                steps_per_s=len(fetched) / dt,
                **task.summarize(counts, dt),
            )
            writer.write(done, last)
            progress.set_postfix(**{k: f"{last[k]:.4f}" for k in task.postfix})
            pending, counts, t_last = [], {}, time.perf_counter()

        if done == tc.steps:
            state, final = task.finish(state, writer)
            last.update(final)
        if task.eval_due(done):
            scores = task.evaluate(state, done, workdir, writer)
            if scores:
                writer.write(done, scores)
                last.update(scores)
        ckpt.save(done, state, data_iter=task.data_iter, config=c, force=done == tc.steps)
        if done < tc.steps and preemption.reached(done):
            if pending:  # the partial logging interval, so no step's metrics are lost
                fetched = jax.device_get(pending)
                keys = task.logged if task.logged is not None else tuple(fetched[0])
                writer.write(done, {k: float(np.mean([m[k] for m in fetched])) for k in keys})
            ckpt.save(done, state, data_iter=task.data_iter, config=c, force=True)
            ckpt.wait()
            waited = time.monotonic() - preemption.signalled if preemption.signalled else None
            log.warning(
                "preempted: checkpoint of step %d committed in %s%s; stopping (rerun to continue)",
                done,
                workdir,
                f" {waited:.1f} s after SIGTERM" if waited is not None else "",
            )
            last["preempted_at_step"] = done
            break
    finished.flush()
    progress.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    return last

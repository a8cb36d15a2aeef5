"""What the one training loop (vdit/train/loop.py) needs from a model: the `Task` interface.

A task owns the model's state layout (`ShardedState`), its jitted step, its batches and its
evaluation; the loop owns what every model shares (restore-or-init, logging, checkpoints, progress).
The DiT (vdit/train/dit_task.py) and the VAE (vdit/train/vae_task.py) are the two tasks.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from vdit.train.metrics import MetricsWriter
from vdit.train.state import OptimConfig, ShardedState, State


class Task:
    """What the loop needs from one model. Subclasses set `config`, `state`, `optim_cfg`."""

    config: ml_collections.ConfigDict  # the loaded (validated) config
    state: ShardedState  # the train state's layout and init
    optim_cfg: OptimConfig
    data_iter: Any = None  # a checkpointable data iterator saved with the state, or None
    logged: tuple[str, ...] | None = None  # step metrics averaged into the log (None: all)
    postfix: tuple[str, ...] = ("loss",)  # logged metrics shown on the progress bar

    def describe(self) -> str:
        """One log line about the run."""
        return f"mesh {dict(self.state.mesh.shape)}, {self.state.num_params():,} parameters"

    def start(self, workdir: str) -> None:
        """Before the first step (every process): files the run's work directory keeps."""

    def batch(self, step: int) -> tuple[Any, dict[str, Any]]:
        """(the step's device batch, host-side counts summed over a log interval)."""
        raise NotImplementedError

    def step(self, state: State, batch: Any) -> tuple[State, dict[str, jax.Array]]:
        """The jitted train step (donates `state`)."""
        raise NotImplementedError

    def summarize(self, counts: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Metrics of a log interval from its summed host counts."""
        return {}

    def finish(self, state: State, writer: MetricsWriter) -> tuple[State, dict[str, Any]]:
        """The last step's state before its evaluation and checkpoint, and metrics about it."""
        return state, {}

    def eval_due(self, done: int) -> bool:
        return done == self.config.train.steps

    def evaluate(self, state: State, done: int, workdir: str, writer: MetricsWriter) -> dict:
        """Evaluation metrics at step `done` (files it writes go under `workdir`)."""
        return {}

"""Metrics a person can open: WORKDIR/metrics.jsonl and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(os.fspath(workdir), "metrics.jsonl")
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(os.fspath(workdir), exist_ok=True)
            _drop_partial_line(self.path)
            self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time()}
        for k, v in metrics.items():
            v = np.asarray(v).item() if np.ndim(v) == 0 else v
            row[k] = v
            if isinstance(v, int | float) and self._tb is not None:
                self._tb.add_scalar(k, v, step)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_video(self, tag: str, step: int, video: np.ndarray, fps: int) -> None:
        """uint8 (T, H, W, 3) to TensorBoard (needs moviepy for an animation; else first frame)."""
        if self._tb is None:
            return
        self._tb.add_image(tag, video[0], step, dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _drop_partial_line(path: str) -> None:
    """A process killed while appending leaves half a line: cut it, so the next row starts on a
    line of its own and every line stays JSON."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            logging.getLogger(__name__).warning(
                "%s ended in a partial line (a killed run); removed it", path
            )


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    with open(os.path.join(os.fspath(workdir), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class _NoProgress:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def progress_bar(start: int, total: int, enabled: bool):
    """A tqdm bar over steps `start..total`, or a silent stand-in (other processes, tests)."""
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


class FinishedSteps:
    """Advances a progress bar as steps finish on the device, not as they are dispatched.

    The loop dispatches a step and goes on (JAX runs it asynchronously), so counting dispatches
    runs ahead of the device and then stalls at every fetch. Each dispatched step's metrics are
    kept here; `poll` advances the bar over the leading ones that are ready (without waiting), and
    `flush` over all of them once they have been fetched."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self._pending: collections.deque = collections.deque()

    def dispatched(self, metrics: dict[str, Any]) -> None:
        self._pending.append(jax.tree.leaves(metrics))
        self.poll()

    def poll(self) -> None:
        n = 0
        while self._pending and all(_ready(x) for x in self._pending[0]):
            self._pending.popleft()
            n += 1
        if n:
            self.bar.update(n)

    def flush(self) -> None:
        """Every dispatched step has finished (its metrics were fetched)."""
        if self._pending:
            self.bar.update(len(self._pending))
            self._pending.clear()


def _ready(x: Any) -> bool:
    return x.is_ready() if isinstance(x, jax.Array) else True

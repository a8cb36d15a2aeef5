"""Checkpointing of train state, data iterator state and config with orbax.

A checkpoint step directory holds three composite items:

- ``state``: the train-state pytree (``StandardSave``/``StandardRestore``); restoring
  into abstract arrays that carry a sharding reshards onto that (possibly different)
  mesh, which is what makes elastic restarts work.
- ``data``: the grain iterator state, one JSON file per process
  (``process_{index}-of-{count}.json``, grain's own orbax handler), so restoring
  requires the same process count.
- ``config``: the experiment config as JSON, so a checkpoint directory is
  self-describing.

Faults (BUILD.md, "Preemption and faults"): orbax writes a step into
``<step>.orbax-checkpoint-tmp*`` and renames it when committed, so a process killed during a save
leaves a temporary directory that is never read as a step; the training loop's Checkpointer
(``remove_uncommitted=True``) logs and removes those when it opens. Restoring the latest step
falls back to the newest step that restores (a file of a committed step truncated or deleted),
logs the step it skipped and why, and sets the skipped ones aside as ``<step>.corrupt`` so the
resumed run can write that step again. A save that cannot write (a full disk, an unwritable
directory) raises `CheckpointWriteError`; the steps already committed stay restorable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["STATE", "CheckpointWriteError", "Checkpointer", "read_config"]

log = logging.getLogger(__name__)

STATE = "state"
DATA = "data"
CONFIG = "config"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's uncommitted step directories carry it
CORRUPT_SUFFIX = ".corrupt"  # a committed step that does not restore, set aside


class ProcessCountError(ValueError):
    """The checkpoint's data-iterator state is of a run with another process count."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, unwritable directory); the steps already
    committed are untouched. `errno` is the cause's."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Registry binding each item name to its handler (one instance for save and restore)."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = ocp.handlers.StandardCheckpointHandler()
    registry.add(STATE, ocp.args.StandardSave, state_handler)
    registry.add(STATE, ocp.args.StandardRestore, state_handler)
    data_handler = grain.checkpoint.CheckpointHandler()
    registry.add(DATA, grain.checkpoint.CheckpointSave, data_handler)
    registry.add(DATA, grain.checkpoint.CheckpointRestore, data_handler)
    config_handler = ocp.handlers.JsonCheckpointHandler()
    registry.add(CONFIG, ocp.args.JsonSave, config_handler)
    registry.add(CONFIG, ocp.args.JsonRestore, config_handler)
    return registry


def _config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of an ``ml_collections.ConfigDict`` (best effort) or a mapping."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config), default=repr))
    raise TypeError(f"config must be a ConfigDict or a mapping, got {type(config).__name__}")


def _to_abstract(leaf: Any) -> Any:
    """Restore target for one leaf: arrays become ShapeDtypeStructs with their sharding."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, np.generic):
        return np.asarray(leaf)
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
        raise ValueError(
            "abstract_state leaves must carry a sharding (jax.ShapeDtypeStruct(..., "
            "sharding=...)); found one without"
        )
    return leaf


class Checkpointer:
    """Saves and restores (train state, data iterator, config) with an orbax CheckpointManager.

    ``save`` is asynchronous by default: it returns once device arrays are copied to
    host and the iterator state is written; files are committed in the background.
    Call ``wait()`` before reading a checkpoint from elsewhere, and ``close()`` (or use
    the object as a context manager) before exiting. All processes must call ``save``
    and ``restore`` together.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int | None = 3,
        async_save: bool = True,
        remove_uncommitted: bool = False,
    ) -> None:
        """Opens (creating if needed) ``directory``; ``keep=None`` keeps every step.
        ``remove_uncommitted``: delete (and log) the temporary directories of saves that never
        committed, for the run that owns the directory (never while another process saves)."""
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        # orbax needs absolute paths (a relative one fails when the async save commits).
        self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
        if remove_uncommitted and jax.process_index() == 0 and self.directory.exists():
            for tmp in sorted(p.name for p in self.directory.iterdir() if TMP_SUFFIX in p.name):
                log.warning(
                    "removing %s in %s: a save that never committed (the process stopped "
                    "during it); it is not a checkpoint",
                    tmp,
                    self.directory,
                )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=remove_uncommitted,
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, handler_registry=_handler_registry()
            )
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot open the checkpoint directory {self.directory}: {_reason(e)}", e.errno
            ) from e

    def all_steps(self) -> list[int]:
        """Steps currently kept (including one whose async save is still in flight)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Latest saved step, or None if there is none."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` would write a checkpoint."""
        return int(step) not in self._manager.all_steps() and self._manager.should_save(step)

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iter: Any = None,
        config: Any = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` (plus iterator state and config, if given) at ``step``.

        Without ``force`` a checkpoint is written on multiples of ``save_every`` past
        the latest step, and (orbax's initial-save policy) on the first call when the
        directory holds no checkpoint yet. A step that already exists is never
        overwritten: the call is skipped (returns False), also with ``force``.
        Returns whether it saved.
        """
        step = int(step)
        if step in self._manager.all_steps():
            log.info("checkpoint for step %d already exists in %s; skipping", step, self.directory)
            return False
        if not force and not self._manager.should_save(step):
            return False
        items: dict[str, Any] = {STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(_config_to_dict(config))
        with self._writing(step):
            return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    @contextlib.contextmanager
    def _writing(self, step: int | None):
        """Turns an OSError of a save (now, or of the async one still committing) into a
        CheckpointWriteError naming the directory, the step and the cause."""
        try:
            yield
        except OSError as e:
            if isinstance(e, CheckpointWriteError):
                raise
            what = f"checkpoint step {step}" if step is not None else "a checkpoint"
            raise CheckpointWriteError(
                f"could not write {what} to {self.directory}: {_reason(e)}; free space or fix "
                f"the directory's permissions, then rerun: the run resumes from the last "
                f"committed step ({self._committed_steps() or 'none yet'})",
                e.errno,
            ) from e

    def restore(
        self, abstract_state: Any, *, step: int | None = None, data_iter: Any = None
    ) -> tuple[Any, int]:
        """Restores the state at ``step`` (default: latest) as ``(state, step)``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``.sharding``
        set (concrete ``jax.Array`` leaves also work and give their sharding); the
        restored arrays are laid out accordingly, whatever mesh they were saved from.
        If ``data_iter`` is given, its state is restored in place.

        An explicit ``step`` restores that step or raises. The latest (``step=None``) falls back
        to the newest step that restores when newer ones do not (a file truncated or deleted
        after the commit): each skipped step is logged with its error and, once an older one has
        restored, set aside as ``<step>.corrupt``. With none restorable: one FileNotFoundError
        listing every step's error. All processes agree on the step (a step fails if it fails
        on any of them).
        """
        if step is not None:
            step = self.resolve_step(step)
            return self._restore(step, abstract_state, data_iter), step
        self.wait()
        steps = sorted(self._manager.all_steps(), reverse=True) if self.directory.exists() else []
        if not steps:
            raise FileNotFoundError(f"no checkpoints found in {self.directory}")
        failed: list[tuple[int, str]] = []
        for s in steps:
            try:
                state, error = self._restore(s, abstract_state, data_iter), None
            except ProcessCountError:
                raise  # not a damaged step: every step would say the same
            except Exception as e:  # a corrupt or partial step: logged, then an older one is tried
                state, error = None, f"{type(e).__name__}: {_first_line(e)}"
            error = _agree(error)
            if error is None:
                self._set_aside(failed)
                return state, s
            log.warning(
                "checkpoint step %d in %s does not restore (%s); trying an older step",
                s,
                self.directory,
                error,
            )
            failed.append((s, error))
        raise FileNotFoundError(
            f"no restorable checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {e}" for s, e in failed)
            + "; delete the directory (or move it away) to start afresh"
        )

    def _restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
        items: dict[str, Any] = {
            STATE: ocp.args.StandardRestore(jax.tree.map(_to_abstract, abstract_state))
        }
        if data_iter is not None:
            if not (self.directory / str(step) / DATA).exists():
                raise FileNotFoundError(
                    f"checkpoint step {step} in {self.directory} has no data iterator state"
                )
            _check_process_count(self.directory / str(step) / DATA)
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE]

    def _set_aside(self, failed: list[tuple[int, str]]) -> None:
        """Renames the steps that did not restore (newer than the one that did) to
        ``<step>.corrupt[.N]``: out of orbax's sight, so the resumed run writes them again."""
        if not failed:
            return
        if jax.process_index() == 0:
            for s, error in failed:
                target = self.directory / f"{s}{CORRUPT_SUFFIX}"
                n = 1
                while target.exists():
                    target, n = self.directory / f"{s}{CORRUPT_SUFFIX}.{n}", n + 1
                (self.directory / str(s)).rename(target)
                log.warning(
                    "skipped checkpoint step %d (%s): moved to %s; resuming from an older step",
                    s,
                    error,
                    target,
                )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("vdit_checkpoint_set_aside")
        self._manager.reload()

    def _committed_steps(self) -> list[int]:
        try:
            return sorted(ocp.utils.checkpoint_steps(self.directory))
        except OSError:
            return []

    def read_config(self, step: int | None = None) -> dict[str, Any]:
        """The config stored with ``step`` (default: latest) as a dict."""
        return _restore_config(self._manager, self.directory, self.resolve_step(step))

    def wait(self) -> None:
        """Blocks until any in-flight async save is committed (CheckpointWriteError if it
        could not be written)."""
        with self._writing(None):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases resources."""
        with self._writing(None):
            self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def resolve_step(self, step: int | None) -> int:
        """Waits for pending saves, then checks ``step`` (None: latest) is restorable."""
        if not self.directory.exists():
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        self.wait()
        return _pick_step(self._manager.all_steps(), step, self.directory)


def _reason(e: OSError) -> str:
    """'No space left on device (ENOSPC)' and the like, for an OSError from anywhere in orbax."""
    if e.errno in errno.errorcode:
        return f"{os.strerror(e.errno)} ({errno.errorcode[e.errno]})"
    return _first_line(e)


def _first_line(e: BaseException, limit: int = 240) -> str:
    """The error's first line, cut to `limit` characters (tensorstore appends its whole spec)."""
    text = str(e).strip()
    line = text.splitlines()[0].split(" [tensorstore_spec=")[0] if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _agree(error: str | None) -> str | None:
    """The error of one restore attempt, agreed over processes: None only if every process
    restored (otherwise they would resume from different steps)."""
    if jax.process_count() == 1:
        return error
    from jax.experimental import multihost_utils

    ok = multihost_utils.process_allgather(np.asarray(error is None))
    if bool(np.all(ok)):
        return None
    return error or f"failed on process(es) {np.flatnonzero(~np.asarray(ok)).tolist()}"


def _check_process_count(data_dir: epath.Path) -> None:
    """The iterator state is per process: a run with another process count cannot continue it."""
    index, count = jax.process_index(), jax.process_count()
    if (data_dir / f"process_{index}-of-{count}.json").exists():
        return
    saved = sorted(
        {
            m.group(1)
            for p in data_dir.iterdir()
            if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", p.name))
        }
    )
    if str(count) in saved or not saved:  # this count's file is missing: a damaged step
        raise FileNotFoundError(f"{data_dir} has no process_{index}-of-{count}.json")
    raise ProcessCountError(
        f"{data_dir} holds the data-iterator state of a run of {' or '.join(saved)} "
        f"processes, this run has {count}: resume with the same process count (the mesh and the "
        "device count may differ), or start the data afresh in a new work directory"
    )


def _pick_step(steps: Any, step: int | None, directory: epath.Path) -> int:
    """``step`` if it is among ``steps`` (None: the latest), else FileNotFoundError."""
    steps = sorted(steps)
    if step is None:
        if not steps:
            raise FileNotFoundError(f"no checkpoints found in {directory}")
        return steps[-1]
    if int(step) not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory} (have {steps})")
    return int(step)


def _restore_config(
    manager: ocp.CheckpointManager, directory: epath.Path, step: int
) -> dict[str, Any]:
    """Reads the ``config`` item of ``step``."""
    if not (directory / str(step) / CONFIG).exists():
        raise FileNotFoundError(f"checkpoint step {step} in {directory} has no config")
    restored = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
    return restored[CONFIG]


def read_config(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Reads the config stored in checkpoint ``directory`` (at ``step``, default latest)."""
    return read_config_and_step(directory, step)[0]


def read_config_and_step(
    directory: str | os.PathLike, step: int | None = None
) -> tuple[dict[str, Any], int]:
    """(the stored config, the step) of checkpoint ``directory`` at ``step`` (default: the latest
    committed one), read without opening a checkpoint manager (nothing is written or locked)."""
    path = epath.Path(os.path.abspath(os.fspath(directory)))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    step = _pick_step(ocp.utils.checkpoint_steps(path), step, path)
    if not (path / str(step) / CONFIG).exists():
        raise FileNotFoundError(f"checkpoint step {step} in {path} has no config")
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        return checkpointer.restore(path / str(step) / CONFIG), step

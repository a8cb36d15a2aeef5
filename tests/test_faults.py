"""Faults a run survives: SIGTERM (preemption), kill -9, a corrupt latest checkpoint, a full disk,
a data source whose every sample is rejected. Each resumed run is compared bit for bit with one
that never stopped (losses and parameters).

The loop tests run `vdit.train.loop.run` on a toy task (a linear model on a grain stream, compiled
in a second) so they fit the default suite; the slow ones kill real `vdit train` processes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import ROOT

from vdit.data import latents, pipeline, size
from vdit.train import loop
from vdit.train.checkpoint import Checkpointer, CheckpointWriteError, read_config_and_step
from vdit.train.state import OptimConfig
from vdit.train.task import Task


# ----------------------------------------------------------------------------------------------
# A toy task: the loop's whole contract (state, step, a checkpointable data iterator) in miniature
# ----------------------------------------------------------------------------------------------
class _ToyState:
    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.sharding = NamedSharding(mesh, P())

    def init(self):
        return {
            "params": {"w": jnp.zeros((8, 4), jnp.float32), "b": jnp.zeros((4,), jnp.float32)},
            "step": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32),
        }

    def abstract_sharded(self):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.sharding),
            jax.eval_shape(self.init),
        )

    def num_params(self) -> int:
        return 36


def _example(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    return {"x": x, "y": (x @ np.arange(32).reshape(8, 4) / 10).astype(np.float32)}


@jax.jit
def _toy_step(state, batch):
    def loss_fn(p):
        return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    params = jax.tree.map(lambda p, g: p - 0.01 * g, state["params"], grads)
    return {**state, "params": params, "step": state["step"] + 1}, {"loss": loss}


class ToyTask(Task):
    def __init__(self, steps: int, checkpoint_every: int, on_batch=None):
        self.config = ml_collections.ConfigDict(
            {
                "train": {
                    "steps": steps,
                    "log_every": 1,  # every step's loss is logged: compared step by step
                    "checkpoint_every": checkpoint_every,
                    "keep_checkpoints": None,
                    "progress": False,
                }
            }
        )
        self.optim_cfg = OptimConfig(
            lr=0.01,
            warmup_steps=0,
            min_lr_ratio=1.0,
            weight_decay=0.0,
            b1=0.9,
            b2=0.99,
            grad_clip=1.0,
            ema_decay=0.0,
            total_steps=steps,
        )
        self.state = _ToyState(Mesh(np.asarray(jax.devices()[:1]), ("data",)))
        ds = grain.MapDataset.range(1_000_000).shuffle(seed=0).map(_example)
        self.data_iter = iter(ds.to_iter_dataset())
        self.on_batch = on_batch

    def batch(self, step: int):
        if self.on_batch is not None:
            self.on_batch(step)
        return jax.device_put(next(self.data_iter), self.state.sharding), {}

    def step(self, state, batch):
        return _toy_step(state, batch)


def _losses(workdir) -> dict[int, float]:
    """Each step's logged loss; a step run twice (after a restart) keeps its last row."""
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


def _params(workdir, step=None):
    task = ToyTask(1, 1)
    with Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=None) as ckpt:
        state, _ = ckpt.restore(task.state.abstract_sharded(), step=step)
    return jax.device_get(state)


def _assert_same_run(a, b, upto: int) -> None:
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, upto + 1))
    assert la == lb  # bit for bit: floats compared exactly
    pa, pb = _params(a, upto), _params(b, upto)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """8 uninterrupted steps, a checkpoint at 4 and 8."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    loop.run(ToyTask(8, 4), workdir)
    return workdir


# ----------------------------------------------------------------------------------------------
# 2. SIGTERM: save the step reached, exit cleanly, resume from exactly there
# ----------------------------------------------------------------------------------------------
def test_sigterm_saves_the_step_reached_and_the_resumed_run_is_bit_exact(tmp_path, reference):
    workdir = str(tmp_path)

    def preempt(step):
        if step == 2:  # while step 3 is prepared: the loop stops after it
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    last = loop.run(ToyTask(8, 4, on_batch=preempt), workdir)
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the loop's only
    assert last["preempted_at_step"] == 3
    with Checkpointer(os.path.join(workdir, "checkpoints"), save_every=4) as ckpt:
        # 3 committed, not a step of the schedule (1 is orbax's initial save)
        assert ckpt.all_steps() == [1, 3]
    assert sorted(_losses(workdir)) == [1, 2, 3]
    loop.run(ToyTask(8, 4), workdir)
    _assert_same_run(reference, workdir, 8)


# ----------------------------------------------------------------------------------------------
# 1. kill -9 (in miniature: an uncommitted save left behind is never read, and removed)
# ----------------------------------------------------------------------------------------------
def test_an_uncommitted_save_is_ignored_and_removed(tmp_path, reference, caplog):
    workdir = str(tmp_path)
    loop.run(ToyTask(4, 4), workdir)  # the reference's first half, checkpoint at 4
    ckpts = tmp_path / "checkpoints"
    # What a process killed during an async save of step 8 leaves: orbax's temporary directory,
    # and half a line at the end of metrics.jsonl.
    shutil.copytree(ckpts / "4", ckpts / "8.orbax-checkpoint-tmp-1234")
    (ckpts / "8.orbax-checkpoint-tmp-1234" / "state" / "_METADATA").write_text("{")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    with caplog.at_level("WARNING"):
        loop.run(ToyTask(8, 4), workdir)
    assert "8.orbax-checkpoint-tmp-1234" in caplog.text and "never committed" in caplog.text
    assert "partial line" in caplog.text
    assert sorted(p.name for p in ckpts.iterdir()) == ["1", "4", "8"]
    _assert_same_run(reference, workdir, 8)


# ----------------------------------------------------------------------------------------------
# 3. A corrupt or partial latest checkpoint: fall back to the newest good step
# ----------------------------------------------------------------------------------------------
def _array_files(step_dir) -> list[str]:
    """The files holding the state's array bytes (tensorstore OCDBT data files)."""
    state = os.path.join(step_dir, "state")
    found = [os.path.join(d, f) for d, _, names in os.walk(state) for f in names]
    return [f for f in found if os.path.basename(os.path.dirname(f)) == "d"]


def _truncate_arrays(step_dir) -> None:
    for f in _array_files(step_dir):
        os.truncate(f, os.path.getsize(f) // 2)


def _delete_arrays(step_dir) -> None:
    for f in _array_files(step_dir):
        os.remove(f)


DAMAGES = {  # a file of a committed step, damaged after the commit
    "array data truncated": _truncate_arrays,
    "array data deleted": _delete_arrays,
    "ocdbt manifest deleted": lambda d: os.remove(d / "state" / "manifest.ocdbt"),
    "iterator state truncated": lambda d: os.truncate(d / "data" / "process_0-of-1.json", 5),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_good_step(
    tmp_path, reference, caplog, damage
):
    workdir = str(tmp_path)
    loop.run(ToyTask(6, 2), workdir)  # checkpoints 1 (orbax's first save), 2, 4, 6
    ckpts = epath.Path(tmp_path / "checkpoints")
    DAMAGES[damage](ckpts / "6")
    DAMAGES[damage](ckpts / "4")
    with caplog.at_level("INFO"):
        loop.run(ToyTask(8, 4), workdir)  # resumes from 2
    text = caplog.text
    assert (
        "checkpoint step 6" in text and "checkpoint step 4" in text and "does not restore" in text
    )
    assert "skipped checkpoint step 6" in text and "6.corrupt" in text
    assert "resumed from step 2" in text
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["1", "2", "4", "4.corrupt", "6.corrupt", "8"]  # 4 written again
    assert read_config_and_step(ckpts)[1] == 8  # the loader's step lookup ignores the set-aside
    _assert_same_run(reference, workdir, 8)


def test_no_restorable_checkpoint_is_one_clear_error(tmp_path):
    workdir = str(tmp_path)
    loop.run(ToyTask(4, 2), workdir)
    ckpts = epath.Path(tmp_path / "checkpoints")
    for step in ("1", "2", "4"):
        DAMAGES["array data truncated"](ckpts / step)
    with pytest.raises(FileNotFoundError, match="no restorable checkpoint") as e:
        loop.run(ToyTask(8, 4), workdir)
    assert all(f"step {s}: " in str(e.value) for s in (4, 2, 1))
    assert sorted(p.name for p in ckpts.iterdir()) == ["1", "2", "4"]  # nothing moved or deleted


# ----------------------------------------------------------------------------------------------
# 4. A full disk during a save: a clear error, the previous checkpoint stays restorable
# ----------------------------------------------------------------------------------------------
def _full_disk_from(monkeypatch, step: int) -> None:
    """Every file write into checkpoint step `step` (orbax's temporary directory) fails with
    ENOSPC, as on a full disk; other writes go through."""
    path_cls = type(epath.Path("/"))
    for name in ("write_text", "write_bytes"):
        original = getattr(path_cls, name)

        def write(self, *args, _original=original, **kwargs):
            if f"/checkpoints/{step}." in os.fspath(self):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(path_cls, name, write)


def test_a_full_disk_during_a_save_is_a_clear_error_and_the_last_checkpoint_restores(
    tmp_path, reference, monkeypatch
):
    workdir = str(tmp_path)
    _full_disk_from(monkeypatch, 8)
    with pytest.raises(CheckpointWriteError, match="No space left on device") as e:
        loop.run(ToyTask(8, 4), workdir)
    message = str(e.value)
    assert "checkpoint step 8" in message and "[1, 4]" in message and "\n" not in message
    monkeypatch.undo()
    with Checkpointer(os.path.join(workdir, "checkpoints"), save_every=4) as ckpt:
        assert ckpt.all_steps() == [1, 4]
    loop.run(ToyTask(8, 4), workdir)  # the rerun resumes from 4
    _assert_same_run(reference, workdir, 8)


def test_a_full_disk_is_one_line_through_the_cli(tmp_path, monkeypatch, capsys):
    from vdit import cli
    from vdit.cli import model

    _full_disk_from(monkeypatch, 1)
    monkeypatch.setattr(model, "_train_and_evaluate", lambda c, w: loop.run(ToyTask(2, 2), w))
    args = ["train", f"--config={ROOT}/configs/default.py", f"--workdir={tmp_path}"]
    with pytest.raises(SystemExit) as e:
        cli.run(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("vdit train: error: could not write checkpoint step 1")
    assert "No space left on device (ENOSPC)" in err


# ----------------------------------------------------------------------------------------------
# 5. A source whose every sample is rejected stops with the counts by reason
# ----------------------------------------------------------------------------------------------
def _pipeline_cfg(**data):
    from tiny import tiny_config

    from vdit import configlib

    c = tiny_config()
    for k, v in data.items():
        setattr(c.data, k, v)
    return configlib.pipeline_config(configlib.load(c))


def test_a_source_of_only_rejected_samples_stops_with_counts_by_reason():
    cfg = _pipeline_cfg(max_consecutive_rejections=10)
    empty = {"video": np.zeros((0, 16, 16, 3), np.uint8), "caption": "", "index": 0}
    small = {"video": np.zeros((4, 2, 16, 3), np.uint8), "caption": "", "index": 1}
    source = grain.MapDataset.source([empty, small, small] * 10)  # 30: unbounded, StopIteration
    with pytest.raises(ValueError, match="11 samples in a row were rejected") as e:
        next(iter(pipeline.prepare_samples(source, cfg)))
    assert "too_small 7, empty 4" in str(e.value)
    assert "data.max_consecutive_rejections" in str(e.value)
    # Ten rejections in a row are still within the bound: the next good sample comes through.
    good = {"video": np.zeros((4, 16, 16, 3), np.uint8), "caption": "ok", "index": 2}
    source = grain.MapDataset.source([small] * 10 + [good])
    (out,) = list(pipeline.prepare_samples(source, cfg))
    assert out["stats"][0, size.STATS.index("rejected_too_small")] == 10


def test_the_rejection_bound_is_checked_and_a_saved_config_without_it_gets_the_default():
    with pytest.raises(ValueError, match="data.max_consecutive_rejections=0 must be >= 1"):
        pipeline.build(_pipeline_cfg(max_consecutive_rejections=0))
    from tiny import tiny_config

    from vdit import configlib

    c = tiny_config()
    del c.data["max_consecutive_rejections"]  # a checkpoint's config from before the setting
    assert configlib.pipeline_config(configlib.load(c)).max_consecutive_rejections == 1000


def test_latents_encoded_for_another_cap_or_patch_are_named_at_start(caplog):
    manifest = {"options": {"max_tokens_per_sample": 0, "patch": [1, 2, 2]}}
    with caplog.at_level("WARNING"):
        notes = latents.check_encoded_for(manifest, (1, 2, 2), 1024)
    assert len(notes) == 1 and "max_tokens_per_sample=0 (no cap)" in notes[0]
    assert "data.max_tokens_per_sample=1024" in caplog.text and "over_cap" in caplog.text
    manifest = {"options": {"max_tokens_per_sample": 1024, "patch": [2, 2, 2]}}
    assert "patch (2, 2, 2)" in latents.check_encoded_for(manifest, (1, 2, 2), 1024)[0]
    # what `vdit encode --config=configs/latent.py` writes agrees with configs/latent.py
    from tiny import load_config_module

    from vdit import encode

    c = load_config_module(os.path.join(ROOT, "configs", "latent.py")).get_config()
    o = encode.options_from_config(c)
    assert o.max_tokens_per_sample == c.data.max_tokens_per_sample == 1024
    manifest = {"options": {"max_tokens_per_sample": o.max_tokens_per_sample, "patch": o.patch}}
    from vdit import configlib

    pc = configlib.pipeline_config(configlib.load(c, plan_only=True))
    assert latents.check_encoded_for(manifest, pc.patch, pc.max_tokens_per_sample) == []


# ----------------------------------------------------------------------------------------------
# 1 and 2 on real `vdit train` processes (bench/faults.py runs many more)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_train_process_killed_inside_an_async_save_resumes_bit_exact(tmp_path):
    """`vdit train` killed with SIGKILL while an async save is on disk as a temporary directory:
    the rerun ends at the last step with every logged loss and the final raw and EMA parameters
    equal to an uninterrupted run's, bit for bit. (bench/faults.py runs many such trials, random
    kills and SIGTERMs; SIGTERM's bit-exact resume is tested on the toy task above.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vdit_bench_faults", f"{ROOT}/bench/faults.py")
    faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults)
    e = faults.env(str(tmp_path / "jax-cache"))  # the rerun and the killed run reuse its compile
    ref = str(tmp_path / "reference")
    assert faults.run_to_end(faults.train_cmd(ref), e, ref + ".log") == 0
    r = faults.trial(faults.IN_SAVE, str(tmp_path / "killed"), 5, 0.0, e, faults.params(ref), ref)
    assert r["landed"] and r["during_save"] and r["exit_code"] == -signal.SIGKILL, r
    assert r["survived"] and r["bit_exact"], r


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """Two `vdit train` processes (4 CPU devices each, one mesh); SIGTERM reaches process 1 only.
    JAX's preemption service makes both stop at one step: both exit 0, both log that step, and
    its checkpoint is committed with the data-iterator state of each process."""
    import socket
    import subprocess
    import sys
    import time

    from test_cli import TINY_FLAGS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
    )
    workdir = tmp_path / "run"
    procs = []
    for i in range(2):
        cmd = [
            *(sys.executable, "-m", "vdit.cli", "train", *TINY_FLAGS),
            *("--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.train.progress=False"),
            "--config.train.checkpoint_every=1000",
            "--config.train.steps=1000",
            f"--workdir={workdir}",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        with open(tmp_path / f"p{i}.err", "w") as err:
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err)
            )
    try:
        metrics, t0 = workdir / "metrics.jsonl", time.monotonic()
        while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() - t0 < 600:
            assert all(p.poll() is None for p in procs), "a process ended before training began"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    finals = [json.loads(out.decode().strip().splitlines()[-1]) for out in outs]
    step = finals[0]["preempted_at_step"]
    assert finals[1]["preempted_at_step"] == step < 1000
    ckpt = workdir / "checkpoints" / str(step)
    assert sorted(f for f in os.listdir(ckpt / "data") if f.startswith("process_")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    for i in range(2):
        assert (
            f"preempted: checkpoint of step {step} committed"
            in (tmp_path / f"p{i}.err").read_text()
        )


def test_progress_bar_counts_finished_steps_not_dispatched_ones(monkeypatch):
    """The bar advances over the leading steps whose metrics are ready, in order, never ahead of
    the device; a fetch (flush) accounts for the rest."""
    from vdit.train import metrics as metrics_lib

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    done: set[int] = set()
    monkeypatch.setattr(metrics_lib, "_ready", lambda x: int(x) in done)
    bar = Bar()
    finished = metrics_lib.FinishedSteps(bar)
    for i in range(3):
        finished.dispatched({"loss": np.int32(i)})
    assert bar.n == 0  # dispatched, none finished
    done.add(2)
    finished.poll()
    assert bar.n == 0  # step 2 is ready but step 0 is not: the bar does not run ahead
    done.add(0)
    finished.poll()
    assert bar.n == 1
    done.add(1)
    finished.poll()
    assert bar.n == 3
    finished.dispatched({"loss": np.int32(7)})
    finished.flush()
    assert bar.n == 4


def test_progress_bar_sees_a_finished_jax_step():
    from vdit.train.metrics import FinishedSteps

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    finished = FinishedSteps(bar)
    loss = jax.jit(lambda x: (x * 2).sum())(jnp.ones(4))
    step_metrics = jax.block_until_ready({"loss": loss, "grad_norm": loss + 1})
    finished.dispatched(step_metrics)  # finished on the device: counted at once
    assert bar.n == 1

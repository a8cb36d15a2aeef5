"""The real entry point: `vdit train` for two steps, then `vdit sample` and `vdit params`."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny import DEFAULT_CONFIG, ROOT

from vdit.data.video_io import read_video

TINY_FLAGS = [
    f"--config={DEFAULT_CONFIG}:mu/4",
    "--config.model.text.width=32",
    "--config.model.text.depth=1",
    "--config.model.text.heads=2",
    "--config.model.text.max_len=32",
    "--config.data.synthetic.frame_choices=(4,)",
    "--config.data.batch_rows=8",
    "--config.data.row_len=256",
    "--config.data.text_len=128",
    "--config.data.max_samples_per_row=8",
    "--config.data.packing_bins=8",
    "--config.data.max_tokens_per_sample=256",
    "--config.train.checkpoint_every=1",
    "--config.train.log_every=1",
    "--config.sample.steps=2",
    "--config.sample.grid_shape=(4,16,16)",
]


PEAK = 1e11  # FLOP/s per device for the logged mfu


def _vdit(*args, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "vdit.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vdit {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    out = _vdit(
        "train",
        *TINY_FLAGS,
        f"--workdir={workdir}",
        "--config.train.steps=2",
        f"--config.train.peak_flops_per_device={PEAK}",
    )
    return workdir, out


def test_train_two_steps_writes_everything(trained):
    workdir, out = trained
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert np.isfinite(final["loss"]) and final["skipped_steps"] == 0
    rows = [json.loads(r) for r in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(0 < r["packing_fill"] <= 1 for r in rows if "loss" in r)
    devices = jax.device_count()  # the subprocess sees the same fake CPU devices (XLA_FLAGS)
    for r in (r for r in rows if "loss" in r):
        assert 0 < r["mfu"] == pytest.approx(r["model_flops_per_s"] / (PEAK * devices))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    grid = read_video(os.path.join(workdir, "samples", "step_0000002.mp4"))
    assert grid.shape[0] == 4  # four frames, the grid of two 16x16 samples upscaled 4x
    assert "grid_color_accuracy" in final


@pytest.mark.parametrize(
    "frames, height, width, ext", [(4, 16, 24, "mp4"), (1, 16, 16, "png"), (3, 8, 12, "gif")]
)
def test_sample_writes_the_asked_shape(trained, tmp_path, frames, height, width, ext):
    workdir, _ = trained
    out_file = str(tmp_path / f"s.{ext}")
    proc = _vdit(
        "sample",
        f"--workdir={workdir}",
        "--prompt=a red square moves left",
        f"--frames={frames}",
        f"--height={height}",
        f"--width={width}",
        "--seed=3",
        f"--out={out_file}",
        "--steps=2",
    )
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["shape"] == [frames, height, width, 3]
    assert read_video(out_file).shape == (frames, height, width, 3)


def test_sample_rejects_a_size_the_patch_cannot_tile(trained, tmp_path):
    workdir, _ = trained
    proc = _vdit(
        "sample", f"--workdir={workdir}", "--height=18", f"--out={tmp_path / 'x.mp4'}", check=False
    )
    assert proc.returncode != 0 and "patch" in proc.stderr


def test_params_prints_every_parameter_and_its_sharding():
    proc = _vdit("params", *TINY_FLAGS, "--config.mesh.data=2", "--config.mesh.fsdp=4")
    assert "mesh {'data': 2, 'fsdp': 4" in proc.stdout
    assert "blocks/mlp/fc1/kernel" in proc.stdout and "'fsdp'" in proc.stdout
    assert "total parameters" in proc.stdout


def test_unknown_command_is_a_usage_error():
    proc = _vdit("fly", check=False)
    assert proc.returncode != 0 and "usage: vdit" in proc.stderr

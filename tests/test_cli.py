"""The real entry point: `vdit train` for two steps, then `vdit sample` and `vdit params`; each
command's own flags and help; one-line errors naming the problem."""

import json
import os
import re
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


def _no_model_load(monkeypatch):
    """Arguments are checked before the model loads: loading it fails the test."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("vdit.cli.model._load_model", load)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--height=18"], "--frames/--height/--width: 18x32 pixels: height and width must be "),
        (["--width=30"], "multiples of 4 and 4 (the patch 4x4"),
        (["--frames=0"], "--frames/--height/--width: (0, 32, 32): frames, height and width must"),
        (["--steps=0"], "--steps=0: sampling takes at least 1 step"),
        (["--upscale=0"], "--upscale=0: must be >= 1"),
    ],
)
def test_sample_checks_its_arguments_first_in_one_line(
    trained, tmp_path, capsys, monkeypatch, args, message
):
    workdir, _ = trained
    _no_model_load(monkeypatch)
    code, out, err = _run(
        capsys, "sample", f"--workdir={workdir}", *args, f"--out={tmp_path}/x.mp4"
    )
    assert code == 2 and out == "", (code, err)
    assert err.count("\n") == 1 and err.startswith("vdit sample: error: "), err
    assert message in err, err
    assert not (tmp_path / "x.mp4").exists()


def test_sample_runs_every_mode_from_one_request_file(trained, tmp_path):
    """One --requests file with every mode and mixed sizes: each output has the asked shape,
    inputs of another size and frame rate are resized / resampled (and said so), one compile."""
    from vdit.data import synthetic
    from vdit.data.video_io import write_video

    workdir, _ = trained
    rng = np.random.default_rng(0)
    spec = synthetic.SampleSpec("red", "square", "right", 8, 32, 48)  # another size and aspect
    clip = synthetic.render(spec, rng)
    write_video(tmp_path / "clip.mp4", clip, fps=16)  # another frame rate: 16 -> 8 fps
    write_video(tmp_path / "first.png", clip[:1])
    lines = [
        {"prompt": "a red square moves right", "frames": 4, "height": 16, "width": 16},
        {"prompt": "a red square", "frames": 1, "height": 16, "width": 24, "out": "img.png"},
        {"image": "first.png", "frames": 4, "height": 16, "width": 16},
        {"video": "clip.mp4", "mode": "extend_backward", "frames": 4, "height": 16, "width": 16},
        {"image": "first.png", "mode": "loop", "frames": 4, "height": 16, "width": 16},
        {"video": "clip.mp4", "video_end": "clip.mp4", "frames": 4, "height": 16, "width": 16},
        {"edit": "clip.mp4", "strength": 0.5, "frames": 4, "height": 16, "width": 16},
    ]
    for r in lines:
        for k in ("image", "video", "video_end", "edit", "out"):
            if k in r:
                r[k] = str(tmp_path / r[k])
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    proc = _vdit(
        "sample",
        f"--workdir={workdir}",
        f"--requests={tmp_path / 'requests.jsonl'}",
        f"--out={tmp_path / 'out.mp4'}",
        "--steps=2",
    )
    *infos, summary = [json.loads(x) for x in proc.stdout.strip().splitlines()]
    want = ["t2v", "t2v", "i2v", "extend_backward", "loop", "connect", "edit"]
    assert [i["mode"] for i in infos] == want
    for r, info in zip(lines, infos, strict=True):
        assert info["shape"] == [r["frames"], r["height"], r["width"], 3]
        assert read_video(info["out"]).shape == tuple(info["shape"])
    assert infos[0]["out"].endswith("out_000.mp4") and infos[1]["out"].endswith("img.png")
    assert summary["requests"] == 7 and summary["compiles"] == 1, summary
    assert "resampled to 4 at 8 fps" in proc.stderr
    assert "32x48 resized to 11x16 (aspect kept) and padded to 16x16" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode=connect", "--video=V"], "mode connect needs --video_end"),
        (["--image=V", "--strength=0.5"], "--strength is the SDEdit strength of --edit"),
        (["--edit=V"], "mode edit needs --strength"),
        (["--image=V", "--frames=1"], "ask for more --frames"),
        (["--image=missing.png"], "--image=missing.png: no such file"),
        (["--requests=R"], "line 1: unknown key 'promt'"),
        (["--text_embedding=E"], "this model encodes its captions itself"),
    ],
)
def test_sample_modes_check_their_inputs_first(
    trained, tmp_path, capsys, monkeypatch, args, message
):
    from vdit.data.video_io import write_video

    workdir, _ = trained
    write_video(tmp_path / "v.png", np.zeros((1, 16, 16, 3), np.uint8))
    (tmp_path / "r.jsonl").write_text('{"promt": "a cat"}\n')
    np.save(tmp_path / "e.npy", np.zeros((3, 32), np.float32))
    subs = {"=V": f"={tmp_path / 'v.png'}", "=R": f"={tmp_path / 'r.jsonl'}"}
    subs["=E"] = f"={tmp_path / 'e.npy'}"
    for a, b in subs.items():
        args = [x.replace(a, b) if x.endswith(a) else x for x in args]
    _no_model_load(monkeypatch)
    code, out, err = _run(capsys, "sample", f"--workdir={workdir}", *args)
    assert code == 2 and out == "", (code, err)
    assert err.count("\n") == 1 and message in err, err


def test_precomputed_text_model_asks_for_an_embedding(trained, capsys, monkeypatch, tmp_path):
    """A precomputed-text model sampled without --text_embedding (or without the empty caption's
    embedding) is a one-line error, before the model loads."""
    from vdit.cli import model as cli_model

    workdir, _ = trained
    read = cli_model._read_config

    def precomputed(w):
        config, step = read(w)
        config.model.text.kind = "precomputed"
        return config, step

    monkeypatch.setattr(cli_model, "_read_config", precomputed)
    _no_model_load(monkeypatch)
    code, _, err = _run(capsys, "sample", f"--workdir={workdir}")
    assert code == 2 and "give the caption's embedding with --text_embedding=FILE.npy" in err
    np.save(tmp_path / "e.npy", np.zeros((3, 32), np.float32))
    code, _, err = _run(
        capsys, "sample", f"--workdir={workdir}", f"--text_embedding={tmp_path}/e.npy"
    )
    assert code == 2 and "--null_text_embedding=FILE.npy" in err, err


def test_eval_refuses_zero_steps_and_prompts(trained, capsys, monkeypatch):
    workdir, _ = trained
    _no_model_load(monkeypatch)
    for flag, message in (("--steps=0", "at least 1 step"), ("--num=0", "at least 1 prompt")):
        code, _, err = _run(capsys, "eval", f"--workdir={workdir}", flag)
        assert code == 2 and err.count("\n") == 1 and f"{flag}: " in err and message in err, err


def test_eval_scores_the_samples_of_the_trained_model(trained):
    workdir, _ = trained
    proc = _vdit("eval", f"--workdir={workdir}", "--num=2", "--steps=1")
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scores["n"] == 2 and 0 <= scores["color_accuracy"] <= 1


def test_params_prints_every_parameter_and_its_sharding():
    proc = _vdit("params", *TINY_FLAGS, "--config.mesh.data=2", "--config.mesh.fsdp=4")
    assert "mesh {'data': 2, 'fsdp': 4" in proc.stdout
    assert "blocks/mlp/fc1/kernel" in proc.stdout and "'fsdp'" in proc.stdout
    assert "total parameters" in proc.stdout


def test_unknown_command_is_a_usage_error():
    proc = _vdit("fly", check=False)
    assert proc.returncode != 0 and "usage: vdit" in proc.stderr


# --- one set of flags per command, one-line errors -----------------------------------------------
DISTRIBUTED = {"train", "sample", "eval", "encode"}  # take the multi-process flags


def _run(capsys, *args):
    """`vdit ARGS` in this process: (exit status, stdout, stderr)."""
    from vdit import cli

    try:
        cli.run(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_vdit_help_lists_the_commands(capsys):
    from vdit import cli

    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for name in cli.COMMANDS:
        assert f"\n  {name} " in out
    code, _, err = _run(capsys)
    assert code == 2 and "usage: vdit COMMAND" in err


@pytest.mark.parametrize(
    "name", ["train", "sample", "eval", "params", "flops", "compile", "prepare", "encode"]
)
def test_each_command_lists_only_its_own_flags(capsys, name):
    code, out, _ = _run(capsys, name, "--help")
    assert code == 0 and out.startswith(f"usage: vdit {name} ") and "\nexample:\n  vdit " in out
    flags = set(re.findall(r"^  --(\w+)", out, re.M))
    assert ("coordinator_address" in flags) == (name in DISTRIBUTED)
    assert ("prompt" in flags) == (name == "sample")
    assert ("config" in flags) == (name not in ("sample", "eval"))  # prepare: configs/prepare.py
    if name in ("prepare", "encode"):  # a folder, required: no sample file name as its default
        assert "sample.mp4" not in out and re.search(r"--out\n.*\(required\)", out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--workdir=W"], "--config is required"),
        (["compile", f"--config={DEFAULT_CONFIG}:mu/4"], "--topology is required"),
        (["train", "--config=configs/nope.py", "--workdir=W"], "no such file 'configs/nope.py'"),
        (["flops", f"--config={DEFAULT_CONFIG}:mu/4", "--config.data.nope=1"], "no field 'nope'"),
        (["flops", f"--config={DEFAULT_CONFIG}:ZZ/4"], "model.variant='ZZ/4'"),
        (["params", f"--config={DEFAULT_CONFIG}:mu/4", "--config.mesh.data=3"], "mesh"),
        (["prepare", "--input=x", "--out=y", "--prompt=z"], "--prompt is not a flag of"),
        (["train", f"--config={DEFAULT_CONFIG}", "--workdi=W"], "did you mean --workdir?"),
        (["sample", "--workdir=W", "extra"], "unexpected argument 'extra'"),
        (["prepare", "--input=x", "--out=y", "--encoding=gif"], "--encoding=gif"),
        (["fly"], "unknown command"),
    ],
)
def test_errors_are_one_line_naming_the_problem(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"vdit {args[0]}: error: "), err
    assert message in err


def test_a_workdir_without_checkpoints_says_so(capsys, tmp_path):
    code, _, err = _run(capsys, "sample", f"--workdir={tmp_path}")
    assert code == 2 and err.count("\n") == 1
    assert f"--workdir={tmp_path}" in err and "vdit train" in err


def test_a_config_error_of_train_is_one_line_before_any_work(tmp_path):
    proc = _vdit(
        "train", *TINY_FLAGS, "--config.data.batch_rows=3", f"--workdir={tmp_path}", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("vdit train: error: data.batch_rows: 3 rows do not split over mesh")
    )
    assert not (tmp_path / "checkpoints").exists()


def test_encode_options_come_from_the_config_the_dit_trains_with():
    from tiny import load_config_module

    from vdit import encode

    c = load_config_module(os.path.join(ROOT, "configs", "latent.py")).get_config("mu/2")
    c.model.patch_t, c.sample.grid_shape = 2, (29, 64, 64)  # 8 latent frames: whole patches
    c.data.max_tokens_per_sample, c.data.time_fit = 512, "trim"
    c.data.frame_stride, c.data.max_fps = 2, 12.0
    o = encode.options_from_config(c, chunk_frames=4, store="sample")
    assert (o.patch, o.max_tokens_per_sample, o.time_fit) == ((2, 2, 2), 512, "trim")
    assert (o.frame_stride, o.max_fps, o.chunk_frames, o.store) == (2, 12.0, 4, "sample")
    assert (o.compression, o.channels) == ((4, 8, 8), 16)
    encode.check_vae(o, (4, 8, 8), 16)
    with pytest.raises(ValueError, match=r"autoencoder.compression=\(4, 8, 8\)"):
        encode.check_vae(o, (2, 2, 2), 16)
    with pytest.raises(ValueError, match="autoencoder.channels=16"):
        encode.check_vae(o, (4, 8, 8), 4)
    with pytest.raises(ValueError, match="autoencoder.kind='identity'"):
        encode.options_from_config(load_config_module().get_config("mu/4"))

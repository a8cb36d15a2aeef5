"""`vdit export`: export -> load round trips, `train.init_from` on another mesh, StableHLO == the
Python model, and one clear error for each bad input. Nothing on a load path unpickles.

The work directories are made directly (an initial state with its parameters and EMA perturbed, so
the model's output is not the zero of adaLN-Zero), saved from 8 devices (data=2, fsdp=4).
"""

import functools
import json
import os
import pickle

import jax
import ml_dtypes
import numpy as np
import pytest
from test_vae import vae_tiny_config
from tiny import restore_state, tiny_config

from vdit import cli, configlib
from vdit.data import packing, pipeline
from vdit.data.tokenizer import tokenize
from vdit.diffusion import sampler
from vdit.export import stablehlo, tensors
from vdit.export.writer import export
from vdit.train import load
from vdit.train.checkpoint import Checkpointer
from vdit.train.dit_task import DiTTask
from vdit.train.loop import train_and_evaluate
from vdit.train.vae_task import VAETask

PROMPT = "a red square moves right"
GRID = (4, 16, 16)  # latent = pixel grid of the identity autoencoder: 64 tokens of the mu/4 model


@functools.partial(jax.jit, static_argnums=(1, 2))
def _perturbed(tree, seed: int, scale: float = 0.05):
    """`tree` plus scaled normal noise, each leaf keeping its sharding."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [
            x + scale * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ]
    )


def _save(workdir, c, state, steps):
    with Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=None) as ckpt:
        for step in steps:
            state = {
                **state,
                "params": _perturbed(state["params"], step),
                "ema": _perturbed(state["ema"], 100 + step),
            }
            ckpt.save(step, state, config=c, force=True)


@pytest.fixture(scope="module")
def dit_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dit"))
    c = tiny_config()
    c.mesh.data, c.mesh.fsdp = 2, 4
    c = configlib.load(c, 8)
    task = DiTTask(c, jax.devices(), data=False)
    _save(workdir, c, task.state.init(), (2, 4))
    return workdir


@pytest.fixture(scope="module")
def vae_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("vae"))
    c = configlib.load(vae_tiny_config(), 1)
    task = VAETask(c, jax.devices()[:1])
    state = task.state.init()
    state["stats"] = _perturbed(state["stats"], 7, 0.5)  # latent statistics of a trained VAE
    _save(workdir, c, state, (3,))
    return workdir


def _latents(loaded, steps=2):
    c = loaded.config
    (x,) = sampler.sample(
        loaded.graphdef,
        loaded.params,
        [sampler.SampleRequest(PROMPT, GRID, seed=0)],
        patch=configlib.patch_size(c),
        channels=c.autoencoder.channels,
        flow_cfg=configlib.flow_config(c),
        steps=steps,
        cfg_scale=3.0,
        text_len=c.model.text.max_len,
    )
    return x


@functools.cache
def _reference_latents(workdir: str, steps: int = 2):
    """The sample of the work directory's own model (computed once per module)."""
    return _latents(load.load(workdir), steps)


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_safetensors_round_trip_is_bit_exact_in_float32(dit_workdir, tmp_path):
    out = str(tmp_path / "st")
    summary = export(dit_workdir, out, max_file_bytes=60_000)  # several files
    ref = load.load(dit_workdir)
    got = load.load(out)
    index = json.load(open(os.path.join(out, tensors.INDEX)))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == [tensors.file_name(i, len(files)) for i in range(len(files))]
    names = tensors.names(ref.params)
    assert set(index["weight_map"]) == set(names)
    assert "blocks.self_attn.q.kernel" in names and "text_encoder.blocks.0.attn.q.kernel" in names
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in names.values())
    meta = json.load(open(os.path.join(out, load.EXPORT)))
    assert (meta["step"], meta["params"], meta["dtype"]) == (4, "ema", "float32")
    assert summary["step"] == 4 and got.step == 4 and got.ema
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(got.params), strict=True):
        _same_bits(a, b)
    sample = _latents(got)
    assert np.abs(sample).max() > 0.1  # the model is not the zero of its initialisation
    _same_bits(_reference_latents(dit_workdir), sample)

    raw = str(tmp_path / "raw")  # the raw parameters of an earlier step are another model
    export(dit_workdir, raw, step=2, ema=False)
    raw_loaded = load.load(raw)
    _same_bits(
        raw_loaded.params["head"]["kernel"],
        load.load(dit_workdir, 2, ema=False).params["head"]["kernel"],
    )
    assert not np.array_equal(raw_loaded.params["head"]["kernel"], got.params["head"]["kernel"])


def test_bfloat16_export_is_the_rounded_model(dit_workdir, tmp_path):
    f32, bf16 = str(tmp_path / "f32"), str(tmp_path / "bf16")
    export(dit_workdir, f32)
    export(dit_workdir, bf16, dtype="bfloat16")
    size = lambda d: sum(
        os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors")
    )
    assert 0.45 < size(bf16) / size(f32) < 0.55
    ref, got = load.load(f32), load.load(bf16)
    rounded = jax.tree.map(
        lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), ref.params
    )
    for a, b in zip(jax.tree.leaves(rounded), jax.tree.leaves(got.params), strict=True):
        _same_bits(a, b)  # loaded back in the model's float32, exactly the rounded values
    s32, s16 = _reference_latents(dit_workdir), _latents(got)
    _same_bits(_latents(load.Loaded(ref.config, ref.graphdef, rounded, None, 4)), s16)
    err = np.abs(s32 - s16).max()
    assert 0 < err < 0.05, err  # bfloat16 rounding of the parameters, nothing more


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_init_from_starts_from_the_exported_parameters_on_another_mesh(dit_workdir, tmp_path, fmt):
    out = str(tmp_path / fmt)
    export(dit_workdir, out, fmt=fmt)
    exported = jax.device_get(load.load(out).params)
    for devices, (data, fsdp) in ((jax.devices()[:1], (1, 1)), (jax.devices(), (1, 8))):
        c = tiny_config()
        c.mesh.data, c.mesh.fsdp = data, fsdp
        c.train.init_from = out
        task = DiTTask(configlib.load(c, len(devices)), devices, data=False)
        targets = task.state.model_targets()
        state = task.state.init(*load.restore_export(out, *targets))
        for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(state["params"]), strict=True):
            _same_bits(a, b)
        for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(state["ema"]), strict=True):
            _same_bits(a, b)
        assert int(state["step"]) == 0
        mu = state["opt_state"][1][0].mu
        assert all(not np.asarray(m).any() for m in jax.tree.leaves(mu))
        kernel = state["params"]["blocks"]["mlp"]["fc1"]["kernel"]
        assert kernel.sharding == task.state.param_shardings["blocks"]["mlp"]["fc1"]["kernel"]
        if fsdp > 1:
            assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // fsdp


@pytest.mark.slow  # two train-step compiles: ~30 s on two idle cores
def test_vdit_train_init_from_takes_one_step_from_the_exported_parameters(dit_workdir, tmp_path):
    """The loop itself: `train.init_from` on (data=2, fsdp=4) == one step by hand on one device
    from the exported parameters (the tolerance of sharded == single device); step 1, not 5."""
    out = str(tmp_path / "orbax")
    export(dit_workdir, out, fmt="orbax")
    c = tiny_config()
    c.sample.grid_prompts = ()
    c.train.steps, c.train.log_every, c.train.init_from = 1, 1, out
    c.mesh.data, c.mesh.fsdp = 2, 4
    metrics = train_and_evaluate(c, str(tmp_path / "finetune"), jax.devices())
    c.mesh.data, c.mesh.fsdp = 1, 1
    c = configlib.load(c, 1)
    task = DiTTask(c, jax.devices()[:1], data=False)
    state = task.state.init(*load.restore_export(out, *task.state.model_targets()))
    rows = next(iter(pipeline.build(configlib.pipeline_config(c))))
    shardings = task.batch_shardings({k: np.ndim(rows[k]) for k in pipeline.DEVICE_KEYS})
    want, step_metrics = task.jit_train_step(shardings)(state, pipeline.to_global(rows, shardings))
    assert metrics["loss"] == pytest.approx(float(step_metrics["loss"]), rel=1e-5)
    got = restore_state(str(tmp_path / "finetune"))
    assert int(got["step"]) == 1 and int(got["opt_state"][1][0].count) == 1
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"]), strict=True):
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-6, rtol=1e-4)


def test_vae_exports_its_parameters_and_latent_statistics(vae_workdir, tmp_path):
    ref = load.load(vae_workdir)
    z = jax.random.normal(jax.random.key(0), (1, 2, 8, 8, 4))
    for fmt in ("safetensors", "orbax"):
        out = str(tmp_path / fmt)
        export(vae_workdir, out, fmt=fmt)
        got = load.load(out)
        for a, b in zip(
            jax.tree.leaves((ref.params, ref.buffers)),
            jax.tree.leaves((got.params, got.buffers)),
            strict=True,
        ):
            _same_bits(a, b)
        _same_bits(
            ref.model().decode(ref.model().denormalize(z)),
            got.model().decode(got.model().denormalize(z)),
        )
    assert float(np.abs(np.asarray(got.buffers["latent_std"]) - 1).max()) > 0.1


def test_stablehlo_artifact_equals_the_python_model(dit_workdir, tmp_path):
    out = str(tmp_path / "hlo")
    export(dit_workdir, out, fmt="stablehlo", shape=GRID, batch=1)
    manifest, params, programs = stablehlo.load(out)
    forward, step = programs[stablehlo.FORWARD], programs[stablehlo.STEP]
    assert forward.platforms == ("cpu", "tpu", "cuda") == step.platforms
    ref = load.load(dit_workdir)
    c = ref.config
    patch = configlib.patch_size(c)
    _, pos = packing.patchify(np.zeros((*GRID, 3), np.float32), patch)
    n_tok, n_text = pos.shape[0], c.model.text.max_len
    ids = np.zeros((2, n_text), np.int32)
    seg_text = np.zeros((2, n_text), np.int32)
    for i, p in enumerate((PROMPT, "")):
        t = tokenize(p, n_text)
        ids[i, : len(t)], seg_text[i, : len(t)] = t, 1
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, n_tok, 48)).astype(np.float32)
    positions = np.broadcast_to(pos, (2, *pos.shape)).astype(np.int32)
    seg = np.ones((2, n_tok), np.int32)
    t = rng.uniform(size=(2, n_tok)).astype(np.float32)
    got = forward.call(params, x, positions, seg, t, ids, seg_text)
    want = jax.jit(lambda p, *a: load.Loaded(c, ref.graphdef, p, None, 4).model()(*a))(
        ref.params, x, positions, seg, t, ids, seg_text
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(want)).max() > 0.1

    # one guided Euler step == the Python sampler's one-step sample from the same noise
    noise = np.asarray(jax.random.normal(jax.random.key(0), (n_tok, 48)))[None]
    ts = sampler.timesteps(1, n_tok, configlib.flow_config(c))
    got = step.call(params, noise, positions[:1], ids, seg_text, ts[0], ts[1], np.float32(3.0))
    want = packing.patchify(_reference_latents(dit_workdir, 1), patch)[0]
    np.testing.assert_allclose(np.asarray(got)[0], want, rtol=0, atol=1e-5)
    assert manifest["params"] == list(tensors.names(ref.params))


def test_cli_export_and_sample_from_the_export(dit_workdir, tmp_path, capsys):
    out = str(tmp_path / "exp")
    code, stdout, err = _run(capsys, "export", f"--workdir={dit_workdir}", f"--out={out}")
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["format"] == "safetensors"
    videos = []
    for source in (f"--checkpoint={out}", f"--workdir={dit_workdir}"):
        path = str(tmp_path / f"{len(videos)}.mp4")
        code, _, err = _run(
            capsys,
            "sample",
            source,
            "--frames=4",
            "--height=16",
            "--width=16",
            "--steps=2",
            f"--out={path}",
        )
        assert code == 0, err
        videos.append(open(path, "rb").read())
    assert videos[0] == videos[1]


def _run(capsys, *args):
    try:
        cli.run(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(capsys, args, message):
    code, _, err = _run(capsys, *args)
    assert code == 2 and err.count("\n") == 1, err
    assert message in err, err


def test_bad_inputs_give_one_clear_error(dit_workdir, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    _one_line_error(
        capsys, ["export", f"--workdir={missing}", f"--out={tmp_path / 'a'}"], "does not exist"
    )
    _one_line_error(
        capsys,
        ["export", f"--workdir={dit_workdir}", "--step=3", f"--out={tmp_path / 'b'}"],
        "no checkpoint for step 3",
    )
    out = str(tmp_path / "good")
    export(dit_workdir, out, max_file_bytes=60_000)
    _one_line_error(
        capsys, ["export", f"--workdir={dit_workdir}", f"--out={out}"], "not an empty directory"
    )
    _one_line_error(capsys, ["sample", f"--checkpoint={missing}"], "not a `vdit export` directory")
    _one_line_error(capsys, ["sample"], "give one of --workdir")

    def broken(name, change):
        path = str(tmp_path / name)
        os.system(f"cp -r {out} {path}")
        change(path)
        return path

    first = os.path.join("", tensors.file_name(0, len(os.listdir(out)) - 3))

    def truncate(path):
        with open(os.path.join(path, first), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(path, first)) - 10)

    def alter(path):  # one byte of tensor data, past the header
        with open(os.path.join(path, first), "r+b") as f:
            f.seek(-5, os.SEEK_END)
            byte = f.read(1)
            f.seek(-5, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0x40]))

    def deeper(path):  # a config of another model than the tensors'
        cfg = json.load(open(os.path.join(path, load.EXPORT_CONFIG)))
        cfg["model"]["depth"] = 3
        json.dump(cfg, open(os.path.join(path, load.EXPORT_CONFIG), "w"))

    def wider(path):
        cfg = json.load(open(os.path.join(path, load.EXPORT_CONFIG)))
        cfg["model"]["width"] = 32
        json.dump(cfg, open(os.path.join(path, load.EXPORT_CONFIG), "w"))

    for name, change, message in (
        ("truncated", truncate, "truncated or not a safetensors file"),
        ("altered", alter, "do not match the checksum"),
        ("deeper", deeper, "config does not match the tensors"),
        ("wider", wider, "config does not match the tensors"),
    ):
        path = broken(name, change)
        _one_line_error(
            capsys,
            ["sample", f"--checkpoint={path}", "--frames=4", "--height=16", "--width=16"],
            message,
        )


def test_no_load_path_unpickles(dit_workdir, tmp_path, monkeypatch):
    outs = {fmt: str(tmp_path / fmt) for fmt in ("safetensors", "orbax", "stablehlo")}
    for fmt, out in outs.items():
        export(dit_workdir, out, fmt=fmt, shape=GRID, platforms=("cpu",))

    def refuse(*args, **kwargs):
        raise AssertionError("a load path unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    load.load(outs["safetensors"])
    load.load(outs["orbax"])
    c = load.load(outs["safetensors"]).config
    task = DiTTask(c, jax.devices()[:1], data=False)
    load.restore_export(outs["orbax"], *task.state.model_targets())
    stablehlo.load(outs["stablehlo"])


@pytest.mark.slow
def test_two_processes_write_their_own_files(dit_workdir, tmp_path):
    """`vdit export` as two processes of 4 CPU devices each: the parameters sharded over all 8,
    process p writes files i with i % 2 == p, and the export loads as the checkpoint, bit for bit."""
    import socket
    import subprocess
    import sys

    from tiny import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "two")
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
    )
    args = [sys.executable, "-m", "vdit.cli", "export", f"--workdir={dit_workdir}", f"--out={out}"]
    args += ["--max_file_mb=0.05", "--dtype=bfloat16", f"--coordinator_address=127.0.0.1:{port}"]
    procs = [
        subprocess.Popen(
            [*args, "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) >= 2
    from safetensors import safe_open

    for i, f in enumerate(files):
        with safe_open(os.path.join(out, f), "numpy") as st:
            assert st.metadata()["written_by_process"] == str(i % 2)
    ref, got = load.load(dit_workdir), load.load(out)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(got.params), strict=True):
        _same_bits(np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32), b)

"""The train step and loop: sharded == one device, resumed == uninterrupted, NaN batches are skipped."""

import json
import os

import jax
import numpy as np
import pytest
from tiny import restore_state, tiny_config

from vdit import configlib
from vdit.data import pipeline
from vdit.parallel.sharding import activation_sharding
from vdit.train.dit_task import DiTTask
from vdit.train.loop import train_and_evaluate


def _batch(c):
    return next(iter(pipeline.build(configlib.pipeline_config(c))))


def _run_steps(c, devices, batch, n=1):
    trainer = DiTTask(c, devices, data=False)
    state = trainer.state.init()
    shardings = trainer.batch_shardings({k: np.ndim(batch[k]) for k in pipeline.DEVICE_KEYS})
    gbatch = pipeline.to_global(batch, shardings)
    grads = jax.jit(jax.grad(lambda p: trainer.loss_fn(p, gbatch, state["step"])[0]))(
        state["params"]
    )
    train_step = trainer.jit_train_step(shardings)
    losses = []
    for _ in range(n):
        state, metrics = train_step(state, gbatch)
        losses.append(float(metrics["loss"]))
    return trainer, state, losses, jax.device_get(grads)


def test_sharded_equals_single_device():
    """Loss, gradients and updated parameters: 1 device == 8 devices as (data=2, fsdp=4)."""
    c = configlib.load(tiny_config(), 8)
    batch = _batch(c)
    single = c.copy_and_resolve_references()
    _, st1, loss1, g1 = _run_steps(single, jax.devices()[:1], batch)
    c.mesh.data, c.mesh.fsdp = 2, 4
    tr8, st8, loss8, g8 = _run_steps(c, jax.devices(), batch)
    np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(st1["params"]), jax.tree.leaves(st8["params"]), strict=True):
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-6, rtol=1e-4)
    # The 8-device state really is sharded: fsdp splits the big matrices 4 ways.
    kernel = st8["params"]["blocks"]["mlp"]["fc1"]["kernel"]
    assert "fsdp" in str(kernel.sharding.spec)
    assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 4
    assert st8["opt_state"][1][0].mu["blocks"]["mlp"]["fc1"]["kernel"].sharding == kernel.sharding


def _loss_and_grads(c, devices, batch, perturb=False):
    trainer = DiTTask(c, devices, data=False)
    state = trainer.state.init()
    if perturb:  # the zero-initialised (adaLN-Zero) parameters made non-zero, so every path counts
        rng = np.random.default_rng(0)
        params = state["params"]
        state["params"] = jax.tree.map(
            lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), params
        )
    shardings = trainer.batch_shardings({k: np.ndim(batch[k]) for k in pipeline.DEVICE_KEYS})
    gbatch = pipeline.to_global(batch, shardings)

    def loss(params):
        with activation_sharding(trainer.mesh, trainer.rules):
            return trainer.loss_fn(params, gbatch, state["step"])[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(state["params"])
    return float(value), jax.device_get(grads)


@pytest.fixture(scope="module")
def one_device():
    c = configlib.load(tiny_config(), 8)
    batch = _batch(c)
    return c, batch, _loss_and_grads(c.copy_and_resolve_references(), jax.devices()[:1], batch)


@pytest.mark.parametrize(
    "mesh",
    [
        pytest.param((8, 1, 1, 1), marks=pytest.mark.slow),
        pytest.param((2, 2, 2, 1), marks=pytest.mark.slow),
        (1, 2, 1, 4),  # sequence parallelism, in the default suite
    ],
    ids=lambda m: "x".join(map(str, m)),
)
def test_loss_and_grads_equal_across_meshes(one_device, mesh):
    """(data, fsdp, tensor, sequence) meshes of 8 devices == 1 device (and (2, 4, 1, 1) above).
    With sequence=4 every device attends its own quarter of each row's queries."""
    c, batch, (loss1, g1) = one_device
    c = c.copy_and_resolve_references()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.sequence = mesh
    configlib.load(c, 8)
    loss8, g8 = _loss_and_grads(c, jax.devices(), batch)
    np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_pooled_text_equals_across_meshes():
    """model.text_pool (each sample's pooled caption in its modulation), with every parameter
    non-zero: a (1, 2, 1, 4) mesh, sequence-parallel, == 1 device."""
    c = tiny_config()
    c.model.text_pool = True
    c = configlib.load(c, 8)
    batch = _batch(c)
    loss1, g1 = _loss_and_grads(c.copy_and_resolve_references(), jax.devices()[:1], batch, True)
    assert np.abs(g1["text_pool"]["kernel"]).max() > 1e-4  # the pooled path has a gradient
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.sequence = 1, 2, 1, 4
    configlib.load(c, 8)
    loss8, g8 = _loss_and_grads(c, jax.devices(), batch, True)
    np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_nan_batch_is_skipped_and_counted():
    c = configlib.load(tiny_config(), 1)
    batch = _batch(c)
    trainer = DiTTask(c, jax.devices()[:1], data=False)
    state = trainer.state.init()
    before = jax.device_get(state)
    shardings = trainer.batch_shardings({k: np.ndim(batch[k]) for k in pipeline.DEVICE_KEYS})
    bad = dict(batch)
    bad["patches"] = batch["patches"].copy()
    bad["patches"][0, 3] = np.nan
    train_step = trainer.jit_train_step(shardings)
    state, metrics = train_step(state, pipeline.to_global(bad, shardings))
    assert not bool(metrics["finite"])
    assert int(state["skipped"]) == 1 and int(state["step"]) == 1
    for a, b in zip(
        jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(before["opt_state"]), jax.tree.leaves(state["opt_state"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # A good batch afterwards trains normally.
    state, metrics = train_step(state, pipeline.to_global(batch, shardings))
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    assert int(state["skipped"]) == 1


def _params(workdir):
    return restore_state(workdir)


def test_resume_equals_uninterrupted(tmp_path):
    """4 steps straight == 2 steps, stop, resume, 2 steps: same parameters, same data order."""
    c = tiny_config()
    c.sample.grid_prompts = ()
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    one = jax.devices()[:1]
    train_and_evaluate(c, straight, one)
    half = c.copy_and_resolve_references()
    half.train.steps = 2
    train_and_evaluate(half, resumed, one)
    train_and_evaluate(c, resumed, one)  # picks up at step 2 by itself
    a, b = _params(straight), _params(resumed)
    assert int(a["step"]) == int(b["step"]) == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # Data order: the logged packing statistics of steps 3-4 match too.
    rows = lambda d: [json.loads(r) for r in open(os.path.join(d, "metrics.jsonl"))]
    fill = lambda d: [(r["step"], r["packing_fill"], r["loss"]) for r in rows(d) if "loss" in r]
    assert fill(straight)[-1] == pytest.approx(fill(resumed)[-1])
    # CPU is not in the chip table and no peak is configured: no `mfu` is logged
    assert all("mfu" not in r for r in rows(straight))
    assert any("model_flops_per_s" in r for r in rows(straight))
    # The inference loader reads the same parameters back, EMA or raw, without optimizer state.
    from vdit.train.load import load

    for ema, key in ((True, "ema"), (False, "params")):
        loaded = load(straight, ema=ema)
        assert loaded.step == 4 and loaded.buffers is None
        for x, y in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(a[key]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), y)
    assert load(straight).config.sample.use_ema  # ema=None: the config's choice (the EMA)
    assert not any(
        np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a["ema"]), jax.tree.leaves(a["params"]), strict=True)
        if x.size > 1
    )


def test_scanned_and_unrolled_models_take_the_same_optimizer_step():
    """Weight decay is decided by logical axes: the stacked block axis of a scanned model does not
    make its biases, norm scales and modulation tables matrices. The same parameters and gradients,
    mapped between the two layouts, give the same AdamW updates; only weight matrices decay."""
    import dataclasses

    from flax import nnx

    from vdit.models.dit import VideoDiT
    from vdit.train.state import OptimConfig, decay_mask, make_optimizer

    c = configlib.load(tiny_config())
    cfg = configlib.model_config(c)
    fns = {
        scan: (lambda rngs, s=scan: VideoDiT(dataclasses.replace(cfg, scan_layers=s), rngs=rngs))
        for scan in (True, False)
    }
    opt = OptimConfig(
        lr=1e-2,
        warmup_steps=1,
        min_lr_ratio=1.0,
        weight_decay=0.5,
        b1=0.9,
        b2=0.99,
        grad_clip=1e9,
        ema_decay=0.9,
        total_steps=10,
    )
    abstract = nnx.eval_shape(lambda: fns[True](nnx.Rngs(0)))
    scanned = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))  # shapes only
    rng = np.random.default_rng(0)
    # every parameter nonzero (biases and modulation tables start at zero), and random gradients
    params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), scanned)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), scanned)
    depth = cfg.depth

    def unroll(tree):
        blocks = {i: jax.tree.map(lambda x, i=i: x[i], tree["blocks"]) for i in range(depth)}
        return {**tree, "blocks": blocks}

    def stack(tree):
        blocks = jax.tree.map(lambda *xs: np.stack(xs), *[tree["blocks"][i] for i in range(depth)])
        return {**tree, "blocks": blocks}

    updates = {}
    for scan, fn in fns.items():
        p, g = (params, grads) if scan else (unroll(params), unroll(grads))
        tx = make_optimizer(opt, fn)
        state, update = tx.init(p), jax.jit(tx.update)
        for _ in range(2):  # the first step's learning rate is 0 (warmup)
            u, state = update(g, state, p)
        updates[scan] = jax.device_get(u if scan else stack(u))
    for a, b in zip(jax.tree.leaves(updates[True]), jax.tree.leaves(updates[False]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    mask = decay_mask(fns[True])
    blocks = mask["blocks"]
    assert blocks["mlp"]["fc1"]["kernel"] and blocks["self_attn"]["q"]["kernel"]
    assert not blocks["mlp"]["fc1"]["bias"] and not blocks["norm_cross"]["scale"]
    assert not blocks["modulation"] and not mask["head_modulation"]
    assert mask["time_fc1"]["kernel"] and mask["text_encoder"]["embed"]
    unrolled = decay_mask(fns[False])
    assert all(unrolled["blocks"][i] == blocks for i in range(depth))
    assert {**unrolled, "blocks": None} == {**mask, "blocks": None}

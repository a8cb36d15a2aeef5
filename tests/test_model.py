"""VideoDiT: a packed row equals each of its samples run alone; parts behave as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_config

from vdit import configlib
from vdit.data import pipeline
from vdit.models import dit, layers
from vdit.models.dit import DiTConfig, VideoDiT
from vdit.models.text import TextEncoderConfig


@nnx.jit(static_argnums=(0, 1))
def _perturbed_model(cfg: DiTConfig, seed: int = 0) -> VideoDiT:
    """A model whose zero-initialised (adaLN-Zero) parameters are made non-zero, so every path counts."""
    model = VideoDiT(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@nnx.jit
def _forward(model, *args):
    return model(*args)


@pytest.fixture(scope="module")
def batch():
    c = configlib.load(tiny_config())
    c.data.batch_rows = 2
    return next(iter(pipeline.build(configlib.pipeline_config(c)))), c


@pytest.fixture(scope="module")
def dropped_batch():
    """Rows whose samples lost half their generated tokens (NaViT token dropping), some with i2v."""
    c = configlib.load(tiny_config())
    c.data.batch_rows = 2
    c.data.token_drop.kind = "constant"
    c.data.token_drop.rate = 0.5
    c.data.tasks.i2v = 1.0
    return next(iter(pipeline.build(configlib.pipeline_config(c)))), c


@pytest.mark.parametrize("scan_layers", [True, False])
def test_packed_row_equals_each_sample_alone(batch, scan_layers):
    _check_packed_equals_alone(*batch, scan_layers)


def test_packed_row_equals_each_sample_alone_with_fractional_positions(batch):
    """model.pos_embed="fractional": each sample's positions are its own, packed or alone."""
    _check_packed_equals_alone(*batch, scan_layers=True, pos_embed="fractional")


def test_token_dropping_packed_row_equals_each_sample_alone(dropped_batch):
    """With tokens dropped, a packed row == each sample alone over the same kept tokens (at their
    original positions), and changing one sample changes no other sample's output."""
    b, c = dropped_batch
    assert b["stats"][..., -1].sum() > 0, "the batch should have dropped tokens"
    packed, model, t = _check_packed_equals_alone(b, c, scan_layers=True)
    seg = b["segment_ids"][0]
    x = np.array(b["patches"])
    x[0][seg == 2] += 1.0  # another sample's tokens change...
    again = _forward(
        model,
        x,
        b["positions"],
        b["segment_ids"],
        t,
        b["text"],
        b["text_segment_ids"],
        b["text_positions"],
    )
    assert not np.allclose(again[0][seg == 2], packed[0][seg == 2])
    others = (seg != 2) & (seg > 0)
    np.testing.assert_array_equal(again[0][others], packed[0][others])  # ...and nothing else does
    np.testing.assert_array_equal(again[1], packed[1])


def _check_packed_equals_alone(b, c, scan_layers, **overrides):
    cfg = configlib.model_config(c)
    cfg = DiTConfig(**{**cfg.__dict__, "scan_layers": scan_layers, **overrides})
    model = _perturbed_model(cfg)
    rng = np.random.default_rng(0)
    t = rng.random(b["segment_ids"].shape).astype(np.float32)
    packed = _forward(
        model,
        b["patches"],
        b["positions"],
        b["segment_ids"],
        t,
        b["text"],
        b["text_segment_ids"],
        b["text_positions"],
    )
    assert float(jnp.abs(packed).mean()) > 1e-3  # the check below compares something non-trivial
    # Every sample alone in its own row (one segment, then padding): one batch, one compile.
    L, C = b["segment_ids"].shape[1], b["text_segment_ids"].shape[1]
    alone = {k: [] for k in ("x", "pos", "seg", "t", "text", "tseg")}
    where = []
    for r in range(b["segment_ids"].shape[0]):
        seg, tseg = b["segment_ids"][r], b["text_segment_ids"][r]
        assert seg.max() >= 2, "the test needs rows holding several samples"
        for s in range(1, seg.max() + 1):
            sel, tsel = seg == s, tseg == s
            n, nc = sel.sum(), tsel.sum()
            pad = lambda a, m, n=None: np.concatenate(
                [a, np.zeros((m - len(a), *a.shape[1:]), a.dtype)]
            )
            alone["x"].append(pad(b["patches"][r][sel], L))
            alone["pos"].append(pad(b["positions"][r][sel], L))
            alone["seg"].append(pad(np.ones(n, np.int32), L))
            alone["t"].append(pad(t[r][sel], L))
            alone["text"].append(pad(b["text"][r][tsel], C))
            alone["tseg"].append(pad(np.ones(nc, np.int32), C))
            where.append((r, sel, n))
        np.testing.assert_array_equal(packed[r][seg == 0], 0.0)  # padding predicts nothing
    out = _forward(model, *[np.stack(alone[k]) for k in ("x", "pos", "seg", "t", "text", "tseg")])
    for i, (r, sel, n) in enumerate(where):
        np.testing.assert_allclose(out[i][:n], packed[r][sel], atol=2e-5, rtol=1e-4)
    assert len(where) >= 4
    # And the first sample truly alone, with no padding at all.
    r, sel, n = where[0]
    tsel = b["text_segment_ids"][r] == 1
    solo = _forward(
        model,
        b["patches"][r][sel][None],
        b["positions"][r][sel][None],
        np.ones((1, n), np.int32),
        t[r][sel][None],
        b["text"][r][tsel][None],
        np.ones((1, tsel.sum()), np.int32),
    )
    np.testing.assert_allclose(solo[0], packed[r][sel], atol=2e-5, rtol=1e-4)
    return packed, model, t


def test_scan_and_loop_agree(batch):
    """The scanned stack and a Python loop over the same block parameters compute the same thing."""
    b, c = batch
    cfg = configlib.model_config(c)
    scanned = _perturbed_model(DiTConfig(**{**cfg.__dict__, "scan_layers": True}))
    looped = _perturbed_model(DiTConfig(**{**cfg.__dict__, "scan_layers": False}))
    params = nnx.to_pure_dict(nnx.state(scanned))
    stacked = params.pop("blocks")
    params["blocks"] = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(cfg.depth)}
    nnx.replace_by_pure_dict(state := nnx.state(looped), params)
    nnx.update(looped, state)
    t = np.full(b["segment_ids"].shape, 0.5, np.float32)
    args = (b["patches"], b["positions"], b["segment_ids"], t, b["text"], b["text_segment_ids"])
    np.testing.assert_allclose(_forward(scanned, *args), _forward(looped, *args), atol=1e-5)


def test_zero_init_predicts_zero(batch):
    b, c = batch
    model = nnx.jit(lambda: VideoDiT(configlib.model_config(c), rngs=nnx.Rngs(0)))()
    t = np.full(b["segment_ids"].shape, 0.3, np.float32)
    out = _forward(
        model, b["patches"], b["positions"], b["segment_ids"], t, b["text"], b["text_segment_ids"]
    )
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.slow  # four gradient compiles: about a minute on two cores
def test_remat_policies_give_same_gradients(batch):
    b, c = batch
    cfg = configlib.model_config(c)
    grads = []
    for remat in ("none", "full", "save_dots"):
        model = _perturbed_model(DiTConfig(**{**cfg.__dict__, "remat": remat}))
        g, params = nnx.split(model)
        t = np.full(b["segment_ids"].shape, 0.5, np.float32)

        def loss(p, g=g, t=t):
            m = nnx.merge(g, p)
            return jnp.mean(
                m(
                    b["patches"],
                    b["positions"],
                    b["segment_ids"],
                    t,
                    b["text"],
                    b["text_segment_ids"],
                )
                ** 2
            )

        grads.append(jax.tree.leaves(jax.jit(jax.grad(loss))(params)))
    for other in grads[1:]:
        for a, o in zip(grads[0], other, strict=True):
            np.testing.assert_allclose(a, o, atol=1e-6, rtol=1e-4)


def test_rope_is_relative():
    """Rotated q.k depends only on the position difference (per axis)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 24)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 24)), jnp.float32)

    def dot(pq, pk):
        aq = layers.rope_angles(jnp.asarray([[pq]]), 24)
        ak = layers.rope_angles(jnp.asarray([[pk]]), 24)
        return float(jnp.sum(layers.apply_rope(q, aq) * layers.apply_rope(k, ak)))

    assert dot((3, 5, 7), (1, 2, 3)) == pytest.approx(dot((5, 8, 11), (3, 5, 7)), abs=1e-4)
    assert dot((3, 5, 7), (1, 2, 3)) != pytest.approx(dot((3, 5, 7), (1, 2, 4)), abs=1e-3)


def test_packed_row_equals_each_sample_alone_with_pooled_text(batch):
    """model.text_pool: each sample's modulation sees its own caption's mean, packed or alone."""
    _check_packed_equals_alone(*batch, scan_layers=True, text_pool=True)


def test_pooled_text_is_each_samples_own_mean():
    rng = np.random.default_rng(0)
    ctx = rng.normal(size=(2, 6, 3)).astype(np.float32)
    tseg = np.array([[1, 1, 2, 3, 3, 0], [2, 2, 2, 1, 0, 0]], np.int32)
    seg = np.array([[3, 1, 1, 2, 0, 0, 0], [1, 2, 2, 9, 0, 0, 0]], np.int32)  # 9: no text
    means = dit.text_means(jnp.asarray(ctx), jnp.asarray(tseg))
    out = np.asarray(dit.per_sample(means, jnp.asarray(seg)))
    for r in range(2):
        for i, s in enumerate(seg[r]):
            want = ctx[r][tseg[r] == s].mean(0) if s and (tseg[r] == s).any() else np.zeros(3)
            np.testing.assert_allclose(out[r, i], want, rtol=1e-6, atol=1e-6)


def test_text_pool_starts_at_zero_and_needs_per_token_modulation(batch):
    _, c = batch
    cfg = configlib.model_config(c)
    assert not cfg.text_pool and not hasattr(VideoDiT(cfg, rngs=nnx.Rngs(0)), "text_pool")
    pooled = VideoDiT(DiTConfig(**{**cfg.__dict__, "text_pool": True}), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(pooled.text_pool.kernel[...], 0.0)
    with pytest.raises(ValueError, match="text_pool"):
        DiTConfig(**{**cfg.__dict__, "text_pool": True, "modulation_slots": 4})


def test_fractional_positions_are_per_sample():
    """Each token's place within its own sample: (p - first + 0.5) / extent per axis; an image's
    one frame is at 0.5; a sample starting at a later position (an extension's canvas) or packed
    after another gets the same fractions as alone."""
    grid = lambda t, h, w, t0=0: np.stack(
        np.meshgrid(np.arange(t0, t0 + t), np.arange(h), np.arange(w), indexing="ij"), -1
    ).reshape(-1, 3)
    a, b = grid(4, 2, 3), grid(1, 4, 2)  # a 4x2x3 video, a 1x4x2 image
    c = grid(2, 2, 2, t0=5)  # positions starting at frame 5
    pos = np.concatenate([a, b, c, np.zeros((3, 3), int)])[None].astype(np.int32)
    seg = np.concatenate([np.full(len(a), 1), np.full(len(b), 2), np.full(len(c), 3), [0] * 3])
    u = np.asarray(layers.fractional_positions(jnp.asarray(pos), jnp.asarray(seg[None])))[0]
    want_a = (a + 0.5) / np.array([4, 2, 3])
    np.testing.assert_allclose(u[: len(a)], want_a, rtol=1e-6)
    np.testing.assert_allclose(u[len(a) : len(a) + len(b), 0], 0.5)
    np.testing.assert_allclose(u[len(a) : len(a) + len(b), 1], (b[:, 1] + 0.5) / 4)
    np.testing.assert_allclose(u[len(a) + len(b) : -3], (c - [5, 0, 0] + 0.5) / 2, rtol=1e-6)
    alone = layers.fractional_positions(jnp.asarray(a[None], jnp.int32), jnp.ones((1, len(a)), int))
    np.testing.assert_array_equal(np.asarray(alone)[0], u[: len(a)])
    assert np.all((u[:-3] > 0) & (u[:-3] < 1))


def test_pos_embed_none_has_no_parameters(batch):
    """The default "none" (RoPE only, as Wan2.1) adds no parameter; "fractional" starts at zero."""
    _, c = batch
    cfg = configlib.model_config(c)
    assert cfg.pos_embed == "none"
    with_pe = VideoDiT(DiTConfig(**{**cfg.__dict__, "pos_embed": "fractional"}), rngs=nnx.Rngs(0))
    without = VideoDiT(cfg, rngs=nnx.Rngs(0))
    assert not hasattr(without, "pos_embed")
    np.testing.assert_array_equal(with_pe.pos_embed.kernel[...], 0.0)
    with pytest.raises(ValueError, match="pos_embed"):
        DiTConfig(**{**cfg.__dict__, "pos_embed": "learned"})


def test_precomputed_text_path():
    cfg = DiTConfig(
        width=32,
        depth=1,
        heads=2,
        patch=(1, 2, 2),
        channels=3,
        text=TextEncoderConfig(kind="precomputed", width=24),
    )
    model = _perturbed_model(cfg)
    x = jnp.zeros((1, 4, 12))
    pos = jnp.zeros((1, 4, 3), jnp.int32)
    seg = jnp.ones((1, 4), jnp.int32)
    emb = jax.random.normal(jax.random.key(0), (1, 5, 24))
    out = _forward(model, x, pos, seg, jnp.full((1, 4), 0.5), emb, jnp.ones((1, 5), jnp.int32))
    assert out.shape == (1, 4, 12) and float(jnp.abs(out).max()) > 0
    with pytest.raises(ValueError, match="precomputed text"):
        model(x, pos, seg, jnp.full((1, 4), 0.5), emb[..., :20], jnp.ones((1, 5), jnp.int32))


@pytest.mark.slow
def test_attention_module_splash_under_mesh():
    """Self-attention with impl "splash" (interpreted here) == "xla", values and input gradients,
    run per shard inside shard_map on a (data=2, tensor=2) mesh of CPU devices."""
    from vdit.parallel.mesh import make_mesh
    from vdit.parallel.sharding import DEFAULT_RULES, activation_sharding

    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "sequence": 1}, jax.devices()[:4])
    b, length, dim, heads = 4, 96, 32, 4
    seg = np.zeros((b, length), np.int32)
    for r, lengths in enumerate([[96], [30, 40, 10], [50], [20, 1, 20]]):
        seg[r, : sum(lengths)] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    x = jax.random.normal(jax.random.key(0), (b, length, dim))

    def run(impl):
        attn = layers.Attention(dim, heads, impl=impl, block=128, rngs=nnx.Rngs(0))

        def loss(x):
            with activation_sharding(mesh, DEFAULT_RULES):
                y = attn(x, seg)
            return jnp.sum(y * jnp.cos(x)), y

        return jax.jit(jax.grad(loss, has_aux=True))(x)

    gx, y = run("splash")
    rx, ry = run("xla")
    assert float(jnp.abs(y).max()) > 0.1
    np.testing.assert_allclose(y, ry, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gx, rx, atol=1e-4, rtol=1e-4)


def _slot_pair(c, slots: int):
    cfg = configlib.model_config(c)
    per_token = _perturbed_model(DiTConfig(**{**cfg.__dict__, "modulation_slots": 0}))
    per_slot = _perturbed_model(DiTConfig(**{**cfg.__dict__, "modulation_slots": slots}))
    return per_token, per_slot


def test_modulation_per_timestep_slot_equals_per_token(batch):
    """Modulation computed once per distinct timestep of a row and gathered per token (no (B, L, 6,
    D) tensor) gives the per-token model's outputs and parameter gradients, on packed rows whose
    segments have different times and whose first-frame tokens are conditioning (t = 0)."""
    b, c = batch
    seg = np.asarray(b["segment_ids"])
    assert (seg.max(axis=1) > 1).all()
    t_seg = np.random.default_rng(0).uniform(0.05, 1.0, (seg.shape[0], seg.max() + 1))
    t = np.take_along_axis(t_seg, seg, axis=1)
    cond = np.asarray(b["positions"])[..., 0] == 0  # i2v-like: every sample's first frame
    t = np.where(cond | (seg == 0), 0.0, t).astype(np.float32)
    assert len(np.unique(t[0])) > 2
    per_token, per_slot = _slot_pair(c, 2 * int(seg.max()) + 1)
    args = (b["patches"], b["positions"], b["segment_ids"], t, b["text"], b["text_segment_ids"])

    def loss_and_grads(model):
        g, params = nnx.split(model)

        def loss(p):
            out = nnx.merge(g, p)(*args)
            return jnp.mean(out**2), out

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    ((l0, out0), g0), ((l1, out1), g1) = loss_and_grads(per_token), loss_and_grads(per_slot)
    np.testing.assert_allclose(out1, out0, atol=1e-6)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, o in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(o, a, atol=1e-6, rtol=1e-5)


def test_modulation_slots_overflow_gives_nan(batch):
    """A row with more distinct timesteps than slots has no slot for some tokens: NaN for that
    row (a step the guarded update skips), the other rows unchanged."""
    b, c = batch
    seg = np.asarray(b["segment_ids"])
    t = np.where(seg > 0, 0.5, 0.0).astype(np.float32)
    crowded = t.copy()
    crowded[0] = np.where(seg[0] > 0, np.linspace(0.1, 0.9, seg.shape[1]), 0.0)  # a t per token
    _, per_slot = _slot_pair(c, 2)
    args = lambda t: (
        b["patches"],
        b["positions"],
        b["segment_ids"],
        t,
        b["text"],
        b["text_segment_ids"],
    )
    out, ok = (
        np.asarray(_forward(per_slot, *args(crowded))),
        np.asarray(_forward(per_slot, *args(t))),
    )
    assert np.isnan(out[0]).all() and np.isfinite(ok).all()
    np.testing.assert_array_equal(out[1], ok[1])

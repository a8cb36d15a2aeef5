"""The sampler against a plain numpy Euler loop with guidance, the prompting modes, packed batches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vdit.data import packing
from vdit.data.tokenizer import tokenize
from vdit.diffusion import flow, modes, sampler
from vdit.models.dit import DiTConfig, VideoDiT
from vdit.models.text import TextEncoderConfig

CFG = flow.FlowConfig(shift_ref_tokens=8, shift_at_ref=1.5, shift_max=3.0)
PATCH = (1, 2, 2)
KW = dict(patch=PATCH, channels=3, flow_cfg=CFG, steps=4, cfg_scale=2.5, text_len=16)


def _model(kind="bytes", seed=0):
    """A tiny DiT with every parameter perturbed (a fresh adaLN-Zero model outputs 0)."""
    text = TextEncoderConfig(kind=kind, width=16, depth=1, heads=2, max_len=16)
    cfg = DiTConfig(width=32, depth=1, heads=2, patch=PATCH, channels=3, text=text)
    graphdef, params = nnx.split(nnx.jit(lambda: VideoDiT(cfg, rngs=nnx.Rngs(seed)))())
    params = nnx.to_pure_dict(params)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        p + 0.2 * jax.random.normal(k, p.shape, p.dtype)
        if jnp.issubdtype(p.dtype, jnp.floating)
        else p
        for p, k in zip(leaves, keys, strict=True)
    ]
    return graphdef, jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="module")
def model():
    return _model()


@functools.partial(jax.jit, static_argnums=0)
def _velocity(graphdef, params, x, pos, t, txt, text_seg):
    """The model on one sample alone (one row, one segment, its own text)."""
    seg = jnp.ones((1, x.shape[0]), jnp.int32)
    out = nnx.merge(graphdef, params)(x[None], pos[None], seg, t[None], txt[None], text_seg[None])
    return out[0]


def _reference(graphdef, params, req, steps, scale, text_len, text=None, null=None):
    """An independent Euler loop: one request alone, the cond and uncond passes as separate
    model calls, the shifted schedule written out in numpy, the updates in float64."""
    grid = req.grid
    zero = np.zeros((*grid, 3), np.float32)
    _, pos = packing.patchify(zero, PATCH)
    n, p = pos.shape[0], 12
    if text is None:
        text, null = tokenize(req.prompt, text_len), tokenize("", text_len)

    @jax.jit
    def velocity(x, t, txt):
        return nnx.merge(graphdef, params)(
            x[None],
            pos[None],
            jnp.ones((1, n), jnp.int32),
            t[None],
            txt[None],
            jnp.ones((1, txt.shape[0]), jnp.int32),
        )[0]

    s = np.clip(CFG.shift_at_ref * np.sqrt(n / CFG.shift_ref_tokens), 1.0, CFG.shift_max)
    strength = req.strength
    u0 = strength / (s - (s - 1) * strength)
    u = np.linspace(u0, 0.0, steps + 1)
    ts = s * u / (1 + (s - 1) * u)
    ts[0] = strength
    noise = np.asarray(jax.random.normal(jax.random.key(req.seed), (n, p)), np.float64)
    x = noise
    if strength < 1:
        init = packing.patchify(req.init_latent, PATCH)[0].astype(np.float64)
        x = (1 - strength) * init + strength * noise
    cond = np.zeros(n, bool)
    given = np.zeros((n, p))
    if req.cond_latent is not None:
        given = packing.patchify(req.cond_latent, PATCH)[0].astype(np.float64)
        cond = np.repeat(req.cond_frames, n // len(req.cond_frames))
    for i in range(steps):
        x[cond] = given[cond]
        t_tok = np.where(cond, 0.0, ts[i]).astype(np.float32)
        xf = jnp.asarray(x, jnp.float32)
        v_c = np.asarray(velocity(xf, t_tok, jnp.asarray(text)), np.float64)
        v_u = np.asarray(velocity(xf, t_tok, jnp.asarray(null)), np.float64)
        x = x + (ts[i + 1] - ts[i]) * (v_u + scale * (v_c - v_u))
    x[cond] = given[cond]
    return packing.unpatchify(x, grid, PATCH)


def _requests():
    rng = np.random.default_rng(0)
    clip = rng.uniform(-1, 1, (3, 4, 4, 3)).astype(np.float32)
    return [
        sampler.SampleRequest(
            "a red square moves left",
            (3, 4, 4),
            seed=1,
            cond_latent=clip,
            cond_frames=np.array([True, False, True]),
        ),
        sampler.SampleRequest("a blue circle moves up", (2, 4, 6), seed=2),
        sampler.SampleRequest("a green square", (3, 4, 4), seed=3, init_latent=clip, strength=0.6),
        sampler.SampleRequest("an image", (1, 4, 4), seed=4),
    ]


def test_sampler_matches_a_numpy_euler_loop_with_guidance(model):
    graphdef, params = model
    reqs = _requests()
    out = sampler.sample(graphdef, params, reqs, **KW)
    for r, x in zip(reqs, out, strict=True):
        want = _reference(graphdef, params, r, KW["steps"], KW["cfg_scale"], KW["text_len"])
        assert x.shape == want.shape
        np.testing.assert_allclose(x, want, atol=2e-4, rtol=1e-4)
        assert np.abs(want).max() > 0.1  # the model is not zero: the Euler updates are checked
    # the given frames come back bit for bit
    np.testing.assert_array_equal(out[0][[0, 2]], reqs[0].cond_latent[[0, 2]])
    assert not np.allclose(out[0][1], reqs[0].cond_latent[1])


def test_sdedit_starts_at_its_strength(model):
    graphdef, params = model
    clip = np.random.default_rng(1).uniform(-1, 1, (3, 4, 4, 3)).astype(np.float32)
    r = sampler.SampleRequest("a red square", (3, 4, 4), seed=7, init_latent=clip)
    same, edited, free, t2v = sampler.sample(
        graphdef,
        params,
        [
            sampler.dataclasses.replace(r, strength=0.0),
            sampler.dataclasses.replace(r, strength=0.5),
            sampler.dataclasses.replace(r, strength=1.0),
            sampler.SampleRequest("a red square", (3, 4, 4), seed=7),
        ],
        **KW,
    )
    np.testing.assert_array_equal(same, clip)  # strength 0 returns the input
    np.testing.assert_allclose(free, t2v, atol=2e-5, rtol=1e-5)  # strength 1 ignores it
    for s in (0.0, 0.3, 0.5, 1.0):
        ts = sampler.schedule(4, 12, CFG, s)
        assert ts[0] == np.float32(s) and ts[-1] == 0 and np.all(np.diff(ts) <= 0)
    np.testing.assert_array_equal(sampler.schedule(4, 12, CFG, 1.0), sampler.timesteps(4, 12, CFG))
    d_half = np.abs(edited - clip).mean()
    assert 0 < d_half < np.abs(free - clip).mean()


def test_packed_batch_equals_each_request_alone_and_compiles_once(model):
    graphdef, params = model
    reqs = _requests()
    sampler.clear_cache()
    together = sampler.sample(graphdef, params, reqs, **KW, row_len=64, row_text_len=128)
    assert sampler.compile_stats().compiles == 1
    for r, x in zip(reqs, together, strict=True):
        (alone,) = sampler.sample(graphdef, params, [r], **KW, row_len=64, row_text_len=128)
        np.testing.assert_allclose(x, alone, atol=2e-5, rtol=1e-5)
    # other sizes and guidance scale in the same row shape: no new compile
    sampler.sample(
        graphdef,
        params,
        [sampler.SampleRequest("x", (4, 4, 4)), sampler.SampleRequest("y", (1, 8, 8))],
        **{**KW, "cfg_scale": 4.0},
        row_len=64,
        row_text_len=128,
    )
    assert sampler.compile_stats().compiles == 1


def test_precomputed_text_model_samples_with_embeddings_and_needs_one():
    graphdef, params = _model("precomputed", seed=3)
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(5, 16)).astype(np.float16)
    null = rng.normal(size=(2, 16)).astype(np.float16)
    r = sampler.SampleRequest("unused", (2, 4, 4), seed=1, text_embedding=emb)
    (x,) = sampler.sample(graphdef, params, [r], **KW, null_text=null)
    want = _reference(
        graphdef,
        params,
        r,
        KW["steps"],
        KW["cfg_scale"],
        16,
        emb.astype(np.float32),
        null.astype(np.float32),
    )
    np.testing.assert_allclose(x, want, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="precomputed text embeddings"):
        sampler.sample(
            graphdef, params, [sampler.SampleRequest("a", (2, 4, 4))], **KW, null_text=null
        )


# ----------------------------------------------------------------------------------------------
# The modes as frame placements
# ----------------------------------------------------------------------------------------------
def _clip(t, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_each_mode_places_its_frames():
    v, e = _clip(3), _clip(5, seed=1)
    p = modes.place("i2v", 6, 8, 8, image=v[:1])
    assert p.given.tolist() == [1, 0, 0, 0, 0, 0] and (p.canvas[0] == v[0]).all()
    p = modes.place("extend_forward", 6, 8, 8, video=v)
    assert p.given.tolist() == [1, 1, 1, 0, 0, 0] and (p.canvas[:3] == v).all()
    p = modes.place("extend_backward", 6, 8, 8, video=v)
    assert p.given.tolist() == [0, 0, 0, 1, 1, 1] and (p.canvas[3:] == v).all()
    p = modes.place("loop", 6, 8, 8, image=v[:1])
    assert p.given.tolist() == [1, 0, 0, 0, 0, 1] and (p.canvas[-1] == p.canvas[0]).all()
    p = modes.place("connect", 6, 8, 8, video=v, video_end=e)
    assert p.given.tolist() == [1, 1, 0, 1, 1, 1]
    assert (p.canvas[:2] == v[-2:]).all() and (p.canvas[3:] == e[:3]).all()
    p = modes.place("extend_forward", 3, 8, 8, video=e)  # too long: its last frames, one left
    assert p.given.tolist() == [1, 1, 0] and (p.canvas[:2] == e[-2:]).all() and p.notes
    p = modes.place("edit", 4, 8, 8, edit=e, strength=0.4)
    assert not p.given.any() and (p.init == e[:4]).all() and p.strength == 0.4
    with pytest.raises(ValueError, match="needs --video_end"):
        modes.place("connect", 6, 8, 8, video=v)
    with pytest.raises(ValueError, match="--strength"):
        modes.place("i2v", 6, 8, 8, image=v[:1], strength=0.5)
    with pytest.raises(ValueError, match="more --frames"):
        modes.place("i2v", 1, 8, 8, image=v[:1])
    assert modes.infer_mode(None, None, v, e, None) == "connect"


def test_inputs_keep_their_aspect_and_are_resampled_in_time():
    wide = np.zeros((4, 8, 16, 3), np.uint8)
    wide[:, :, :, 0] = 200
    x, notes = modes.fit(wide, 8, 8, fps_in=16, fps_out=8, what="video")
    assert x.shape == (2, 8, 8, 3)
    assert (x[:, :2] == 200 * (np.arange(3) == 0)).all()  # padded with its edge, nothing cropped
    assert "resampled" in notes[0] and "aspect kept" in notes[1]


def test_a_plan_becomes_the_token_mask_of_its_task(model):
    graphdef, params = model
    v = _clip(2, 4, 4)
    plan = modes.place("loop", 3, 4, 4, image=v[:1])
    req = modes.to_request(plan, "a red square", (3, 4, 4), patch=PATCH, compression=(1, 1, 1))
    assert req.cond_frames.tolist() == [True, False, True]
    (x,) = sampler.sample(graphdef, params, [req], **KW)
    from vdit.data.video_io import to_uint8

    out = to_uint8(x)
    np.testing.assert_array_equal(out[0], v[0])  # given frames exact in the written pixels
    np.testing.assert_array_equal(out[-1], v[0])


def test_mode_eval_scores_given_frames_and_sdedit(model):
    from vdit.diffusion import evaluate

    graphdef, params = model
    setup = evaluate.EvalSetup(
        patch=PATCH, channels=3, flow_cfg=CFG, steps=2, cfg_scale=2.0, text_len=16
    )
    s = evaluate.evaluate_modes(graphdef, params, setup, n=1, shape=(4, 8, 8), strengths=(0, 1))
    assert s["given_exact"] == 1.0 and s["given_error"] == 0.0  # pixel space: bit for bit
    assert s["edit_distance_0"] == 0.0 < s["edit_distance_1"]
    for k in ("i2v_color", "extend_backward_motion", "loop_seam", "connect_error_chance"):
        assert 0.0 <= s[k] <= 1.0


def test_latent_conditioning_is_the_training_clips_encode_where_it_starts_the_output():
    """A latent model's given frames are encoded as the training pipeline's latents are (the
    whole clip through the causal VAE): frames given at the start of the output get exactly the
    latents the training clip had there, whatever the frames after them."""
    from vdit.models import vae

    tiny = vae.VAEConfig(
        base_channels=4,
        channel_mults=(1, 1, 1),
        temporal_down=(True, True),
        blocks_per_level=1,
        latent_channels=4,
        groups=2,
    )
    m = vae.CausalVAE3D(tiny, rngs=nnx.Rngs(0))

    def encode(x):
        return np.asarray(m.normalize(m.encode(jnp.asarray(x)[None])[0])[0])

    clip = _clip(9, 8, 8)  # 1 + 2 * 4 frames: 3 latent frames
    train = encode(clip.astype(np.float32) / 127.5 - 1.0)  # how `vdit encode` encodes the clip
    plan = modes.place("extend_forward", 9, 8, 8, video=clip[:5], leave=4)
    req = modes.to_request(
        plan, "a", (3, 1, 1), patch=(1, 1, 1), compression=(4, 8, 8), encode=encode
    )
    assert req.cond_frames.tolist() == [True, True, False]  # frames 0 and 1-4 given whole
    np.testing.assert_allclose(req.cond_latent[:2], train[:2], atol=1e-5)
    plan = modes.place("extend_forward", 9, 8, 8, video=clip[:3], leave=4)  # 0 whole, 1-2 of 1-4
    req = modes.to_request(
        plan, "a", (3, 1, 1), patch=(1, 1, 1), compression=(4, 8, 8), encode=encode
    )
    assert req.cond_frames.tolist() == [True, False, False]
    np.testing.assert_allclose(req.cond_latent[:1], train[:1], atol=1e-5)

"""Rectified flow pieces and the sampler's conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdit.diffusion import flow, sampler
from vdit.models.dit import DiTConfig, VideoDiT
from vdit.models.text import TextEncoderConfig

CFG = flow.FlowConfig(shift_ref_tokens=256, shift_at_ref=1.0, shift_max=4.0)


def test_time_shift_grows_with_size_and_keeps_endpoints():
    t = jnp.linspace(0, 1, 11)
    small = flow.time_shift(t, jnp.asarray(64), CFG)
    large = flow.time_shift(t, jnp.asarray(4096), CFG)
    np.testing.assert_allclose(small, t, atol=1e-6)  # below the reference size: no shift
    assert float(large[5]) > 0.75 and (np.diff(np.asarray(large)) > 0).all()
    np.testing.assert_allclose([large[0], large[-1]], [0.0, 1.0], atol=1e-6)


def test_segment_times_follow_each_samples_own_grid():
    grid = jnp.asarray([[[1, 16, 16], [16, 64, 64], [0, 0, 0]]])
    t = flow.sample_segment_times(jax.random.key(0), jnp.repeat(grid, 2000, 0), (1, 2, 2), CFG)
    assert float(t[:, 1].mean()) > float(t[:, 0].mean()) + 0.2  # the big video is noised more
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0]])
    tok = flow.gather_segments(t[:1], seg)
    assert float(tok[0, 0]) == float(t[0, 0]) and float(tok[0, 2]) == float(t[0, 1])
    assert float(tok[0, 5]) == 0.0


def test_conditioning_tokens_stay_clean_and_out_of_the_loss():
    x0 = jnp.ones((1, 4, 3))
    noise = jnp.zeros((1, 4, 3))
    cond = jnp.asarray([[True, False, False, False]])
    xt, v, t_tok = flow.noise_tokens(x0, noise, jnp.full((1, 4), 0.7), cond)
    np.testing.assert_allclose(xt[0, 0], 1.0)
    np.testing.assert_allclose(xt[0, 1], 0.3, atol=1e-6)
    assert float(t_tok[0, 0]) == 0.0
    pred = v.at[0, 0].set(100.0)  # a wrong prediction on the conditioning token does not count
    loss, count = flow.masked_mse(pred, v, ~cond)
    assert float(loss) == 0.0 and int(count) == 3


def test_sampler_keeps_conditioning_frames_and_is_seeded():
    cfg = DiTConfig(
        width=32,
        depth=1,
        heads=2,
        patch=(1, 2, 2),
        channels=3,
        text=TextEncoderConfig(width=16, depth=1, heads=2, max_len=16),
    )
    model = nnx.jit(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0)))()
    graphdef, params = nnx.split(model)
    first = np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 3)).astype(np.float32)
    frames = np.array([True, False, False])
    reqs = [
        sampler.SampleRequest(
            "a red square moves left", (3, 4, 4), seed=1, cond_latent=first, cond_frames=frames
        ),
        sampler.SampleRequest("a red square moves left", (3, 4, 4), seed=1),
        sampler.SampleRequest("a red square moves left", (1, 4, 6), seed=2),
    ]
    out = sampler.sample(
        graphdef,
        params,
        reqs,
        patch=(1, 2, 2),
        channels=3,
        flow_cfg=CFG,
        steps=3,
        cfg_scale=2.0,
        text_len=16,
    )
    assert [o.shape for o in out] == [(3, 4, 4, 3), (3, 4, 4, 3), (1, 4, 6, 3)]
    np.testing.assert_array_equal(out[0][0], first[0])  # the given frame is kept as given
    again = sampler.sample(
        graphdef,
        params,
        reqs[1:2],
        patch=(1, 2, 2),
        channels=3,
        flow_cfg=CFG,
        steps=3,
        cfg_scale=2.0,
        text_len=16,
    )
    np.testing.assert_array_equal(again[0], out[1])  # same seed, same sample
    assert np.isfinite(out[2]).all()


def test_sampler_gives_an_image_under_a_temporal_patch_above_one():
    """One frame under patch_t = 2 is sampled as trained (one temporal patch, the image repeated)
    and comes back as one frame: the first of that patch."""
    cfg = DiTConfig(
        width=32,
        depth=1,
        heads=2,
        patch=(2, 2, 2),
        channels=3,
        text=TextEncoderConfig(width=16, depth=1, heads=2, max_len=16),
    )
    model = nnx.jit(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0)))()
    graphdef, params = nnx.split(model)
    kw = dict(patch=(2, 2, 2), channels=3, flow_cfg=CFG, steps=2, cfg_scale=2.0, text_len=16)
    image, clip = sampler.sample(
        graphdef,
        params,
        [sampler.SampleRequest("a cat", (1, 4, 6), seed=5), sampler.SampleRequest("a", (4, 4, 4))],
        **kw,
    )
    assert image.shape == (1, 4, 6, 3) and clip.shape == (4, 4, 4, 3)
    (patch,) = sampler.sample(
        graphdef, params, [sampler.SampleRequest("a cat", (2, 4, 6), seed=5)], **kw
    )
    np.testing.assert_array_equal(image, patch[:1])

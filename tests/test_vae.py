"""The causal 3D VAE: causality, shapes, chunked == full, tiled ~ full, latent statistics, metrics,
config validation and a short training run."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from tiny import ROOT, load_config_module

from vdit import configlib
from vdit.data import vae_data
from vdit.models import vae, vae_chunked
from vdit.ops.quality import psnr, ssim
from vdit.train.load import load
from vdit.train.vae_task import VAETask, vae_data_config

# ct = 4 (two time-halving levels), 4x4 in space, 4 channels: every path of the full network, tiny.
TINY = vae.VAEConfig(
    base_channels=4,
    channel_mults=(1, 1, 1),
    temporal_down=(True, True),
    blocks_per_level=1,
    latent_channels=4,
    groups=2,
)


@pytest.fixture(scope="module")
def model():
    return vae.CausalVAE3D(TINY, rngs=nnx.Rngs(0))


def _video(key, shape):
    return jax.random.uniform(jax.random.key(key), shape, minval=-1.0, maxval=1.0)


def test_encoder_and_decoder_are_causal(model):
    x = _video(1, (1, 13, 8, 8, 3))  # latent frame i sees pixel frames <= 4 i
    mean, _ = vae.encode_full(model, x)
    assert mean.shape == (1, 4, 2, 2, 4)
    k = 5  # first seen by latent frame 2 (pixel frames 5..8)
    changed, _ = vae.encode_full(model, x.at[:, k].set(0.9))
    np.testing.assert_array_equal(np.asarray(changed[:, :2]), np.asarray(mean[:, :2]))
    assert np.abs(np.asarray(changed[:, 2:] - mean[:, 2:])).max() > 1e-4

    y = vae.decode_full(model, mean)
    assert y.shape == (1, 13, 8, 8, 3)
    # latent frame 2 first shapes pixel frames 5..8: frames 0..4 stay
    y2 = vae.decode_full(model, mean.at[:, 2].add(1.0))
    np.testing.assert_array_equal(np.asarray(y2[:, :5]), np.asarray(y[:, :5]))
    assert np.abs(np.asarray(y2[:, 5:] - y[:, 5:])).max() > 1e-4


def test_image_is_a_one_frame_video(model):
    x = _video(2, (2, 1, 8, 12, 3))
    mean, logvar = vae.encode_full(model, x)
    assert mean.shape == logvar.shape == (2, 1, 2, 3, 4)
    assert vae.decode_full(model, mean).shape == (2, 1, 8, 12, 3)
    # an image encodes as the first frame of any video starting with it
    video = jnp.concatenate([x, _video(3, (2, 4, 8, 12, 3))], axis=1)
    first, _ = vae.encode_full(model, video)
    np.testing.assert_allclose(np.asarray(first[:, :1]), np.asarray(mean), atol=1e-6)


@pytest.mark.parametrize(
    "frames, height, width, latent",
    [
        (17, 40, 56, (5, 5, 7)),
        (1, 8, 8, (1, 1, 1)),
        (18, 40, 56, (5, 5, 7)),
        (4, 16, 24, (1, 2, 3)),
    ],
)
def test_shapes_of_the_default_network(frames, height, width, latent):
    """Default config (4x8x8, 16 channels), shapes only (abstract evaluation, nothing compiles)."""
    cfg = vae.VAEConfig()
    assert cfg.compression == (4, 8, 8)
    m = nnx.eval_shape(lambda: vae.CausalVAE3D(cfg, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((1, frames, height, width, 3), jnp.float32)
    mean, logvar = nnx.eval_shape(lambda m, x: m.encode(x), m, x)
    assert mean.shape == logvar.shape == (1, *latent, 16)
    y = nnx.eval_shape(lambda m, z: m.decode(z), m, mean)
    assert y.shape == (1, 1 + (latent[0] - 1) * 4, height, width, 3)


def test_sizes_not_a_multiple_of_the_compression_are_refused(model):
    with pytest.raises(ValueError, match="not a multiple"):
        model.encode(jnp.zeros((1, 5, 10, 8, 3)))


def test_chunked_equals_full(model):
    x = _video(4, (1, 18, 8, 8, 3))  # 18 frames: the last one is seen by no latent frame
    mean, logvar = vae.encode_full(model, x)
    assert mean.shape[1] == 5
    m, lv = vae_chunked.encode_chunked(model, x, 4)  # chunks of 1, 4, 4, 4, 4 frames
    np.testing.assert_allclose(np.asarray(m), np.asarray(mean), atol=2e-5)
    np.testing.assert_allclose(np.asarray(lv), np.asarray(logvar), atol=2e-5)
    y = vae.decode_full(model, mean)
    yc = vae_chunked.decode_chunked(model, mean, 2)  # 1, 2, 2 latent frames
    np.testing.assert_allclose(np.asarray(yc), np.asarray(y), atol=2e-5)
    with pytest.raises(ValueError, match="multiple of ct"):
        vae_chunked.encode_chunked(model, x, 6)


def test_groupnorm_and_attention_stay_causal_and_chunkable():
    """Per-frame GroupNorm and per-frame attention: still causal, chunked still == full."""
    cfg = vae.VAEConfig(
        base_channels=4,
        channel_mults=(1, 1),
        temporal_down=(True,),
        blocks_per_level=1,
        latent_channels=4,
        norm="group",
        groups=2,
        mid_attention=True,
        pad_mode="zeros",
    )
    m = vae.CausalVAE3D(cfg, rngs=nnx.Rngs(1))
    x = _video(7, (1, 7, 8, 8, 3))  # ct = 2: 4 latent frames
    mean, _ = vae.encode_full(m, x)
    changed, _ = vae.encode_full(m, x.at[:, 3].set(0.5))  # first seen by latent frame 2
    np.testing.assert_array_equal(np.asarray(changed[:, :2]), np.asarray(mean[:, :2]))
    assert np.abs(np.asarray(changed[:, 2:] - mean[:, 2:])).max() > 1e-4
    np.testing.assert_allclose(
        np.asarray(vae_chunked.encode_chunked(m, x, 2)[0]), np.asarray(mean), atol=2e-5
    )


def test_tiled_is_exact_when_the_overlap_margin_covers_the_receptive_field():
    """One level (no downsampling): the encoder sees 8 pixels around, the decoder 10. The outer
    quarter of an overlap is not blended in, so with overlap // 4 >= that radius, tiled == full."""
    cfg = vae.VAEConfig(
        base_channels=4, channel_mults=(1,), temporal_down=(), blocks_per_level=1, latent_channels=4
    )
    m = vae.CausalVAE3D(cfg, rngs=nnx.Rngs(0))
    x = _video(5, (1, 2, 56, 56, 3))
    mean, _ = vae.encode_full(m, x)
    y = vae.decode_full(m, mean)
    mt, _ = vae_chunked.encode_tiled(m, x, (40, 40), (32, 32))  # margin 8: 4 tiles
    np.testing.assert_allclose(np.asarray(mt), np.asarray(mean), atol=1e-5)
    yt = vae_chunked.decode_tiled(m, mean, (48, 48), (40, 40))  # margin 10
    np.testing.assert_allclose(np.asarray(yt), np.asarray(y), atol=1e-5)
    # a margin under the receptive field is only approximate
    yt_small = vae_chunked.decode_tiled(m, mean, (48, 48), (36, 36))
    assert np.abs(np.asarray(yt_small - y)).max() > 1e-5


@pytest.mark.slow
def test_tiled_and_chunked_together_approximate_full(model):
    """Tiles 12 of 16 latent pixels, overlap 8; each tile chunked in time. This untrained network
    sees far past a tile, so tiling is only approximate; measured (fixed seeds): encoder max error
    0.144 (|mean| up to 1.26), decoder max 0.90 (|video| up to 2.24) and RMS 0.103 (video RMS
    0.568). The bounds sit ~30% above those; averaging the tiles without the cross-fade
    (`blend_ramp` all ones) gives 0.47, 1.43 and 0.257 and fails each of them."""
    x = _video(6, (1, 5, 64, 64, 3))
    mean, _ = vae.encode_full(model, x)
    y = vae.decode_full(model, mean)
    mt, _ = vae_chunked.encode_tiled(model, x, (12, 12), (8, 8), chunk_frames=4)
    yt = vae_chunked.decode_tiled(model, mean, (12, 12), (8, 8), chunk_latents=1)
    enc_err = float(jnp.abs(mt - mean).max())
    rms = lambda a: float(jnp.sqrt(jnp.mean(jnp.square(a))))
    assert enc_err < 0.15 * float(jnp.abs(mean).max())
    assert float(jnp.abs(yt - y).max()) < 0.5 * float(jnp.abs(y).max())
    assert rms(yt - y) < 0.25 * rms(y)
    # a smaller overlap is worse
    mt_wide, _ = vae_chunked.encode_tiled(model, x, (8, 8), (4, 4))
    assert float(jnp.abs(mt_wide - mean).max()) > enc_err


def test_blend_weights():
    w = vae_chunked.blend_ramp(12, 8, left=True, right=False)
    np.testing.assert_array_equal(w[:2], 0.0)  # outer quarter of the overlap
    assert np.all(np.diff(w[:8]) >= 0) and np.all(w[8:] == 1.0)
    both = (
        vae_chunked.blend_ramp(12, 8, left=False, right=True)[4:]
        + vae_chunked.blend_ramp(12, 8, True, False)[:8]
    )
    np.testing.assert_allclose(both, 1.0, atol=1e-6)  # the two sides of an overlap cross-fade


def test_latent_statistics_normalise_latents(model):
    videos = [np.asarray(_video(10 + i, (1, 5, 8, 8, 3))) for i in range(3)]
    mean, std = vae.latent_statistics(model, videos)
    m = vae.CausalVAE3D(TINY, rngs=nnx.Rngs(0))
    vae.set_latent_statistics(m, mean, std)
    z = jnp.concatenate([vae.encode_full(m, jnp.asarray(v))[0].reshape(-1, 4) for v in videos])
    zn = m.normalize(z)
    np.testing.assert_allclose(np.asarray(zn.mean(0)), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(zn.std(0)), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(m.denormalize(zn)), np.asarray(z), atol=1e-5)


def test_psnr_and_ssim():
    x = np.asarray(_video(20, (2, 3, 16, 16, 3)))
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(psnr(x * 0.5, x * 0.5 + 0.1)) == pytest.approx(10 * np.log10(4 / 0.01), abs=1e-3)
    noisy = [x + s * np.asarray(_video(21, x.shape)) for s in (0.05, 0.2, 0.5)]
    ssims = [float(ssim(n, x)) for n in noisy]
    assert ssims[0] > ssims[1] > ssims[2] > -1.0


def test_kl_of_the_prior_is_zero():
    assert float(vae.kl_divergence(jnp.zeros(8), jnp.zeros(8))) == 0.0
    assert float(vae.kl_divergence(jnp.ones(8), jnp.zeros(8))) == pytest.approx(0.5)


def vae_tiny_config() -> ml_collections.ConfigDict:
    c = load_config_module(os.path.join(ROOT, "configs", "vae.py")).get_config()
    c.vae.base_channels = 4
    c.vae.latent_channels = 4
    c.vae.channel_mults = (1, 1)
    c.vae.temporal_down = (True,)
    c.data.frame_choices = (5,)
    c.data.image_fraction = 0.0  # one shape: one compile
    c.data.size_choices = ((16, 16),)
    c.data.batch_size = 2
    c.data.max_pixels = 2 * 5 * 16 * 16
    c.data.eval_samples = 2
    c.optim.warmup_steps = 2
    c.optim.lr = 3e-3
    c.train.steps = 30
    c.train.log_every = 10
    c.train.eval_every = 30
    c.train.checkpoint_every = 30
    c.train.stats_samples = 2
    c.train.video_samples = 2
    c.train.progress = False
    return c


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: setattr(c.vae, "temporal_down", (True,)), "vae.temporal_down"),
        (lambda c: setattr(c.vae, "channel_mults", ()), "vae.channel_mults"),
        (lambda c: setattr(c.vae, "norm", "batch"), "vae.norm"),
        (lambda c: setattr(c.vae, "pad_mode", "reflect"), "vae.pad_mode"),
        (lambda c: setattr(c.vae, "temporal_kernel", 1), "vae.temporal_kernel"),
        (lambda c: setattr(c.vae, "latent_channels", 0), "vae.latent_channels"),
        (lambda c: setattr(c.loss, "kl_weight", -1.0), "loss.kl_weight"),
        (lambda c: setattr(c.data, "size_choices", ((20, 16),)), "data.size_choices"),
        (lambda c: setattr(c.data, "frame_choices", (1, 5)), "data.frame_choices"),
        (lambda c: setattr(c.data, "max_pixels", 100), "data.max_pixels"),
        (lambda c: setattr(c.data, "image_fraction", 2.0), "data.image_fraction"),
        (lambda c: setattr(c.train, "video_samples", 9), "train.video_samples"),
        (lambda c: setattr(c.data, "source", "web"), "data.source"),
        (lambda c: setattr(c.data, "pan_fraction", -0.1), "data.pan_fraction"),
        (lambda c: setattr(c.data, "source", "records"), "data.records.path"),
        (lambda c: setattr(c.loss, "disc_weight", -1.0), "loss.disc_weight"),
        (lambda c: setattr(c.disc, "layers", 0), "disc.layers"),
        (lambda c: setattr(c.disc, "b1", 1.0), "disc.b1"),
        (lambda c: setattr(c.mesh, "data", 3), "mesh"),
        (lambda c: setattr(c, "kind", "gan"), "kind"),
        (lambda c: setattr(c.vae, "base_channel", 8), "vae.base_channel"),
        (lambda c: setattr(c.disc, "learning_rate", 1e-3), "disc.learning_rate"),
    ],
)
def test_validation_names_the_field(change, field):
    c = load_config_module(os.path.join(ROOT, "configs", "vae.py")).get_config()
    change(c)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        configlib.load(c, 8)


def test_batches_are_a_function_of_the_step_and_bounded():
    c = load_config_module(os.path.join(ROOT, "configs", "vae.py")).get_config()
    d = vae_data_config(configlib.load(c, 8))
    shapes = set()
    for k in range(40):
        b = vae_data.batch_at(d, k)
        np.testing.assert_array_equal(b, vae_data.batch_at(d, k))
        assert b.dtype == np.float32 and -1.0 <= b.min() and b.max() <= 1.0
        assert b.size // 3 <= d.max_pixels
        shapes.add(b.shape[1:4])
    assert any(s[0] == 1 for s in shapes) and any(s[0] > 1 for s in shapes)  # images and videos
    assert len({s[1:] for s in shapes}) > 1  # several native sizes


@pytest.mark.slow
def test_short_training_lowers_the_loss(tmp_path):
    from vdit.train.loop import train_and_evaluate
    from vdit.train.metrics import read_metrics

    c = vae_tiny_config()
    c.vae.channel_mults = (1,)  # one level (no downsampling): the quickest network to compile
    c.vae.temporal_down = ()
    out = train_and_evaluate(c, str(tmp_path))
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["l1"] < 0.6 * rows[0]["l1"], rows
    assert rows[-1]["psnr"] > rows[0]["psnr"]
    assert out["skipped_steps"] == 0 and np.isfinite(out["eval_psnr"]) and 0 < out["eval_ssim"] <= 1
    assert os.path.exists(tmp_path / "samples" / "vae_step_0000030.mp4")
    # the stored model: EMA parameters and the latent statistics of the final step
    loaded = load(tmp_path)
    cfg, model = loaded.config, loaded.model()
    assert cfg.kind == "vae"
    std = np.asarray(model.latent_std[...])
    assert std.shape == (4,) and np.all(std > 0) and not np.allclose(std, 1.0)
    assert out["latent_std"] == pytest.approx(float(std.mean()), rel=1e-5)


@pytest.mark.slow
def test_resumed_training_equals_uninterrupted(tmp_path):
    from vdit.train.loop import train_and_evaluate

    c = vae_tiny_config()
    with c.unlocked():
        c.train.steps = 6
        c.train.log_every = 2
        c.train.eval_every = 6
        c.train.checkpoint_every = 3
    train_and_evaluate(c, str(tmp_path / "full"))
    c.train.steps = 3
    train_and_evaluate(c, str(tmp_path / "resumed"))
    c.train.steps = 6
    train_and_evaluate(c, str(tmp_path / "resumed"))
    full = load(tmp_path / "full", ema=False).model()
    resumed = load(tmp_path / "resumed", ema=False).model()
    for a, b in zip(
        jax.tree.leaves(nnx.state(full)), jax.tree.leaves(nnx.state(resumed)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["mixed", "records"])
def test_training_on_photos_and_records_logs_their_metrics(tmp_path, source):
    pytest.importorskip("skimage")
    from test_vae_data import flat_video, write_shards

    from vdit.train.loop import train_and_evaluate
    from vdit.train.metrics import read_metrics

    c = vae_tiny_config()
    c.vae.channel_mults = (1,)
    c.vae.temporal_down = ()
    c.data.source = source
    if source == "records":
        rng = np.random.default_rng(0)
        videos = [rng.integers(0, 256, (6, 20, 24, 3), dtype=np.uint8) for _ in range(6)]
        c.data.records.path = write_shards(
            tmp_path / "shards", videos + [flat_video(9)], corrupt={1}
        )
    c.train.steps = 4
    c.train.log_every = 2
    c.train.eval_every = 4
    c.train.checkpoint_every = 4
    out = train_and_evaluate(c, str(tmp_path / "run"))
    rows = read_metrics(tmp_path / "run")
    assert np.isfinite(out["eval_psnr"]) and 0 < out["eval_ssim"] <= 1  # procedural, always
    name = "pan" if source == "mixed" else "records"
    assert np.isfinite(out[f"eval_psnr_{name}"]) and 0 < out[f"eval_ssim_{name}"] <= 1
    if source == "records":
        assert sum(r["data_skipped"] for r in rows if "data_skipped" in r) > 0


def disc_tiny_config(disc_weight=0.5, disc_start=1) -> ml_collections.ConfigDict:
    c = vae_tiny_config()
    c.vae.channel_mults = (1,)  # one level: the quickest network to compile
    c.vae.temporal_down = ()
    c.loss.disc_weight = disc_weight
    c.loss.disc_start = disc_start
    c.disc.channels = 4
    c.disc.layers = 2
    c.disc.lr = 1e-2
    return c


def _one_device_trainer(c):
    with c.unlocked():
        c.mesh.data = 1
    return VAETask(configlib.load(c, 1), jax.devices()[:1])


def test_no_discriminator_state_when_the_weight_is_0():
    c = disc_tiny_config(disc_weight=0.0)
    trainer = _one_device_trainer(c)
    assert set(trainer.state.abstract) == {"params", "opt_state", "ema", "stats", "step", "skipped"}
    with_disc = _one_device_trainer(disc_tiny_config())
    assert set(with_disc.state.abstract) - set(trainer.state.abstract) == {
        "disc_params",
        "disc_opt_state",
    }
    assert with_disc.disc(with_disc.state.abstract["disc_params"]) is not None


@pytest.mark.slow
def test_discriminator_waits_for_disc_start_then_trains():
    """disc_start=1: step 0 is the no-discriminator step (same loss, same update, discriminator
    untouched); at step 1 the loss adds disc_weight * g_adv and the discriminator changes."""
    on = _one_device_trainer(disc_tiny_config(disc_weight=0.5, disc_start=1))
    off = _one_device_trainer(disc_tiny_config(disc_weight=0.0))
    d = vae_data_config(configlib.load(disc_tiny_config(), 1))
    step_on, step_off = jax.jit(on.train_step), jax.jit(off.train_step)
    s_on, s_off = on.state.init(), off.state.init()
    for a, b in zip(jax.tree.leaves(s_on["params"]), jax.tree.leaves(s_off["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    disc0 = jax.device_get(s_on["disc_params"])

    video = jnp.asarray(vae_data.batch_at(d, 0))
    s_on, m_on = step_on(s_on, video)
    s_off, m_off = step_off(s_off, video)
    assert float(m_on["loss"]) == pytest.approx(float(m_off["loss"]), rel=1e-6)
    assert np.isfinite(float(m_on["d_loss"])) and float(m_on["disc_active"]) == 0.0
    for a, b in zip(jax.tree.leaves(s_on["params"]), jax.tree.leaves(s_off["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    for a, b in zip(jax.tree.leaves(s_on["disc_params"]), jax.tree.leaves(disc0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)

    video = jnp.asarray(vae_data.batch_at(d, 1))
    s_on, m_on = step_on(s_on, video)
    s_off, m_off = step_off(s_off, video)
    assert float(m_on["disc_active"]) == 1.0 and np.isfinite(float(m_on["d_loss"]))
    assert float(m_on["loss"]) == pytest.approx(
        float(m_off["loss"]) + 0.5 * float(m_on["g_adv"]), rel=1e-4, abs=1e-5
    )
    assert abs(float(m_on["g_adv"])) > 1e-4  # the adversarial term is there
    # every kernel moves (the last bias's hinge gradient is exactly 0 while every logit is within
    # the margins: -P(real < 1) + P(fake > -1) = -1 + 1)
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(s_on["disc_params"]))[0]
    kernels = [
        (leaf, b)
        for (path, leaf), b in zip(flat, jax.tree.leaves(disc0), strict=True)
        if "kernel" in jax.tree_util.keystr(path)
    ]
    assert len(kernels) == 3 and all(np.abs(a - b).max() > 0 for a, b in kernels)
    assert int(s_on["step"]) == 2 and int(s_on["skipped"]) == 0


def test_patch_discriminator_shapes_and_hinge_loss():
    from vdit.models import discriminator

    cfg = discriminator.DiscConfig(channels=4, layers=2)
    d = discriminator.PatchDiscriminator(cfg, rngs=nnx.Rngs(0))
    x = _video(30, (2, 3, 16, 24, 3))
    logits = d(x)
    assert logits.shape == (2, 3, 4, 6) and logits.dtype == jnp.float32
    # per frame (temporal_kernel=1): changing frame 1 changes no other frame's logits
    y = d(x.at[:, 1].set(0.0))
    np.testing.assert_array_equal(np.asarray(y[:, [0, 2]]), np.asarray(logits[:, [0, 2]]))
    assert np.abs(np.asarray(y[:, 1] - logits[:, 1])).max() > 0
    # causal 3D: a frame's logits see earlier frames, never later ones
    d3 = discriminator.PatchDiscriminator(
        discriminator.DiscConfig(channels=4, layers=2, temporal_kernel=2), rngs=nnx.Rngs(0)
    )
    a, b = d3(x), d3(x.at[:, 1].set(0.0))
    np.testing.assert_array_equal(np.asarray(a[:, 0]), np.asarray(b[:, 0]))
    assert np.abs(np.asarray(a[:, 2] - b[:, 2])).max() > 0
    hinge = discriminator.hinge_d_loss
    assert float(hinge(jnp.array([2.0, 0.5]), jnp.array([-3.0, 0.0]))) == pytest.approx(
        (0.0 + 0.5) / 2 + (0.0 + 1.0) / 2
    )


def _final_state(workdir, c):
    from vdit.train.checkpoint import Checkpointer

    trainer = VAETask(configlib.load(c, 8))
    with Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=None) as ckpt:
        state, step = ckpt.restore(trainer.state.abstract_sharded())
    return jax.device_get(state), step


@pytest.mark.slow
def test_resumed_training_with_the_discriminator_equals_uninterrupted(tmp_path):
    """disc_start=2, 3 + resume + 3 steps == 6: VAE, discriminator and both optimizer states."""
    from vdit.train.loop import train_and_evaluate

    c = disc_tiny_config(disc_weight=0.5, disc_start=2)
    with c.unlocked():
        c.train.steps = 6
        c.train.log_every = 3
        c.train.eval_every = 6
        c.train.checkpoint_every = 3
    out = train_and_evaluate(c, str(tmp_path / "full"))
    assert np.isfinite(out["d_loss"]) and out["disc_active"] == 1.0
    c.train.steps = 3
    train_and_evaluate(c, str(tmp_path / "resumed"))
    c.train.steps = 6
    train_and_evaluate(c, str(tmp_path / "resumed"))
    full, step = _final_state(tmp_path / "full", c)
    resumed, step_r = _final_state(tmp_path / "resumed", c)
    assert step == step_r == 6 and set(full) == set(resumed)
    assert "disc_params" in full and "disc_opt_state" in full
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.slow
def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    """The adaptive weight (autodiff through the last layer only) == the norms of the last kernel's
    entries of the full gradients; the step's loss uses disc_weight * adaptive * g_adv."""
    c = disc_tiny_config(disc_weight=0.5, disc_start=0)
    c.loss.disc_adaptive = True
    on = _one_device_trainer(c)
    state = on.state.init()
    d = vae_data_config(configlib.load(disc_tiny_config(), 1))
    video = jnp.asarray(vae_data.batch_at(d, 0))
    args = (state["stats"], state["disc_params"], video, state["step"])

    @jax.jit
    def both(params):
        last = lambda g: g["decoder"]["conv_out"]["kernel"]
        g_rec = last(jax.grad(lambda p: on._gan_parts(p, *args)[4])(params))
        g_adv = last(jax.grad(lambda p: on._gan_parts(p, *args)[5])(params))
        loss, _, _, _, _, adv = on._gan_parts(params, *args)
        return (
            on.adaptive_weight(params, *args),
            jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_adv) + 1e-4),
            loss,
            adv,
        )

    w, expected, loss, adv = both(state["params"])
    assert float(w) == pytest.approx(float(expected), rel=1e-4)
    assert 0 < float(w) < 1e4
    _, m = jax.jit(on.train_step)(state, video)
    assert float(m["adaptive_weight"]) == pytest.approx(float(w), rel=1e-4)
    assert float(m["loss"]) == pytest.approx(float(loss) + 0.5 * float(w) * float(adv), rel=1e-4)

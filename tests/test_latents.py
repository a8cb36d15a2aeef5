"""`vdit encode` and training on VAE latents: encoded latents equal the VAE's encode of the planned
video; the output is the same on one device, eight devices and two processes; bad records are counted;
the latent pipeline feeds normalised latents; a DiT trains on them and samples decode through the VAE."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import ROOT, load_config_module, tiny_config

from vdit import configlib, encode
from vdit.data import latents, packing, pipeline, records, size, sources
from vdit.data.tokenizer import detokenize
from vdit.train.load import load
from vdit.train.loop import train_and_evaluate

PATCH = (1, 2, 2)  # DiT patch in latent units


def _tiny_vae_config():
    c = load_config_module(os.path.join(ROOT, "configs", "vae.py")).get_config()
    c.vae.base_channels = 4
    c.vae.latent_channels = 4
    c.vae.channel_mults = (1, 1)
    c.vae.temporal_down = (True,)  # compression (2, 2, 2)
    c.data.frame_choices = (5,)
    c.data.image_fraction = 0.0
    c.data.size_choices = ((8, 8),)
    c.data.batch_size = 1
    c.data.max_pixels = 5 * 8 * 8
    c.data.eval_samples = 1
    c.train.steps = 1
    c.train.log_every = 1
    c.train.eval_every = 1
    c.train.checkpoint_every = 1
    c.train.stats_samples = 2
    c.train.video_samples = 0
    c.train.progress = False
    c.mesh.data = 1
    return c


def _video(rng, t, h, w):
    return rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A one-step VAE (compression 2x2x2, 4 channels) and records: three good samples (one needs
    snapping to whole patches), one image, one corrupt record and one too small for a patch."""
    root = tmp_path_factory.mktemp("latents")
    vae_dir = str(root / "vae")
    train_and_evaluate(_tiny_vae_config(), vae_dir, jax.local_devices()[:1])
    rng = np.random.default_rng(0)
    rec_dir = root / "records"
    rec_dir.mkdir()
    writer = records.ShardWriter(str(rec_dir), shard_size=4)
    good = {
        "clip a": _video(rng, 5, 8, 12),
        "clip b": _video(rng, 7, 12, 8),
        "clip c": _video(rng, 5, 10, 13),
        "still": _video(rng, 1, 8, 8),
    }
    for i, (caption, v) in enumerate(good.items()):
        writer.write(records.encode_record(v, caption, 8.0 if v.shape[0] > 1 else 0.0, f"f{i}"))
        if i == 1:
            writer.write(b"\x00not a record")  # index 2: decode_error
    writer.write(records.encode_record(_video(rng, 3, 2, 2), "tiny", 8.0, "tiny"))  # too_small
    writer.close()
    return {"vae": vae_dir, "records": str(rec_dir), "good": good, "root": root}


def _read(out):
    src = latents.LatentsSource(str(out))
    return {e["caption"]: e for e in (src[i] for i in range(len(src)))}


def test_encode_writes_the_vae_latents_of_the_planned_videos(setup, tmp_path):
    out = tmp_path / "lat"
    m = encode.encode_dataset(
        setup["vae"],
        setup["records"],
        str(out),
        encode.EncodeOptions(patch=PATCH, chunk_frames=2),
        devices=jax.local_devices()[:1],
    )
    assert m["written"] == 4 and m["input_records"] == 6
    assert m["skipped_by_reason"] == {"decode_error": 1, "too_small": 1}
    assert {s["index"] for s in m["skipped"]} == {2, 5}
    assert json.load(open(out / latents.MANIFEST))["written"] == 4
    model = load(setup["vae"]).model()
    assert m["vae"]["compression"] == [2, 2, 2] and m["vae"]["latent_channels"] == 4
    np.testing.assert_allclose(m["vae"]["latent_std"], np.asarray(model.latent_std[...]))
    policy = encode.size_policy(encode.EncodeOptions(patch=PATCH), (2, 2, 2))
    got = _read(out)
    assert set(got) == set(setup["good"])
    for caption, video in setup["good"].items():
        planned, events = size.fit_video({"video": video}, policy)
        mean, logvar = model.encode(jnp.asarray(planned, jnp.float32)[None] / 127.5 - 1.0)
        e = got[caption]
        np.testing.assert_allclose(e["mean"], np.asarray(mean[0]), atol=2e-5)
        np.testing.assert_allclose(e["logvar"], np.asarray(logvar[0]), atol=2e-5)
        assert all(g % p == 0 for g, p in zip(e["mean"].shape[:3], PATCH, strict=True))
        assert e["events"] == tuple(events)
    assert got["clip b"]["mean"].shape == (4, 6, 4, 4)  # 7 frames = 1 + 3 * 2: 4 latent frames
    assert "snapped" in got["clip c"]["events"]  # 10x13 -> 8x12 pixels, 4x6 latent
    assert got["still"]["mean"].shape[0] == 1 and "fps" not in got["still"]
    # the output folder is never overwritten
    with pytest.raises(ValueError, match="already holds"):
        encode.encode_dataset(setup["vae"], setup["records"], str(out), encode.EncodeOptions())


def test_encode_is_the_same_on_eight_devices_and_over_two_processes(setup, tmp_path):
    opts = encode.EncodeOptions(patch=PATCH, store="sample", seed=3, chunk_frames=0)
    encode.encode_dataset(
        setup["vae"], setup["records"], str(tmp_path / "one"), opts, devices=jax.local_devices()[:1]
    )
    encode.encode_dataset(
        setup["vae"],
        setup["records"],
        str(tmp_path / "eight"),
        opts,
        devices=jax.local_devices()[:8],
    )
    for p in range(2):
        encode.encode_dataset(
            setup["vae"],
            setup["records"],
            str(tmp_path / "two"),
            opts,
            devices=jax.local_devices()[4 * p : 4 * p + 4],
            process_index=p,
            process_count=2,
        )
    merged = encode.merge_manifests(str(tmp_path / "two"), 2)
    assert merged["written"] == 4 and merged["skipped_count"] == 2
    assert {s["file"] for s in merged["shards"]} == {
        "shard-p000-00000.array_record",
        "shard-p001-00000.array_record",
    }
    one = _read(tmp_path / "one")
    for other in ("eight", "two"):
        got = _read(tmp_path / other)
        assert set(got) == set(one)
        for k in one:  # posterior samples drawn from the record's index: device-count independent
            assert got[k]["logvar"] is None
            np.testing.assert_allclose(got[k]["mean"], one[k]["mean"], atol=1e-6)


def _latent_config(path, vae_dir=""):
    c = tiny_config("mu/2")
    c.autoencoder.kind = "latent"
    c.autoencoder.compression = (2, 2, 2)
    c.autoencoder.channels = 4
    c.autoencoder.vae = vae_dir
    c.data.source = "latents"
    c.data.latents.path = str(path)
    c.data.latents.sample_posterior = False
    c.data.caption_dropout = 0.0
    c.data.row_len = 64
    c.data.max_tokens_per_sample = 64
    c.sample.grid_shape = (3, 8, 8)  # pixels: 2 latent frames of 4x4
    return c


def test_latent_pipeline_feeds_normalised_latents(setup, tmp_path):
    out = tmp_path / "lat"
    m = encode.encode_dataset(
        setup["vae"],
        setup["records"],
        str(out),
        encode.EncodeOptions(patch=PATCH),
        devices=jax.local_devices()[:1],
    )
    stored = _read(out)
    shift, scale = (np.asarray(m["vae"][k], np.float32) for k in ("latent_mean", "latent_std"))
    cfg = configlib.pipeline_config(configlib.load(_latent_config(out)))
    batch = next(iter(pipeline.build(cfg)))
    assert batch["patches"].shape[-1] == 2 * 2 * 4
    seen = set()
    for r in range(batch["segment_ids"].shape[0]):
        for s in packing.unpack_row(batch, r, PATCH):
            caption = detokenize(s["text"])
            np.testing.assert_allclose(
                s["latent"], (stored[caption]["mean"] - shift) / scale, rtol=1e-5, atol=1e-5
            )
            seen.add(caption)
    assert seen == set(stored)
    # In a latent config the frame-rate fields say how the latents were encoded (`vdit encode`
    # reads them from this config): accepted, and not applied to the latents again.
    c = _latent_config(out)
    c.data.frame_stride, c.data.max_fps = 2, 1.0
    strided = next(iter(pipeline.build(configlib.pipeline_config(configlib.load(c)))))
    np.testing.assert_array_equal(strided["patches"], batch["patches"])

    # A cap under the largest latent rejects it, counted; a different autoencoder is refused.
    c = _latent_config(out)
    c.data.max_tokens_per_sample = 20  # clip b: 4 x 3 x 2 = 24 tokens; the others fit
    cfg = configlib.pipeline_config(configlib.load(c))
    it = iter(pipeline.build(cfg))
    counts = sum(next(it)["stats"].reshape(-1, len(size.STATS)).sum(0) for _ in range(3))
    assert counts[size.STATS.index("rejected_over_cap")] >= 1
    c = _latent_config(out)
    c.autoencoder.channels = 8
    with pytest.raises(ValueError, match="autoencoder.channels"):
        next(iter(pipeline.build(configlib.pipeline_config(configlib.load(c)))))
    c = _latent_config(out)
    c.data.source = "synthetic"
    with pytest.raises(ValueError, match="data.source"):
        configlib.load(c)


def test_posterior_samples_differ_per_use_and_follow_logvar(setup, tmp_path):
    out = tmp_path / "lat"
    encode.encode_dataset(
        setup["vae"],
        setup["records"],
        str(out),
        encode.EncodeOptions(patch=PATCH),
        devices=jax.local_devices()[:1],
    )
    c = _latent_config(out)
    c.data.latents.sample_posterior = True
    cfg = configlib.pipeline_config(configlib.load(c))
    manifest = latents.read_manifest(str(out))
    shift, scale = sources.latent_statistics(manifest, cfg)
    element = latents.LatentsSource(str(out))[0]
    prep = pipeline._PrepareLatent(cfg, shift, scale)
    draws = [
        packing.unpatchify(
            prep.random_map(dict(element), np.random.default_rng(i))["patches"],
            element["mean"].shape[:3],
            PATCH,
        )
        for i in range(64)
    ]
    z = np.stack(draws) * scale + shift  # back to raw latents
    np.testing.assert_allclose(
        z.mean(0), element["mean"], atol=4 * np.exp(0.5 * element["logvar"].max()) / 8 + 1e-3
    )
    ratio = z.std(0) / np.exp(0.5 * element["logvar"])
    assert 0.7 < float(np.median(ratio)) < 1.3


@pytest.mark.slow
def test_a_dit_trains_on_latents_and_samples_through_the_vae(setup, tmp_path):
    from vdit.diffusion.evaluate import generate
    from vdit.train.samples import check_vae, eval_setup

    out = tmp_path / "lat"
    encode.encode_dataset(
        setup["vae"],
        setup["records"],
        str(out),
        encode.EncodeOptions(patch=PATCH),
        devices=jax.local_devices()[:1],
    )
    c = _latent_config(out, setup["vae"])
    c.train.steps = 2
    metrics = train_and_evaluate(c, str(tmp_path / "dit"))
    assert np.isfinite(metrics["loss"]) and metrics["data_rejected_decode_error"] == 0
    assert os.path.exists(tmp_path / "dit" / "samples" / "step_0000002.mp4")
    dit = load(tmp_path / "dit")
    (video,) = generate(dit.graphdef, dit.params, ["clip a"], (5, 8, 12), eval_setup(dit.config))
    assert video.shape == (5, 8, 12, 3) and video.dtype == np.uint8  # 3x4x6 latent, decoded
    # a VAE whose statistics are not the encoding one is refused
    manifest = latents.read_manifest(str(out))
    manifest["vae"]["latent_mean"] = [v + 1.0 for v in manifest["vae"]["latent_mean"]]
    with pytest.raises(ValueError, match="autoencoder.vae"):
        check_vae(dit.config, manifest)


def test_the_encode_command(setup, tmp_path):
    import subprocess
    import sys

    def run(*args):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        return subprocess.run(
            [sys.executable, "-m", "vdit.cli", "encode", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    config = [  # the DiT config that trains on these latents: patch 1x2x2, the tiny VAE's
        f"--config={os.path.join(ROOT, 'configs', 'latent.py')}:mu/2",
        "--config.autoencoder.compression=(2,2,2)",
        "--config.autoencoder.channels=4",
        "--config.data.max_tokens_per_sample=20",
    ]
    out = tmp_path / "lat"
    proc = run(
        *config,
        f"--vae={setup['vae']}",
        f"--input={setup['records']}",
        f"--out={out}",
        "--chunk_frames=2",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    # clip b (24 tokens at full size) fits under the cap instead of being lost: as it is smaller
    # than data.min_side, by keeping its first frames at full size
    assert summary["written"] == 4 and summary["skipped"] == 2
    got = _read(out)
    assert "frames_cut" in got["clip b"]["events"] and "downscaled" not in got["clip b"]["events"]
    assert np.prod(got["clip b"]["mean"].shape[:3]) // 4 <= 20
    assert "skip record 2: decode_error" in proc.stderr
    proc = run(
        *config, f"--vae={tmp_path}", f"--input={setup['records']}", f"--out={tmp_path / 'x'}"
    )
    assert proc.returncode != 0 and "no checkpoints folder" in proc.stderr

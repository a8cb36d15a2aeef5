"""The VAE's data sources (vdit/data/vae_data.py): synthetic, pan, mixed and prepared records."""

import dataclasses
import logging
import os

import numpy as np
import pytest
from tiny import ROOT, load_config_module

pytest.importorskip("skimage")

from vdit.data import pan, records, vae_data  # noqa: E402

# configs/vae.py's data section, smaller
BASE = dataclasses.replace(
    vae_data.VAEDataConfig.from_section(
        load_config_module(os.path.join(ROOT, "configs", "vae.py")).get_config().data.to_dict()
    ),
    frame_choices=(5, 9),
    image_fraction=0.3,
    size_choices=((16, 16), (16, 32), (24, 40)),
    batch_size=3,
    max_pixels=3 * 9 * 24 * 40,
    eval_samples=2,
)


def _records(path: str) -> records.RecordsConfig:
    return records.RecordsConfig(path=path)


def write_shards(directory, videos, corrupt=()):
    """One shard holding `videos` (uint8 (T, H, W, 3)) in order, with garbage bytes at the indices
    in `corrupt` instead."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(directory, exist_ok=True)
    w = ArrayRecordWriter(os.path.join(directory, records.shard_name(0)), records.WRITER_OPTIONS)
    for i, v in enumerate(videos):
        w.write(b"not a record" if i in corrupt else records.encode_record(v, "", 0.0, f"{i}.mp4"))
    w.close()
    return str(directory)


def flat_video(value, frames=9, height=32, width=48):
    return np.full((frames, height, width, 3), value, np.uint8)


def check_stream(cfg, steps=12):
    shapes = set()
    for k in range(steps):
        b, skipped = vae_data.sample_batch(cfg, k)
        again, skipped_again = vae_data.sample_batch(cfg, k)
        np.testing.assert_array_equal(b, again)
        assert skipped == skipped_again
        assert b.dtype == np.float32 and b.ndim == 5 and b.shape[-1] == 3
        assert -1.0 <= b.min() and b.max() <= 1.0
        assert b.shape[1] in (1, *cfg.frame_choices) and b.shape[2:4] in cfg.size_choices
        assert b.size // 3 <= cfg.max_pixels
        shapes.add(b.shape)
    assert len(shapes) > 1
    assert not np.array_equal(vae_data.batch_at(cfg, 0, seed=1), vae_data.batch_at(cfg, 0, seed=2))


@pytest.mark.parametrize("source", ["synthetic", "pan", "mixed"])
def test_procedural_and_pan_batches_are_a_function_of_the_step(source):
    check_stream(dataclasses.replace(BASE, source=source))


def test_mixed_mixes_and_synthetic_is_unchanged_by_the_new_sources():
    cfg = dataclasses.replace(BASE, source="mixed", pan_fraction=0.5)
    spy = []
    real = vae_data.pan.pan_video
    vae_data.pan.pan_video = lambda *a, **k: spy.append(1) or real(*a, **k)
    try:
        n = sum(vae_data.batch_at(cfg, k).shape[0] for k in range(8))
    finally:
        vae_data.pan.pan_video = real
    assert 0 < len(spy) < n
    # the same shapes as the procedural stream of the same seed: the step's shape is drawn first
    for k in range(8):
        assert (
            vae_data.batch_at(cfg, k).shape[1:]
            == vae_data.batch_at(dataclasses.replace(cfg, source="synthetic"), k).shape[1:]
        )


def test_heldout_photos_are_never_trained_on(monkeypatch):
    held = {id(p) for p in pan.photos(pan.HELDOUT).values()}
    seen = []
    real = pan.pan_video
    monkeypatch.setattr(
        pan, "pan_video", lambda photo, *a, **k: seen.append(id(photo)) or real(photo, *a, **k)
    )
    for k in range(20):
        vae_data.batch_at(dataclasses.replace(BASE, source="pan"), k)
    assert len(set(seen)) > 3 and not set(seen) & held
    seen.clear()
    sets = vae_data.heldout_sets(dataclasses.replace(BASE, source="pan"), 3, seed=7)
    assert set(sets) == {"synthetic", "pan"} and len(sets["pan"]) == 3
    assert set(seen) == held  # the held-out set is exactly the held-out photos
    for v in sets["pan"]:
        assert v.shape[0] == 1 and v.dtype == np.float32 and -1 <= v.min() and v.max() <= 1


def test_records_batches_skip_and_count_bad_records(tmp_path, caplog):
    """Records 0..7: good ones are flat videos of value 10 * index + 5; 2 is corrupt, 3 has too few
    frames for a video step, 4 is too small for any size; 6 and 7 are held out."""
    videos = [flat_video(10 * i + 5) for i in range(8)]
    videos[3] = flat_video(35, frames=2)
    videos[4] = flat_video(45, height=8, width=8)
    path = write_shards(tmp_path / "shards", videos, corrupt={2})
    cfg = dataclasses.replace(BASE, source="records", records=_records(path))
    with caplog.at_level(logging.WARNING, logger="vdit.data.vae_data"):
        check_stream(cfg, steps=10)
        total = sum(vae_data.sample_batch(cfg, k)[1] for k in range(10))
    assert total > 0
    assert "record 2" in caplog.text and "record 4" in caplog.text
    assert caplog.text.count("record 2:") == 1  # one warning per bad record
    trained = set()
    for k in range(30):
        b = vae_data.batch_at(cfg, k)
        values = np.round((b + 1) * 127.5).astype(int)
        for sample in values:
            assert np.unique(sample).size == 1  # a flat video stays flat
            trained.add(int(sample.flat[0]))
    assert trained <= {5, 15, 35, 55}  # never 25 (corrupt), 45 (too small) or 65, 75 (held out)
    assert {5, 15, 55} <= trained
    sets = vae_data.heldout_sets(cfg, 2, seed=3)
    assert sorted(int(np.round((v.flat[0] + 1) * 127.5)) for v in sets["records"]) == [65, 75]


def test_records_clip_is_a_window_of_the_video(tmp_path):
    """A record of frames 0..8 whose pixel values encode the frame: the clip is consecutive frames."""
    video = np.broadcast_to(
        np.arange(9, dtype=np.uint8)[:, None, None, None] * 20, (9, 24, 40, 3)
    ).copy()
    clip, why = vae_data.record_clip({"video": video}, 5, 16, 32, np.random.default_rng(0))
    assert why == "" and clip.shape == (5, 16, 32, 3)
    first = int(clip[0, 0, 0, 0]) // 20
    np.testing.assert_array_equal(clip[:, 0, 0, 0], (np.arange(5) + first) * 20)
    assert vae_data.record_clip({"video": video}, 5, 32, 32, np.random.default_rng(0))[0] is None


def test_records_errors_name_the_path(tmp_path):
    path = write_shards(tmp_path / "bad", [flat_video(1)] * 4, corrupt={0, 1})
    cfg = dataclasses.replace(BASE, source="records", records=_records(path))
    with pytest.raises(ValueError, match="data.records.path"):
        vae_data.batch_at(cfg, 0)
    few = write_shards(tmp_path / "few", [flat_video(1)] * 2)
    with pytest.raises(ValueError, match="data.records.path.*eval_samples"):
        vae_data.batch_at(dataclasses.replace(cfg, records=_records(few)), 0)
    with pytest.raises(ValueError, match="data.records.path=.*: no shards"):
        vae_data.batch_at(dataclasses.replace(cfg, records=_records(str(tmp_path / "none"))), 0)

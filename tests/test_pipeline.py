"""The grain pipeline: packed rows hold exactly the samples, deterministically, per host, within caps."""

import numpy as np
import pytest
from tiny import tiny_config

from vdit import configlib
from vdit.data import packing, pipeline, tasks
from vdit.data.synthetic import SyntheticVideos
from vdit.models.text import detokenize


def _cfg(**data):
    c = tiny_config()
    for k, v in data.items():
        setattr(c.data, k, v)
    return configlib.pipeline_config(configlib.load(c))


def test_rows_follow_the_contract():
    cfg = _cfg()
    b = next(iter(pipeline.build(cfg)))
    B, L = b["segment_ids"].shape
    assert (B, L) == (cfg.rows_per_batch, cfg.packing.row_len)
    assert b["patches"].shape == (B, L, 4 * 4 * 3) and b["positions"].shape == (B, L, 3)
    assert b["grid"].shape == (B, cfg.packing.max_samples, 3)
    for r in range(B):
        seg = b["segment_ids"][r]
        n = seg.max()
        assert n >= 1
        # Segments are contiguous, numbered 1..n in order, padding only at the end.
        change = np.flatnonzero(np.diff(seg)) + 1
        assert list(seg[np.r_[0, change]]) == list(range(1, n + 1)) + ([0] if (seg == 0).any() else [])
        # Every sample's token count matches its grid, its text is present, unused grid slots are 0.
        for s in range(1, n + 1):
            t, h, w = b["grid"][r, s - 1]
            assert (seg == s).sum() == t * (h // 4) * (w // 4)
            assert (b["text_segment_ids"][r] == s).sum() >= 1
        assert (b["grid"][r, n:] == 0).all()
        np.testing.assert_array_equal(b["loss_mask"][r], (seg > 0) & ~b["cond_mask"][r])
        assert (b["patches"][r][seg == 0] == 0).all()


def test_unpacked_samples_equal_the_source():
    """Unpacking a row gives back each source video (as [-1, 1] pixels) and its caption."""
    cfg = _cfg(caption_dropout=0.0)
    cfg = pipeline.PipelineConfig(
        **{**cfg.__dict__, "synthetic": type(cfg.synthetic)(**{**cfg.synthetic.__dict__, "num_samples": 64})}
    )
    src = SyntheticVideos(cfg.synthetic)
    by_caption = {}
    for i in range(64):
        e = src[i]
        by_caption.setdefault(e["caption"], []).append(e["video"].astype(np.float32) / 127.5 - 1)
    b = next(iter(pipeline.build(cfg)))
    found = 0
    for r in range(b["segment_ids"].shape[0]):
        for s in packing.unpack_row(b, r, (1, 4, 4)):
            caption = detokenize(s["text"])
            candidates = by_caption.get(caption, [])
            if any(v.shape == s["latent"].shape and np.allclose(v, s["latent"]) for v in candidates):
                found += 1
    n = int((b["grid"][..., 0] > 0).sum())
    assert n >= 8 and found == n


def test_deterministic_and_hosts_disjoint():
    cfg = _cfg()
    first = [next(iter(pipeline.build(cfg)))["patches"] for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    a = next(iter(pipeline.build(cfg, process_index=0, process_count=2)))
    b = next(iter(pipeline.build(cfg, process_index=1, process_count=2)))
    assert a["patches"].shape[0] == cfg.rows_per_batch // 2
    assert not np.array_equal(a["patches"], b["patches"])
    with pytest.raises(ValueError, match="batch_rows"):
        pipeline.build(cfg, process_index=0, process_count=3)


def test_fill_is_high():
    it = iter(pipeline.build(_cfg(packing_bins=16)))
    fills = [(next(it)["segment_ids"] > 0).mean() for _ in range(5)]
    assert np.mean(fills) > 0.9


@pytest.mark.parametrize("shape", [(9, 40, 24), (1, 300, 100), (33, 64, 64), (2, 17, 9)])
def test_size_policy_resizes_never_crops_and_respects_the_cap(shape):
    policy = pipeline.SizePolicy(patch=(1, 4, 4), max_tokens=128)
    frames, stride, h, w = policy.plan(*shape)
    t, H, W = shape
    assert h % 4 == 0 and w % 4 == 0 and h <= H and w <= W
    assert frames * (h // 4) * (w // 4) <= 128
    # Aspect ratio kept to within one patch of rounding.
    assert abs(h / w - H / W) <= 4 / min(h, w) + 4 / min(H, W) or (h == 4 or w == 4)
    # All frames are kept unless the cap needs temporal subsampling.
    assert frames == len(range(0, t, stride))


def test_size_policy_rejects_too_small():
    with pytest.raises(ValueError, match="smaller than one patch"):
        pipeline.SizePolicy(patch=(1, 4, 4)).plan(3, 2, 30)


def test_task_masks():
    rng = np.random.default_rng(0)
    assert not tasks.frame_mask("t2v", 5).any()
    assert tasks.frame_mask("i2v", 5).tolist() == [True, False, False, False, False]
    assert tasks.frame_mask("loop", 4).tolist() == [True, False, False, True]
    for _ in range(20):
        m = tasks.frame_mask("extend_forward", 6, rng)
        assert m[0] and not m[-1] and (np.diff(m.astype(int)) <= 0).all()
        m = tasks.frame_mask("interpolate", 6, rng)
        assert m[0] and m[-1] and not m.all()
    assert tasks.draw_task({"i2v": 1.0}, 1, rng) == "t2v"  # images are always t2v
    with pytest.raises(ValueError, match="unknown task"):
        tasks.frame_mask("teleport", 4)


def test_conditioning_tasks_reach_the_batch():
    cfg = _cfg()
    cfg = pipeline.PipelineConfig(**{**cfg.__dict__, "task_weights": (("i2v", 1.0),)})
    b = next(iter(pipeline.build(cfg)))
    n_video = 0
    for r in range(b["segment_ids"].shape[0]):
        for s in range(1, b["segment_ids"][r].max() + 1):
            sel = b["segment_ids"][r] == s
            t, h, w = b["grid"][r, s - 1]
            cond = b["cond_mask"][r][sel]
            per_frame = (h // 4) * (w // 4)
            if t == 1:  # an image is always text-to-video
                assert not cond.any()
                continue
            assert cond[:per_frame].all() and not cond[per_frame:].any()
            assert not b["loss_mask"][r][sel][:per_frame].any()
            n_video += 1
    assert n_video >= 2

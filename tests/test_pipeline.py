"""The grain pipeline: packed rows hold exactly the samples, deterministically, per host, within caps."""

import dataclasses
import functools

import grain
import numpy as np
import pytest
from tiny import tiny_config

from vdit import configlib
from vdit.data import config, packing, pipeline, size, tasks, tokenizer
from vdit.data.synthetic import SyntheticVideos
from vdit.data.tokenizer import detokenize
from vdit.models.text import TextEncoderConfig


def _cfg(image_fraction=0.3, **data):
    c = tiny_config()
    c.data.synthetic.image_fraction = image_fraction
    for k, v in data.items():
        setattr(c.data, k, v)
    return configlib.pipeline_config(configlib.load(c))


@functools.cache
def _default_size() -> size.SizePolicy:
    return _cfg().size


def _policy(patch, max_tokens, compression=(1, 1, 1), **fields) -> size.SizePolicy:
    """The tiny config's size policy with this patch, compression and cap."""
    return dataclasses.replace(
        _default_size(),
        patch=patch,
        compression=compression,
        max_tokens_per_sample=max_tokens,
        **fields,
    )


def test_rows_follow_the_contract():
    cfg = _cfg()
    b = next(iter(pipeline.build(cfg)))
    B, L = b["segment_ids"].shape
    assert (B, L) == (cfg.batch_rows, cfg.row_len)
    assert b["patches"].shape == (B, L, 4 * 4 * 3) and b["positions"].shape == (B, L, 3)
    assert b["grid"].shape == (B, cfg.max_samples_per_row, 3)
    for r in range(B):
        seg = b["segment_ids"][r]
        n = seg.max()
        assert n >= 1
        # Segments are contiguous, numbered 1..n in order, padding only at the end.
        change = np.flatnonzero(np.diff(seg)) + 1
        assert list(seg[np.r_[0, change]]) == list(range(1, n + 1)) + (
            [0] if (seg == 0).any() else []
        )
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
    cfg = dataclasses.replace(cfg, synthetic=dataclasses.replace(cfg.synthetic, num_samples=64))
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
            if any(
                v.shape == s["latent"].shape and np.allclose(v, s["latent"]) for v in candidates
            ):
                found += 1
    n = int((b["grid"][..., 0] > 0).sum())
    assert n >= 8 and found == n


def test_deterministic_and_hosts_disjoint():
    cfg = _cfg()
    first = [next(iter(pipeline.build(cfg)))["patches"] for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    a = next(iter(pipeline.build(cfg, process_index=0, process_count=2)))
    b = next(iter(pipeline.build(cfg, process_index=1, process_count=2)))
    assert a["patches"].shape[0] == cfg.batch_rows // 2
    assert not np.array_equal(a["patches"], b["patches"])
    with pytest.raises(ValueError, match="batch_rows"):
        pipeline.build(cfg, process_index=0, process_count=3)


def test_fill_is_high():
    it = iter(pipeline.build(_cfg(packing_bins=16)))
    fills = [(next(it)["segment_ids"] > 0).mean() for _ in range(5)]
    assert np.mean(fills) > 0.9


@pytest.mark.parametrize(
    "shape", [(9, 40, 24), (1, 300, 100), (33, 64, 64), (2, 17, 9), (5, 16, 16)]
)
def test_size_policy_resizes_never_crops_and_respects_the_cap(shape):
    policy = _policy((1, 4, 4), 128, min_side=0)  # no floor: space first, then time
    plan = policy.plan(*shape)
    t, H, W = shape
    h, w = plan.height, plan.width
    assert h % 4 == 0 and w % 4 == 0 and h <= H and w <= W
    assert plan.frames * (h // 4) * (w // 4) <= 128
    # Aspect ratio kept to within one patch of rounding on each side: h = floor(H * s / 4) * 4 and
    # w likewise, for one scale s (s = 1 when only snapped).
    s = max(h / H, w / W)
    assert H * s - 4 < h <= H * s + 1e-9 and W * s - 4 < w <= W * s + 1e-9, (h, w)
    # All frames are kept unless the cap needs temporal subsampling.
    assert plan.frames == len(range(0, t, plan.stride))
    # Every change is named.
    assert ("downscaled" in plan.events) == (h * w < (H // 4) * (W // 4) * 16)
    assert ("snapped" in plan.events) == ((h, w) != (H, W) and "downscaled" not in plan.events)
    assert ("time_subsampled" in plan.events) == (plan.stride > 1)
    assert not {"frames_trimmed", "frames_resampled"} & set(plan.events)


def test_size_policy_on_random_sizes():
    """Over many random sizes, patches and compressions: within the cap, never larger than the
    source (so never cropped and never upscaled), aspect kept to a patch, or a named rejection."""
    rng = np.random.default_rng(0)
    accepted = 0
    for _ in range(500):
        patch = (int(rng.integers(1, 3)), int(rng.choice([1, 2, 4])), int(rng.choice([1, 2, 4])))
        comp = (int(rng.choice([1, 4])), int(rng.choice([1, 8])), int(rng.choice([1, 8])))
        cap = int(rng.integers(1, 5000))
        policy = _policy(patch, cap, comp)
        t, h, w = int(rng.integers(0, 130)), int(rng.integers(1, 1100)), int(rng.integers(1, 2000))
        try:
            plan = policy.plan(t, h, w)
        except size.Rejected as e:
            assert e.reason in size.REJECTS
            continue
        accepted += 1
        uh, uw = patch[1] * comp[1], patch[2] * comp[2]
        _, nt = policy.temporal_patches(plan.frames)  # an image is one temporal patch
        tokens = nt * (plan.height // uh) * (plan.width // uw)
        assert 1 <= tokens <= cap
        assert plan.height % uh == 0 and plan.width % uw == 0
        assert plan.height <= h and plan.width <= w
        idx = plan.frame_indices(t)
        assert len(idx) == plan.frames and idx[0] == 0 and (np.diff(idx) > 0).all() and idx[-1] < t
        if plan.height > uh and plan.width > uw:  # aspect ratio kept to within a patch
            assert (
                abs(plan.height / plan.width - h / w)
                <= (uh / plan.height + uw / plan.width) * h / w * 1.01
            )
    assert accepted > 250


def test_size_policy_fits_frames_to_whole_latent_patches():
    policy = _policy((2, 4, 4), 4096, (4, 1, 1))
    plan = policy.plan(12, 16, 16)
    # 12 frames -> 1 + 11 // 4 = 3 latent frames -> 2 (one temporal patch of 2) -> 1 + 1 * 4 pixels,
    # picked over the whole clip (first and last frame kept)...
    assert plan.frames == 5 and plan.events == ("frames_resampled",)
    assert plan.frame_indices(12).tolist() == [0, 3, 6, 8, 11]
    # ...or the first five.
    trim = dataclasses.replace(policy, time_fit="trim").plan(12, 16, 16)
    assert trim.events == ("frames_trimmed",) and trim.frame_indices(12).tolist() == [0, 1, 2, 3, 4]
    strided = _policy((1, 4, 4), 2).plan(7, 16, 16)
    assert strided.stride == 4 and strided.frame_indices(7).tolist() == [0, 4]


@pytest.mark.parametrize(
    "shape, reason",
    [
        ((3, 2, 30), "too_small"),
        ((0, 16, 16), "empty"),
        ((2, 16, 16), "too_short"),  # 2 frames, no temporal patch of 3 (1 frame: an image)
        ((4, 16, 40_000), "over_cap"),
    ],
)
def test_size_policy_rejects_with_a_reason(shape, reason):
    with pytest.raises(size.Rejected, match=reason) as e:
        _policy((3, 4, 4), 128).plan(*shape)
    assert e.value.reason == reason


def _stats(element) -> dict[str, int]:
    return dict(zip(size.STATS, element["stats"].reshape(-1, len(size.STATS)).sum(0), strict=True))


def test_rejected_samples_are_counted_and_nothing_else_is_lost(caplog):
    cfg = _cfg(frame_stride=1)
    good = [
        {"video": np.full((4, 16, 16, 3), 10 * i, np.uint8), "caption": f"good {i}", "index": i}
        for i in range(3)
    ]
    bad = [
        {"video": np.zeros((0, 16, 16, 3), np.uint8), "caption": "", "index": 10},  # empty
        {"video": np.zeros((4, 16, 16), np.uint8), "caption": "", "index": 11},  # bad shape
        {"video": np.zeros((4, 2, 16, 3), np.uint8), "caption": "", "index": 12},  # too small
        {"video": np.full((4, 16, 16, 3), np.nan, np.float32), "caption": "", "index": 13},
    ]
    source = [bad[0], good[0], bad[1], bad[2], good[1], bad[3], good[2]]
    with caplog.at_level("WARNING"):
        out = list(pipeline.prepare_samples(grain.MapDataset.source(source), cfg))
    assert len(out) == 3
    expected = np.array([0, 10, 20], np.float32) / 127.5 - 1
    np.testing.assert_array_equal([e["patches"][0, 0] for e in out], expected)
    counts = [_stats(e) for e in out]
    assert (
        counts[0]["rejected_empty"] == 1
        and sum(v for k, v in counts[0].items() if "rejected" in k) == 1
    )
    assert counts[1]["rejected_bad_shape"] == 1 and counts[1]["rejected_too_small"] == 1
    assert counts[2]["rejected_non_finite"] == 1
    total = {k: sum(c[k] for c in counts) for k in size.STATS}
    assert sum(v for k, v in total.items() if k.startswith("rejected")) == len(bad)
    assert all(f"sample {b['index']} rejected" in caplog.text for b in bad)


def test_size_events_are_counted_in_the_batch():
    # Videos only, of 4 frames; a 16x16 one has 64 tokens.
    cfg = _cfg(image_fraction=0.0, max_tokens_per_sample=16, frame_stride=2)
    b = next(iter(pipeline.build(cfg)))
    n = int((b["grid"][..., 0] > 0).sum())
    stats = _stats(b)
    assert stats["fps_subsampled"] == n  # every sample has 4 frames
    assert stats["downscaled"] + stats["time_subsampled"] >= 1
    assert (b["grid"][..., 0] <= 2).all()  # every 2nd frame of 4


def test_max_fps_subsamples_by_the_source_frame_rate():
    cfg = _cfg(image_fraction=0.0, max_fps=4.0)  # the synthetic source reports 8 fps
    b = next(iter(pipeline.build(cfg)))
    assert _stats(b)["fps_subsampled"] == int((b["grid"][..., 0] > 0).sum())


def _drop_cfg(kind, rate, **kw):
    c = tiny_config()
    c.data.caption_dropout = 0.0
    c.data.token_drop.kind = kind
    c.data.token_drop.rate = rate
    for k, v in kw.items():
        setattr(c.data.token_drop, k, v)
    return configlib.pipeline_config(configlib.load(c))


def test_token_dropping_keeps_positions_and_conditioning():
    """Dropped tokens leave the sample; the kept ones are the undropped sample's tokens at their
    own positions; conditioning tokens stay; stats count the dropped ones."""
    full_cfg = _drop_cfg("none", 0.0)
    drop_cfg = _drop_cfg("constant", 0.5)
    weights = (("t2v", 1.0), ("i2v", 1.0))
    full_cfg = dataclasses.replace(full_cfg, tasks=weights)
    drop_cfg = dataclasses.replace(drop_cfg, tasks=weights)
    source = grain.MapDataset.source(SyntheticVideos(full_cfg.synthetic))[:24]
    full = list(pipeline.prepare_samples(source, full_cfg))
    dropped = list(pipeline.prepare_samples(source, drop_cfg))
    assert len(full) == len(dropped) == 24
    n_cond = 0
    for f, d in zip(full, dropped, strict=True):
        grid = f["grid"][0]
        p = d["positions"]
        idx = (p[:, 0] * (grid[1] // 4) + p[:, 1]) * (grid[2] // 4) + p[:, 2]  # raster index
        assert (np.diff(idx) > 0).all()  # a sorted subset of the sample's own positions
        np.testing.assert_array_equal(d["patches"], f["patches"][idx])
        np.testing.assert_array_equal(d["grid"], f["grid"])  # the full grid (for the time shift)
        assert f["cond_mask"][idx].tolist() == d["cond_mask"].tolist()
        assert d["cond_mask"].sum() == f["cond_mask"].sum()  # conditioning tokens are never dropped
        n_cond += int(f["cond_mask"].any())
        gen = int((~f["cond_mask"]).sum())
        n_drop = len(f["patches"]) - len(d["patches"])
        assert _stats(d)["tokens_dropped"] == n_drop and abs(n_drop - 0.5 * gen) <= 1
        assert (~d["cond_mask"]).sum() >= 1
    assert n_cond >= 3


def test_token_drop_rates():
    rng = np.random.default_rng(0)
    by_size = _drop_cfg("size", 0.8, ref_tokens=64).token_drop
    assert by_size.draw_rate(64, rng) == 0.0 and by_size.draw_rate(16, rng) == 0.0
    assert by_size.draw_rate(256, rng) == pytest.approx(0.6)
    beta = _drop_cfg("beta", 0.5, beta_a=2.0, beta_b=2.0).token_drop
    rates = np.array([beta.draw_rate(100, rng) for _ in range(2000)])
    assert rates.max() <= 0.5 and 0.3 < rates.mean() < 0.5 and (rates < 0.5).mean() > 0.4
    keep = _drop_cfg("constant", 0.99).token_drop.keep(np.zeros(10, bool), rng)
    assert len(keep) == 1  # at least one generated token stays
    with pytest.raises(ValueError, match="token_drop.kind"):
        config.validate(_drop_cfg("sometimes", 0.1))
    with pytest.raises(ValueError, match="token_drop.rate"):
        config.validate(_drop_cfg("constant", 1.0))


def test_token_dropping_in_packed_rows():
    cfg = _drop_cfg("constant", 0.5)
    # halved samples: more of them fit a row; t2v only, so every token may be dropped (the
    # default's task mix keeps conditioning tokens, which lowers the row's rate below 0.5)
    cfg = dataclasses.replace(cfg, max_samples_per_row=32, text_len=512, tasks=(("t2v", 1.0),))
    b = next(iter(pipeline.build(cfg)))
    stats = _stats(b)
    kept = int((b["segment_ids"] > 0).sum())
    assert 0.4 < stats["tokens_dropped"] / (stats["tokens_dropped"] + kept) < 0.6
    assert (b["segment_ids"] > 0).mean() > 0.9  # rows are still packed full


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
    cfg = dataclasses.replace(cfg, tasks=(("i2v", 1.0),))
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


def test_tokenizer_round_trip_and_empty_caption():
    ids = tokenizer.tokenize("a red square moves left", 64)
    assert ids[0] == tokenizer.BOS and detokenize(ids) == "a red square moves left"
    assert tokenizer.tokenize("", 64).tolist() == [tokenizer.BOS]
    assert len(tokenizer.tokenize("x" * 100, 16)) == 16
    # the text encoder's embedding table has a row per id
    assert TextEncoderConfig().vocab_size == tokenizer.VOCAB_SIZE
    c = configlib.model_config(configlib.load(tiny_config()))
    assert c.text.vocab_size == tokenizer.VOCAB_SIZE


def test_the_data_settings_are_the_data_section():
    """PipelineConfig is built from the data section by name: every field of the section is the
    config's value; a key that names no field is refused by its name."""
    c = configlib.load(tiny_config())
    cfg = configlib.pipeline_config(c)
    for key, value in c.data.to_dict().items():
        if not isinstance(value, dict):
            assert getattr(cfg, key) == value, key
    assert cfg.token_drop == dataclasses.replace(cfg.token_drop, **c.data.token_drop.to_dict())
    assert dict(cfg.tasks) == c.data.tasks.to_dict()
    assert (cfg.size.max_tokens_per_sample, cfg.packing.packing_bins) == (
        c.data.max_tokens_per_sample,
        c.data.packing_bins,
    )
    for section, key in ((None, "batch_size"), ("token_drop", "ratio")):
        c = tiny_config()
        target = c.data if section is None else c.data[section]
        with target.unlocked():
            target[key] = 1
        name = f"data.{key}" if section is None else f"data.{section}.{key}"
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            configlib.load(c)


def _draws(out) -> list[tuple]:
    """What a sample's random draws decided: its text (caption dropout), its conditioning mask
    (task) and the positions it kept (token drop)."""
    return [(tuple(e["text"]), tuple(e["cond_mask"]), e["positions"].tobytes()) for e in out]


def test_hosts_draw_their_own_random_streams():
    """Two emulated processes of one run: host 1's i-th sample does not repeat host 0's caption
    dropout, task and token drop (every element the same, so only the draws can differ), and the
    two hosts' samples interleaved are exactly what one process draws (seeded by the global
    index: one process's numerics are those of before)."""
    cfg = dataclasses.replace(
        _drop_cfg("constant", 0.5),
        caption_dropout=0.5,
        tasks=(("t2v", 1.0), ("i2v", 1.0), ("extend_forward", 1.0), ("extend_backward", 1.0)),
    )
    video = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), np.uint8)
    same = [{"video": video, "caption": "a red square moves up", "index": i} for i in range(32)]
    source = grain.MapDataset.source(same)
    one = list(pipeline.prepare_samples(source, cfg))
    hosts = [list(pipeline.prepare_samples(source, cfg, None, k, 2)) for k in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == 16
    differ = sum(a != b for a, b in zip(_draws(hosts[0]), _draws(hosts[1]), strict=True))
    assert differ >= 12, differ  # (a pair of samples can draw the same by chance)
    assert _draws(hosts[0]) == _draws(one[0::2]) and _draws(hosts[1]) == _draws(one[1::2])


def test_every_task_leaves_frames_to_generate():
    """Each task, on every sample long enough for it, gives some latent frames clean and leaves
    some to generate; loop and interpolate on two frames are refused (both frames given / i2v),
    and in the pipeline such a draw trains as t2v, counted as task_fallback."""
    rng = np.random.default_rng(0)
    for task in tasks.TASKS:
        for frames in range(tasks.MIN_FRAMES[task], 9):
            for _ in range(20):
                m = tasks.frame_mask(task, frames, rng)
                assert not m.all() and (m.any() or task == "t2v"), (task, frames, m)
    assert tasks.frame_mask("loop", 3).tolist() == [True, False, True]
    for task in ("loop", "interpolate"):
        with pytest.raises(ValueError, match="needs at least 3 latent frames"):
            tasks.frame_mask(task, 2)
        assert tasks.fit_task(task, 2) == "t2v" and tasks.fit_task(task, 3) == task
    cfg = dataclasses.replace(_cfg(), tasks=(("loop", 1.0), ("interpolate", 1.0)))
    clips = [
        {"video": np.full((f, 16, 16, 3), 9 * i, np.uint8), "caption": "c", "index": i}
        for i, f in enumerate([2, 3, 2, 5, 2, 4])
    ]
    out = list(pipeline.prepare_samples(grain.MapDataset.source(clips), cfg))
    for e, clip in zip(out, clips, strict=True):
        two = len(clip["video"]) == 2
        assert (~e["cond_mask"]).any()  # some loss tokens
        assert e["cond_mask"].any() != two  # the longer clips keep their conditioning task
        assert _stats(e)["task_fallback"] == two


def test_captions_cut_to_the_text_length_are_counted():
    cfg = dataclasses.replace(_cfg(), caption_dropout=0.0)  # model.text.max_len = 32
    video = np.zeros((4, 16, 16, 3), np.uint8)
    long = "a red square moves right across a long caption, past 31 bytes"
    source = [{"video": video, "caption": c, "index": i} for i, c in enumerate(["short", long])]
    short_e, long_e = pipeline.prepare_samples(grain.MapDataset.source(source), cfg)
    assert len(long_e["text"]) == 32 and detokenize(long_e["text"]) == long[:31]
    assert _stats(long_e)["caption_cut"] == 1 and _stats(short_e)["caption_cut"] == 0


def test_images_train_under_a_temporal_patch_above_one():
    """With model.patch_t = 2 an image is repeated to one temporal patch (counted), not rejected;
    its two latent frames are the image; a video of 3 frames keeps 2."""
    c = tiny_config()
    c.model.patch_t = 2
    c.data.synthetic.image_fraction = 0.5
    cfg = configlib.pipeline_config(configlib.load(c))
    assert cfg.patch == (2, 4, 4)
    b = next(iter(pipeline.build(cfg)))
    stats = _stats(b)
    assert stats["rejected_too_short"] == 0
    images = 0
    for r in range(b["segment_ids"].shape[0]):
        for s, g in zip(packing.unpack_row(b, r, (2, 4, 4)), b["grid"][r], strict=False):
            assert g[0] in (2, 4)  # an image (2: repeated) or a 4-frame video
            if g[0] == 2:
                images += 1
                np.testing.assert_array_equal(s["latent"][0], s["latent"][1])
    assert images >= 2 and stats["image_repeated"] == images
    three = {"video": np.zeros((3, 16, 16, 3), np.uint8), "caption": "c", "index": 0}
    (e,) = pipeline.prepare_samples(grain.MapDataset.source([three]), cfg)
    assert tuple(e["grid"][0]) == (2, 16, 16)


def test_a_latent_image_under_patch_t_2_and_a_latent_cut_to_patches():
    """A latent of one frame (an encoded image) is repeated to one temporal patch; a latent of
    another patch loses its remainder, counted as latent_cut (not as a resize)."""
    from tiny import ROOT, load_config_module

    c = load_config_module(f"{ROOT}/configs/latent.py").get_config("mu/2")
    c.model.patch_t, c.sample.grid_shape = 2, (5, 32, 32)
    c.data.latents.path = "(not read)"
    c.data.latents.sample_posterior = False
    c.data.caption_dropout = 0.0
    cfg = configlib.pipeline_config(configlib.load(c))
    prep = pipeline._PrepareLatent(cfg, np.zeros(16), np.ones(16))
    mean = np.random.default_rng(0).normal(size=(1, 5, 6, 16)).astype(np.float32)
    e = prep.random_map({"mean": mean, "caption": "x"}, np.random.default_rng(0))
    assert tuple(e["grid"][0]) == (2, 4, 6)
    latent = packing.unpatchify(e["patches"], (2, 4, 6), (2, 2, 2))
    np.testing.assert_array_equal(latent[0], mean[0, :4])
    np.testing.assert_array_equal(latent[1], mean[0, :4])
    counts = _stats(e)
    assert counts["latent_cut"] == 1 and counts["image_repeated"] == 1
    assert counts["snapped"] == counts["downscaled"] == 0


def test_size_floor_takes_fewer_frames_before_shrinking_space():
    """The default config's size policy: a 1000x256x256 clip keeps 64x64 (data.min_side) and its
    first 4 frames under the 1024-token cap, where shrinking space first gave 1000 frames of 4x4; a
    sample under the floor keeps its own size; a floor one frame cannot meet falls back to
    shrinking space."""
    from tiny import load_config_module

    policy = configlib.pipeline_config(configlib.load(load_config_module().get_config())).size
    assert (policy.min_side, policy.max_tokens_per_sample, policy.patch) == (64, 1024, (1, 4, 4))
    plan = policy.plan(1000, 256, 256)
    assert (plan.frames, plan.height, plan.width) == (4, 64, 64)
    assert plan.frame_indices(1000).tolist() == [0, 1, 2, 3]  # a shorter clip, same frame rate
    assert set(plan.events) == {"downscaled", "frames_cut"}
    space_first = dataclasses.replace(policy, min_side=0).plan(1000, 256, 256)
    assert (space_first.frames, space_first.height, space_first.width) == (1000, 4, 4)
    small = policy.plan(1000, 32, 48)  # under the floor: its own size, 10 frames of 8x12 patches
    assert (small.frames, small.height, small.width, small.events) == (10, 32, 48, ("frames_cut",))
    wide = policy.plan(100, 64, 640)  # 16x160 patches per frame at the floor: over the cap
    assert wide.frames == 100 and "frames_cut" not in wide.events and wide.height < 64
    fits = policy.plan(8, 32, 32)  # under the cap: untouched
    assert (fits.frames, fits.height, fits.width, fits.events) == (8, 32, 32, ())
    rng = np.random.default_rng(1)
    for _ in range(300):  # the floor holds wherever one temporal patch at it fits the cap
        t, h, w = int(rng.integers(2, 400)), int(rng.integers(4, 600)), int(rng.integers(4, 600))
        p = policy.plan(t, h, w)
        assert p.frames * (p.height // 4) * (p.width // 4) <= 1024
        floor = min(64, h, w)
        if (floor * h // min(h, w) // 4) * (floor * w // min(h, w) // 4) <= 1024:
            assert min(p.height, p.width) >= floor // 4 * 4, (t, h, w, p)


def test_settings_that_lose_a_class_of_samples_warn_at_config_load(caplog):
    c = tiny_config()
    with caplog.at_level("WARNING", logger="vdit.configlib"):
        configlib.load(c)
    assert caplog.text == ""  # the tiny config loses nothing
    c.model.patch_t, c.sample.grid_shape = 4, (4, 16, 16)
    c.data.synthetic.frame_choices = (3, 8)
    c.data.tasks.loop = 1.0
    c.data.min_side = 128  # 32x32 patches: over the 256-token cap
    with caplog.at_level("WARNING", logger="vdit.configlib"):
        configlib.load(c)
    lines = caplog.text.splitlines()
    assert any("model.patch_t=4: videos of 2 to 3 frames" in x for x in lines)
    assert any(
        "data.synthetic.frame_choices: videos of [3] frames are all rejected" in x for x in lines
    )
    assert any("data.tasks.loop: every video" in x for x in lines)
    assert any("data.min_side=128" in x for x in lines)

"""Procedural captioned videos and the colour/motion detector that scores generated videos."""

import dataclasses

import numpy as np
import pytest
from tiny import load_config_module

from vdit import configlib
from vdit.data.detector import Detection, detect, score
from vdit.data.synthetic import (
    BACKGROUND,
    COLORS,
    DIRECTIONS,
    SHAPES,
    SampleSpec,
    SyntheticConfig,
    SyntheticVideos,
    caption,
    parse_caption,
    render,
)

N = 200


def _cfg(**fields) -> SyntheticConfig:
    """configs/default.py's data.synthetic, with `fields` replaced."""
    c = configlib.load(load_config_module().get_config())
    default = configlib.pipeline_config(c).synthetic
    return dataclasses.replace(default, **fields)


MIXED = _cfg(
    num_samples=N,
    seed=3,
    frame_choices=(1, 2, 4, 8, 16),
    size_choices=((8, 8), (16, 16), (16, 32), (32, 16), (24, 32), (32, 24), (48, 48)),
)


@pytest.fixture(scope="module")
def items() -> list[dict]:
    ds = SyntheticVideos(MIXED)
    return [ds[i] for i in range(N)]


def _noisy(video: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, video.shape)
    return np.clip(video + noise, 0, 255).astype(np.uint8)


def _blur(video: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur over H and W; returns float (T, H, W, 3) in [0, 255]."""
    x = video.astype(np.float32)
    for axis in (1, 2):
        pad = [(1, 1) if a == axis else (0, 0) for a in range(4)]
        p = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = 0.25 * p.take(range(n), axis) + 0.5 * p.take(range(1, n + 1), axis)
        x = x + 0.25 * p.take(range(2, n + 2), axis)
    return x


def test_determinism_and_seeds():
    ds = SyntheticVideos(_cfg(num_samples=50, seed=0))
    later = ds[17]
    for i in (3, 40, 17):  # order must not matter
        ds[i]
    again = SyntheticVideos(_cfg(num_samples=50, seed=0))[17]
    assert later["caption"] == again["caption"] == ds[17]["caption"]
    assert later["video"].tobytes() == again["video"].tobytes() == ds[17]["video"].tobytes()
    assert ds.spec(17) == ds.spec(np.int64(17))

    other = SyntheticVideos(_cfg(num_samples=50, seed=1))
    same = [
        ds[i]["caption"] == other[i]["caption"]
        and np.array_equal(ds[i]["video"], other[i]["video"])
        for i in range(20)
    ]
    assert not all(same)
    assert sum(same) < 5


def test_index_out_of_range():
    ds = SyntheticVideos(_cfg(num_samples=10))
    assert len(ds) == 10
    for bad in (-1, 10, 10**9):
        with pytest.raises(IndexError):
            ds[bad]
        with pytest.raises(IndexError):
            ds.spec(bad)


def test_shapes_dtypes_and_mix(items):
    ds = SyntheticVideos(MIXED)
    aspects, durations = set(), set()
    for i, it in enumerate(items):
        spec = ds.spec(i)
        v = it["video"]
        assert v.dtype == np.uint8
        assert v.shape == (spec.frames, spec.height, spec.width, 3)
        assert it["index"] == i
        assert (it["color"], it["shape"], it["direction"]) == (
            spec.color,
            spec.shape,
            spec.direction,
        )
        assert it["caption"] == caption(spec)
        assert it["color"] in COLORS and it["shape"] in SHAPES
        if spec.frames == 1:
            assert it["direction"] == "still"
            assert parse_caption(it["caption"]) == (spec.color, "still")
        else:
            assert it["direction"] in DIRECTIONS
        # Exactly two colours: background and the shape, which is present in every frame.
        target = np.asarray(COLORS[spec.color], np.uint8)
        on = np.all(v == target, axis=-1)  # (T, H, W)
        assert on.any(axis=(1, 2)).all()
        assert np.unique(v[~on], axis=0).shape[0] == 1
        assert abs(int(v[~on][0, 0]) - BACKGROUND[0]) <= 6
        aspects.add(np.sign(spec.width - spec.height))
        durations.add(spec.frames)
    assert aspects == {-1, 0, 1}  # tall, square and wide
    assert 1 in durations and len(durations - {1}) >= 3
    n_images = sum(it["video"].shape[0] == 1 for it in items)
    assert 0.15 * N < n_images < 0.45 * N  # image_fraction = 0.3


def test_render_geometry():
    """Shape stays inside, has the requested size, and travels 30-50% of the frame."""
    rng = np.random.default_rng(0)
    for direction, axis, sign in (("left", 2, -1), ("right", 2, 1), ("up", 1, -1), ("down", 1, 1)):
        for h, w in ((8, 8), (16, 32), (64, 48)):
            spec = SampleSpec("green", "square", direction, 16, h, w)
            v = render(spec, rng)
            mask = np.all(v == COLORS["green"], axis=-1)  # (T, H, W)
            area = mask.sum(axis=(1, 2))
            assert (area == area[0]).all()  # fully inside on every frame
            side = int(np.sqrt(area[0]))
            assert side * side == area[0]
            assert 0.2 * min(h, w) <= side <= 0.45 * min(h, w)
            coords = np.arange(mask.shape[axis])
            centre = (mask.sum(axis=3 - axis) * coords).sum(axis=1) / area  # (T,)
            travel = sign * (centre[-1] - centre[0]) / mask.shape[axis]
            assert 0.2 <= travel <= 0.55
            assert np.all(sign * np.diff(centre) >= 0)  # monotone motion


def test_render_extremes_and_validation():
    rng = np.random.default_rng(0)
    assert render(SampleSpec("red", "circle", "up", 64, 256, 256), rng).shape == (64, 256, 256, 3)
    assert render(SampleSpec("red", "circle", "still", 1, 8, 8), rng).shape == (1, 8, 8, 3)
    with pytest.raises(ValueError):
        render(SampleSpec("red", "square", "still", 4, 16, 16), rng)
    with pytest.raises(ValueError):
        render(SampleSpec("red", "square", "left", 1, 16, 16), rng)
    with pytest.raises(ValueError):
        render(SampleSpec("purple", "square", "left", 4, 16, 16), rng)


def test_caption_round_trip():
    for color in COLORS:
        for shape in SHAPES:
            for direction in (*DIRECTIONS, "still"):
                spec = SampleSpec(color, shape, direction, 1 if direction == "still" else 8, 16, 16)
                text = caption(spec)
                assert color in text and shape in text
                assert parse_caption(text) == (color, direction)
    assert caption(SampleSpec("red", "square", "left", 4, 8, 8)) == "a red square moves left"
    assert caption(SampleSpec("blue", "circle", "still", 1, 8, 8)) == "a blue circle stands still"
    assert parse_caption("A Cyan thing, going UP!") == ("cyan", "up")
    assert parse_caption("nothing here") == (None, None)


def test_detector_clean(items):
    videos = [it["video"] for it in items]
    caps = [it["caption"] for it in items]
    s = score(videos, caps)
    assert s["n"] == N and 0.5 * N < s["n_video"] < N
    assert s["color_accuracy"] == 1.0
    assert s["motion_accuracy"] >= 0.98
    # Float input in [-1, 1] gives the same answers.
    floats = [v.astype(np.float32) / 127.5 - 1.0 for v in videos[:40]]
    assert [detect(f) for f in floats] == [detect(v) for v in videos[:40]]
    for it in items[:40]:
        if it["video"].shape[0] == 1:
            assert detect(it["video"]).direction == "still"


@pytest.mark.parametrize("blur", [False, True])
def test_detector_noise_and_blur(items, blur):
    videos = [it["video"] for it in items]
    if blur:
        videos = [_blur(v) for v in videos]
    videos = [_noisy(v, 20.0, seed=i) for i, v in enumerate(videos)]
    s = score(videos, [it["caption"] for it in items])
    assert s["color_accuracy"] >= 0.9
    assert s["motion_accuracy"] >= 0.9


def test_detector_background_off():
    """A shifted background is handled by the per-frame median estimate."""
    spec = SampleSpec("yellow", "circle", "down", 8, 32, 32)
    v = render(spec, np.random.default_rng(5)).astype(np.int16)
    bg = np.all(v == v[0, 0, 0], axis=-1)
    v[bg] = (90, 100, 80)
    det = detect(v.astype(np.uint8))
    assert (det.color, det.direction) == ("yellow", "down")


def test_detector_not_trivially_right():
    # No object: plain background, with and without noise.
    empty = np.full((8, 32, 32, 3), BACKGROUND, np.uint8)
    for video in (empty, _noisy(empty, 20.0, seed=0)):
        det = detect(video)
        assert isinstance(det, Detection) and det.color is None
        assert det.direction == "still"
    s = score([empty], ["a red square moves left"])
    assert s["color_accuracy"] == 0.0 and s["motion_accuracy"] == 0.0

    # Wrong captions score zero; a still shape in a clip is "still", not a direction.
    red_left = render(SampleSpec("red", "square", "left", 8, 32, 32), np.random.default_rng(1))
    assert (detect(red_left).color, detect(red_left).direction) == ("red", "left")
    wrong = score([red_left], ["a blue square moves right"])
    assert wrong["color_accuracy"] == 0.0 and wrong["motion_accuracy"] == 0.0
    frozen = np.repeat(red_left[:1], 8, axis=0)
    assert detect(frozen).direction == "still"
    assert score([frozen], ["a red square moves left"])["motion_accuracy"] == 0.0


def test_denoise_probe_drift_follows_the_caption_direction():
    """bench/denoise_probe.py's t = 1 table reads a clip's drift along a named direction: a rendered
    clip drifts by its travel (0.30-0.50 of the frame, less the clip's own rounding) along its own
    direction, the negative along the opposite, ~0 along a perpendicular, and a flat clip not at all."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "denoise_probe.py"
    spec = importlib.util.spec_from_file_location("vdit_bench_denoise_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    rng = np.random.default_rng(0)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    perpendicular = {"left": "up", "right": "down", "up": "left", "down": "right"}
    for direction in ("left", "right", "up", "down"):
        spec_ = SampleSpec("red", "square", direction, 8, 32, 32)
        clip = render(spec_, rng) / 127.5 - 1.0
        along = probe.drift(clip, direction)
        assert 0.25 <= along <= 0.55, (direction, along)
        assert probe.drift(clip, opposite[direction]) == pytest.approx(-along)
        assert abs(probe.drift(clip, perpendicular[direction])) < 0.02
    flat = np.full((8, 32, 32, 3), -0.5, np.float32)
    assert probe.drift(flat, "right") == 0.0

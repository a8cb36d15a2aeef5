"""Camera-pan videos of the scikit-image sample photos (vdit/data/pan.py)."""

import numpy as np
import pytest

pytest.importorskip("skimage")

from skimage.registration import phase_cross_correlation  # noqa: E402

from vdit.data import pan  # noqa: E402


def test_photos_load_as_rgb_and_the_split_is_by_photo():
    assert not set(pan.TRAIN) & set(pan.HELDOUT)
    assert set(pan.TRAIN) | set(pan.HELDOUT) == set(pan.COLOR) | set(pan.GREY)
    for name, p in pan.photos(pan.TRAIN + pan.HELDOUT).items():
        assert p.dtype == np.uint8 and p.ndim == 3 and p.shape[-1] == 3, name
    grey = pan.photos(["camera"])["camera"]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    with pytest.raises(ValueError, match="unknown photo"):
        pan.photos(["nope"])


@pytest.mark.parametrize("frames, height, width", [(1, 16, 16), (5, 16, 32), (17, 24, 40)])
def test_shapes_and_determinism(frames, height, width):
    photo = pan.photos(["astronaut"])["astronaut"]
    v = pan.pan_video(photo, frames, height, width, np.random.default_rng(3))
    assert v.shape == (frames, height, width, 3) and v.dtype == np.uint8
    np.testing.assert_array_equal(
        v, pan.pan_video(photo, frames, height, width, np.random.default_rng(3))
    )
    assert not np.array_equal(
        v, pan.pan_video(photo, frames, height, width, np.random.default_rng(4))
    )


def test_boxes_keep_the_aspect_and_stay_inside_the_photo():
    for name, photo in pan.photos(pan.TRAIN).items():
        ph, pw = photo.shape[:2]
        for seed in range(5):
            b = pan.pan_boxes((ph, pw), 9, 16, 40, np.random.default_rng(seed))
            w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
            np.testing.assert_allclose(w / h, 40 / 16, rtol=1e-6, err_msg=name)
            assert b[:, :2].min() >= 0 and b[:, 2].max() <= pw + 1e-6 and b[:, 3].max() <= ph + 1e-6


def test_an_output_sized_integer_box_is_a_plain_crop():
    photo = pan.photos(["coins"])["coins"]
    frame = pan.render(photo, np.array([[30.0, 40.0, 62.0, 56.0]]), 16, 32)[0]
    np.testing.assert_array_equal(frame, photo[40:56, 30:62])


def test_consecutive_frames_are_subpixel_shifted_copies():
    """Without zoom, frame k+1 is frame k moved by the box offset in output pixels, which phase
    correlation recovers to a fraction of a pixel (and the offsets are not whole pixels)."""
    photo = pan.photos(["astronaut"])["astronaut"]
    fractions = []
    for seed in range(3):
        b = pan.pan_boxes(
            photo.shape[:2], 4, 64, 64, np.random.default_rng(seed), zoom=0.0, max_speed=0.03
        )
        v = pan.render(photo, b, 64, 64).astype(np.float64).mean(-1)
        for k in range(3):
            scale = 64 / (b[k, 2] - b[k, 0])
            expected = np.array([b[k + 1, 1] - b[k, 1], b[k + 1, 0] - b[k, 0]]) * scale
            shift, _, _ = phase_cross_correlation(v[k], v[k + 1], upsample_factor=20)
            np.testing.assert_allclose(shift, expected, atol=0.25)
            assert np.abs(expected).max() > 0.25  # the content moves
            fractions.append(np.abs(expected - np.round(expected)).max())
    assert max(fractions) > 0.2


def test_missing_scikit_image_names_the_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name.startswith("skimage"):
            raise ImportError("no skimage")
        return real_import(name, *args, **kwargs)

    pan._load.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_skimage)
    with pytest.raises(ImportError, match="pip install scikit-image"):
        pan.photos(["camera"])
    monkeypatch.undo()
    pan._load.cache_clear()

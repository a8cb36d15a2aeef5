"""Videos are written and read in process (PyAV, Pillow): no ffmpeg subprocess is forked, so a
process that runs JAX writes an MP4 without JAX's os.fork() warning, and it reads back whole."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from vdit.data.video_io import read_video, write_video


def _video(t: int, h: int, w: int) -> np.ndarray:
    ti, y, x = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([(x * 5 + ti * 3) % 256, (y * 7) % 256, (x + y + ti * 10) % 256], -1).astype(
        np.uint8
    )


def test_mp4_from_a_jax_process_forks_nothing_and_reads_back(tmp_path):
    jnp.ones(8).sum().block_until_ready()  # JAX initialized: its threads are running
    video = _video(6, 32, 48)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = write_video(tmp_path / "v.mp4", video, fps=8)
        back = read_video(path)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [
        str(w.message) for w in caught
    ]
    assert back.shape == video.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - video).mean() < 4  # H.264 is lossy


@pytest.mark.parametrize("ext", ["mp4", "gif", "png"])
def test_every_format_keeps_the_shape(tmp_path, ext):
    frames = 1 if ext == "png" else 5
    video = _video(frames, 15, 17)  # odd sizes: an MP4 pads them to even with edge pixels
    back = read_video(write_video(tmp_path / f"v.{ext}", video, fps=7.5))  # a fractional rate
    if ext == "mp4":
        assert back.shape == (frames, 16, 18, 3)
        back = back[:, :15, :17]
    else:
        np.testing.assert_array_equal(back, video)  # palette/PNG: lossless at these few colours
    assert back.shape == video.shape


def test_float_videos_are_mapped_from_minus_one_one(tmp_path):
    video = np.full((1, 4, 4, 3), -1.0, np.float32)
    video[..., 0] = 1.0
    back = read_video(write_video(tmp_path / "f.png", video))
    assert back[0, 0, 0].tolist() == [255, 0, 0]


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="one frame"):
        write_video(tmp_path / "x.png", _video(2, 4, 4))
    with pytest.raises(ValueError, match="unsupported video extension"):
        write_video(tmp_path / "x.avi", _video(2, 4, 4))

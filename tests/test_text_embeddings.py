"""The precomputed-text file format (vdit/data/text_embeddings.py)."""

import numpy as np
import pytest

from vdit.data import text_embeddings as te


def test_save_load_roundtrip(tmp_path):
    emb = np.random.default_rng(0).normal(size=(7, 12)).astype(np.float32)
    path = str(tmp_path / "e.npy")
    te.save(path, emb)
    back = te.load(path, width=12)
    assert back.dtype == np.float16 and back.shape == (7, 12)
    np.testing.assert_array_equal(back, emb.astype(np.float16))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((0, 4)), "tokens >= 1"),
        (np.zeros((3,)), "tokens >= 1"),
        (np.zeros((2, 4), np.int32), "expected floats"),
        (np.full((2, 4), np.nan), "NaN"),
        (np.zeros((2, 5)), "width 5 but the model's text width is 4"),
    ],
)
def test_check_names_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        te.check(bad, width=4)


def test_load_missing_and_not_npy(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such text embedding file"):
        te.load(str(tmp_path / "missing.npy"))
    p = tmp_path / "junk.npy"
    p.write_bytes(b"not an array")
    with pytest.raises(ValueError, match="not a .npy array"):
        te.load(str(p))

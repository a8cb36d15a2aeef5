"""Elastic restarts of the train loop: stop on one mesh, resume on another with fewer or more devices.

8 devices as fsdp=8 -> stop after a checkpoint -> 4 devices as data=2 x fsdp=2 (and the reverse) ==
4 steps straight on fsdp=8: the same batches in the same order after the resume, and the same
parameters up to float reduction order (the meshes split the sums differently).
"""

import hashlib

import jax
import numpy as np
import pytest
from tiny import restore_state, tiny_config

from vdit.data import pipeline
from vdit.train import loop
from vdit.train.metrics import read_metrics

pytestmark = pytest.mark.slow

FSDP8 = {"data": 1, "fsdp": 8}
DATA2_FSDP2 = {"data": 2, "fsdp": 2}
BUILD = pipeline.build  # the unpatched pipeline


def _digest(batch: dict) -> str:
    h = hashlib.sha256()
    for k in pipeline.DEVICE_KEYS:
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()


def _train(monkeypatch, workdir: str, steps: int, mesh: dict, n_devices: int) -> list[str]:
    """train_and_evaluate on the first `n_devices` devices; returns digests of the batches it drew."""
    seen: list[str] = []

    def record(batch: dict) -> dict:
        seen.append(_digest(batch))
        return batch

    def recording_build(*args, **kwargs):
        # A grain map keeps the iterator checkpointable; it sees exactly the batches the loop draws.
        return BUILD(*args, **kwargs).map(record)

    monkeypatch.setattr(pipeline, "build", recording_build)
    c = tiny_config()
    c.sample.grid_prompts = ()
    c.train.log_every = 1
    c.train.steps = steps
    c.mesh.data, c.mesh.fsdp = mesh["data"], mesh["fsdp"]
    loop.train_and_evaluate(c, workdir, jax.devices()[:n_devices])
    return seen


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    with pytest.MonkeyPatch.context() as mp:
        seen = _train(mp, workdir, 4, FSDP8, 8)
    return workdir, seen, restore_state(workdir)


@pytest.mark.parametrize(
    "before, after",
    [((FSDP8, 8), (DATA2_FSDP2, 4)), ((DATA2_FSDP2, 4), (FSDP8, 8))],
    ids=["8to4", "4to8"],
)
def test_resume_on_another_mesh_equals_uninterrupted(
    straight, tmp_path, monkeypatch, before, after
):
    ref_dir, ref_batches, ref = straight
    assert len(ref_batches) == 4 and len(set(ref_batches)) == 4
    workdir = str(tmp_path)
    first = _train(monkeypatch, workdir, 2, *before)
    second = _train(monkeypatch, workdir, 4, *after)
    assert first == ref_batches[:2]
    assert second == ref_batches[2:]  # the iterator continued where it stopped, on the new mesh

    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the second run started at step 3
    ref_rows = [r for r in read_metrics(ref_dir) if "loss" in r]
    for r, q in zip(rows, ref_rows, strict=True):
        assert r["packing_fill"] == q["packing_fill"]
        assert r["loss"] == pytest.approx(q["loss"], rel=1e-5)

    state = restore_state(workdir)
    assert int(state["step"]) == 4 and int(state["skipped"]) == 0
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

"""Tests for vdit.train.checkpoint: sharded state, grain iterator state, config, elasticity."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from vdit.train.checkpoint import Checkpointer, read_config


def _fsdp_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()).reshape(8), ("fsdp",))


def _state_and_specs() -> tuple[dict[str, Any], dict[str, P]]:
    """A small train-state-like pytree and its specs on the 8-way 'fsdp' mesh."""
    state = {
        "params": {
            "w": jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8),
            "b": jnp.linspace(-1.0, 1.0, 8, dtype=jnp.bfloat16),
        },
        "opt_state": {"mu": jnp.full((16, 8), 0.5, jnp.float32)},
        "step": jnp.asarray(7, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(0)),
    }
    specs = {
        "params": {"w": P("fsdp", None), "b": P("fsdp")},
        "opt_state": {"mu": P("fsdp", None)},
        "step": P(),
        "rng": P(),
    }
    return state, specs


def _shard(tree: Any, mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _assert_trees_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _shuffled_pipeline() -> grain.IterDataset:
    return grain.MapDataset.range(100).shuffle(seed=0).map(lambda i: i * 3 + 1).to_iter_dataset()


def _packed_pipeline() -> grain.IterDataset:
    def example(i: int) -> dict[str, np.ndarray]:
        n = int(np.random.default_rng(i).integers(1, 12))
        return {
            "tokens": np.arange(n, dtype=np.int32) + 100 * i,
            "weights": np.full((n,), i / 10, np.float32),
        }

    ds = grain.MapDataset.range(100).shuffle(seed=1).map(example).to_iter_dataset()
    return grain.experimental.BestFitPackIterDataset(
        ds, length_struct={"tokens": 16, "weights": 16}, num_packing_bins=3
    )


@pytest.mark.parametrize("pipeline", [_shuffled_pipeline, _packed_pipeline])
def test_roundtrip_state_iterator_config(
    tmp_path: Path, pipeline: Callable[[], grain.IterDataset]
) -> None:
    mesh = _fsdp_mesh()
    host_state, specs = _state_and_specs()
    state = _shard(host_state, mesh, specs)
    config = ml_collections.ConfigDict({"model": {"depth": 2}, "lr": 1e-3})
    it = iter(pipeline())
    for _ in range(7):
        next(it)
    directory = tmp_path / "workdir" / "checkpoints"

    with Checkpointer(directory, save_every=10) as ckpt:
        assert ckpt.save(10, state, data_iter=it, config=config)
    expected_next = [next(it) for _ in range(5)]
    unrestored = iter(pipeline())
    with pytest.raises(AssertionError):  # the restored position must matter
        _assert_trees_equal([next(unrestored) for _ in range(5)], expected_next)

    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    fresh_it = iter(pipeline())
    with Checkpointer(directory, save_every=10) as ckpt:
        assert ckpt.latest_step() == 10
        restored, step = ckpt.restore(_abstract(host_state, shardings), data_iter=fresh_it)
    assert step == 10
    _assert_trees_equal(restored, host_state)
    jax.tree.map(_assert_sharding, restored, shardings)
    _assert_trees_equal([next(fresh_it) for _ in range(5)], expected_next)


def _assert_sharding(x: jax.Array, sharding: jax.sharding.Sharding) -> None:
    assert isinstance(x, jax.Array)
    assert x.sharding == sharding, (x.sharding, sharding)


def test_elastic_restore_onto_other_meshes(tmp_path: Path) -> None:
    host_state, specs = _state_and_specs()
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(3, _shard(host_state, _fsdp_mesh(), specs))

        mesh2d = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "fsdp"))
        specs2d = {
            "params": {"w": P("data", "fsdp"), "b": P("fsdp")},
            "opt_state": {"mu": P(None, ("data", "fsdp"))},
            "step": P(),
            "rng": P("data"),
        }
        shardings2d = jax.tree.map(lambda s: NamedSharding(mesh2d, s), specs2d)
        restored, _ = ckpt.restore(_abstract(host_state, shardings2d))
        _assert_trees_equal(restored, host_state)
        jax.tree.map(_assert_sharding, restored, shardings2d)

        single = SingleDeviceSharding(jax.devices()[0])
        restored, _ = ckpt.restore(_abstract(host_state, jax.tree.map(lambda _: single, specs)))
        _assert_trees_equal(restored, host_state)
        for leaf in jax.tree.leaves(restored):
            assert leaf.sharding.device_set == {jax.devices()[0]}


def test_interval_keep_and_duplicate_steps(tmp_path: Path) -> None:
    state = {"x": jnp.arange(4.0), "step": jnp.asarray(0, jnp.int32), "scale": np.float32(2.0)}
    with Checkpointer(tmp_path, save_every=3, keep=2, async_save=False) as ckpt:
        assert ckpt.latest_step() is None
        saved = [s for s in range(1, 11) if ckpt.save(s, state)]
        # Multiples of save_every, plus orbax's initial save of a run without checkpoints.
        assert saved == [1, 3, 6, 9]
        assert ckpt.all_steps() == [6, 9]
        assert ckpt.latest_step() == 9
        # Existing steps are skipped, also with force; force saves off-interval steps.
        assert not ckpt.save(9, state)
        assert not ckpt.save(9, state, force=True)
        assert ckpt.save(10, state, force=True)
        assert ckpt.all_steps() == [9, 10]
    with Checkpointer(tmp_path, save_every=3, keep=2) as ckpt:
        assert ckpt.latest_step() == 10
        assert not ckpt.should_save(11) and ckpt.should_save(12)
        restored, step = ckpt.restore(state, step=9)  # concrete leaves work as targets too
        assert step == 9
        _assert_trees_equal(restored, state)
        with pytest.raises(FileNotFoundError, match="step 6"):
            ckpt.restore(state, step=6)


def test_restore_missing_raises(tmp_path: Path) -> None:
    directory = tmp_path / "empty" / "checkpoints"
    abstract = {
        "x": jax.ShapeDtypeStruct(
            (2,), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0])
        )
    }
    with Checkpointer(directory, save_every=1) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match=re.escape(str(directory))):
            ckpt.restore(abstract)
        with pytest.raises(FileNotFoundError, match=re.escape(str(directory))):
            ckpt.read_config()
        ckpt.save(1, {"x": jnp.zeros(2)})
        with pytest.raises(FileNotFoundError, match="data iterator"):
            ckpt.restore(abstract, data_iter=iter(_shuffled_pipeline()))
        with pytest.raises(FileNotFoundError, match="no config"):
            ckpt.read_config()
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        read_config(missing)
    assert not missing.exists()


def test_read_config(tmp_path: Path) -> None:
    config = ml_collections.ConfigDict(
        {"model": {"depth": 2, "patch": (1, 2, 2)}, "lr": 3e-4, "name": "tiny"}
    )
    state = {"x": jnp.ones(3)}
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state, config=config)
        config.lr = 1e-4
        ckpt.save(2, state, config=config)
        expected = {"model": {"depth": 2, "patch": [1, 2, 2]}, "lr": 1e-4, "name": "tiny"}
        assert ckpt.read_config() == expected
        assert ckpt.read_config(step=1)["lr"] == 3e-4
    assert read_config(tmp_path) == expected
    assert read_config(tmp_path, step=1)["lr"] == 3e-4


def test_relative_directory_saves_and_restores(tmp_path: Path, monkeypatch) -> None:
    """A work directory given relative to the current directory (as `make train` does) works."""
    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(4.0)}
    with Checkpointer("runs/x/checkpoints", save_every=1) as ckpt:
        assert ckpt.save(1, state, config={"a": 1})
        assert ckpt.save(2, state, config={"a": 2})  # the first async save commits meanwhile
    with Checkpointer("runs/x/checkpoints", save_every=1) as ckpt:
        restored, step = ckpt.restore(state)
    assert step == 2 and np.array_equal(restored["w"], np.arange(4.0))
    assert read_config("runs/x/checkpoints")["a"] == 2


def test_restore_with_another_process_count_names_it(tmp_path: Path) -> None:
    """The iterator state is per process: a checkpoint of a two-process run cannot feed one process."""
    state = {"w": jnp.arange(4.0)}
    it = iter(_shuffled_pipeline())
    next(it)
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state, data_iter=it)
    data = tmp_path / "1" / "data"
    # What the two processes of a two-process run leave behind.
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    (data / "process_1-of-2.json").write_text((data / "process_0-of-2.json").read_text())
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(ValueError, match="a run of 2 processes, this run has 1"):
            ckpt.restore(state, data_iter=iter(_shuffled_pipeline()))
        restored, _ = ckpt.restore(state)  # the train state alone restores on any process count
    _assert_trees_equal(restored, state)

"""Splash attention compiled for a TPU target from this host (ahead of time, nothing runs).

libtpu compiles for a described topology without TPU hardware: `topologies.get_topology_desc`
gives abstract TPU devices, a mesh over them makes `jax.jit(...).lower(...).compile()` target TPU,
and the splash kernel lowers to Mosaic instead of running in interpret mode. Skipped when libtpu is
not installed.
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vdit.ops.attention import attention

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]')",
)

TOPOLOGY = "v5p:2x2x1"  # four chips, one host
MOSAIC = 'custom_call_target="tpu_custom_call"'


@pytest.fixture(scope="module")
def tpu_devices():
    # Compile-only use needs no exclusive access to a TPU; without this, another process holding
    # libtpu's lock file (a TPU job, a parallel test run) makes the plugin initialisation abort.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY)
    assert len(topo.devices) == 4 and topo.devices[0].platform == "tpu"
    return topo.devices


def test_splash_attention_compiles_for_tpu(tpu_devices):
    """Forward + backward, bf16, per device inside shard_map over (data, tensor), a length that is
    not a block multiple; "auto" is splash when compiling for TPU."""
    mesh = jax.sharding.Mesh(np.array(tpu_devices).reshape(2, 2), ("data", "tensor"))
    b, length, h, d = 4, 8000, 4, 64
    spec, spec_ids = P("data", None, "tensor"), P("data")
    x = jax.ShapeDtypeStruct((b, length, h, d), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
    ids = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=NamedSharding(mesh, spec_ids))
    fn = functools.partial(attention, impl="auto", block_q=512, block_kv=512, platform="tpu")
    sharded = jax.shard_map(
        lambda q, k, v, ids: fn(q, k, v, ids, ids),
        mesh=mesh,
        in_specs=(spec, spec, spec, spec_ids),
        out_specs=spec,
        check_vma=False,
    )

    def loss(q, k, v, ids):
        return jnp.sum(sharded(q, k, v, ids).astype(jnp.float32) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, ids).compile()
    # The real kernel: forward, dq and dk/dv Mosaic calls.
    assert compiled.as_text().count(MOSAIC) == 3
    mem = compiled.memory_analysis()
    # Each device holds its shard of the inputs (TPU tiling pads them a little), not a replica.
    per_device_inputs = (b // 2) * length * ((h // 2) * d * 2 * 3 + 4)
    assert per_device_inputs <= mem.argument_size_in_bytes < 1.5 * per_device_inputs
    # Blockwise: far below one f32 score matrix per device (rows x heads x 8192 x 8192 padded).
    dense_scores = (b // 2) * (h // 2) * 8192 * 8192 * 4
    assert 0 < mem.temp_size_in_bytes < dense_scores / 8, mem.temp_size_in_bytes


@pytest.mark.slow
def test_train_step_with_splash_compiles_for_tpu(tpu_devices):
    """The whole train step (VideoDiT forward + backward, optimizer) of the default config
    (attn_impl="auto") on a (data=2, tensor=2) TPU mesh: every attention (text encoder, self,
    cross) is the splash Mosaic kernel, although this host's default backend is the CPU."""
    from tiny import tiny_config

    from vdit import configlib
    from vdit.data import pipeline
    from vdit.train.dit_task import DiTTask

    c = tiny_config()
    assert c.model.attn_impl == "auto" and jax.default_backend() == "cpu"
    c.mesh.data, c.mesh.tensor = 2, 2
    c.data.batch_rows = 4
    c = configlib.load(c, 4)
    batch = next(iter(pipeline.build(configlib.pipeline_config(c))))
    trainer = DiTTask(c, tpu_devices, data=False)
    shardings = trainer.batch_shardings({k: np.ndim(batch[k]) for k in pipeline.DEVICE_KEYS})
    abstract_batch = {
        k: jax.ShapeDtypeStruct(
            np.shape(batch[k]), np.asarray(batch[k]).dtype, sharding=shardings[k]
        )
        for k in pipeline.DEVICE_KEYS
    }
    step = trainer.jit_train_step(shardings)
    compiled = step.lower(trainer.state.abstract_sharded(), abstract_batch).compile()
    # Three attention kinds (text self, scanned video self, scanned cross) x (fwd, dq, dk/dv).
    assert compiled.as_text().count(MOSAIC) == 9
    mem = compiled.memory_analysis()
    assert mem.alias_size_in_bytes > 0  # the donated state is updated in place
    assert 0 < mem.temp_size_in_bytes < 256 * 2**20, mem

"""Ahead-of-time compilation for TPU topologies, memory per device, `vdit flops` and `vdit compile`.

The TPU tests compile for compile-only devices from `jax.experimental.topologies`: they need libtpu
(the `tpu` extra), not a TPU, and are skipped when libtpu is not installed.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_cli import _vdit
from tiny import DEFAULT_CONFIG, ROOT, tiny_config

import vdit
from vdit import aot, configlib, plan
from vdit.data import packing, pipeline
from vdit.parallel import topology

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')"
)


@pytest.mark.parametrize(
    "name, chip, shape",
    [
        ("v5p:2x2x1", "v5p", (2, 2, 1)),
        ("v5p-8", "v5p", (2, 2, 1)),  # 8 TensorCores = 4 chips
        ("v5p-16", "v5p", (2, 2, 2)),
        ("v5p-64", "v5p", (2, 4, 4)),
        ("v4-8", "v4", (2, 2, 1)),
        ("v4-32", "v4", (2, 2, 4)),
        ("v5e-8", "v5e", (2, 4)),  # v5e / v6e names count chips
        ("v5litepod-4", "v5e", (2, 2)),
        ("v6e-8", "v6e", (2, 4)),
        ("v6e-256", "v6e", (16, 16)),
        ("v6e:2x2", "v6e", (2, 2)),
    ],
)
def test_parse_topology(name, chip, shape):
    t = topology.parse_topology(name)
    assert (t.chip.name, t.shape) == (chip, shape)
    assert t.name == f"{chip}:{'x'.join(map(str, shape))}"


@pytest.mark.parametrize(
    "name, words",
    [
        ("v7x-8", "unknown TPU topology"),
        ("tpu-8", "unknown TPU topology"),
        ("v5p", "unknown TPU topology"),
        ("v5p:2x2", "3 positive axes"),
        ("v5p-7", "2 per chip"),
        ("v6e-12", "power of two"),
    ],
)
def test_unknown_or_malformed_topology_is_a_clear_error(name, words):
    with pytest.raises(ValueError, match=words) as e:
        topology.parse_topology(name)
    assert name in str(e.value)


def test_chip_table():
    chips = topology.CHIPS
    assert topology.chip_for_device_kind("TPU v5 lite") is chips["v5e"]
    assert topology.chip_for_device_kind("TPU v6 lite") is chips["v6e"]
    assert topology.peak_flops_per_device(jax.devices()[0]) is None  # cpu: not logged as mfu
    assert chips["v5p"].peak_flops == 459e12 and chips["v5p"].hbm_bytes == 95 * topology.GiB


def test_out_of_memory_message_is_parsed():
    msg = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (131.96G) exceeds available HBM (95.74G)."
    )
    m = aot._OOM.search(msg)
    assert aot._xla_size(*m.group(1, 2)) == int(131.96 * topology.GiB)
    assert aot._xla_size(*m.group(3, 4)) == int(95.74 * topology.GiB)


def test_abstract_batch_matches_the_pipeline():
    c = configlib.load(tiny_config(), 8)
    real = next(iter(pipeline.build(configlib.pipeline_config(c))))
    shapes = aot.batch_shapes(c)
    assert set(shapes) == set(pipeline.DEVICE_KEYS)
    for k, (shape, dtype) in shapes.items():
        assert (np.shape(real[k]), np.asarray(real[k]).dtype) == (shape, dtype), k


def test_batch_shapes_cover_the_packed_contract():
    shapes = packing.batch_shapes(2, 64, 16, 4, patch_dim=12, text_dim=0)
    assert set(shapes) == set(packing.BATCH_KEYS)
    assert shapes["patches"] == ((2, 64, 12), np.float32) and shapes["grid"] == (
        (2, 4, 3),
        np.int32,
    )
    assert shapes["text"] == ((2, 16), np.int32)  # token ids
    assert packing.batch_shapes(2, 64, 16, 4, 12, text_dim=8)["text"] == ((2, 16, 8), np.float32)


def test_full_rows_layout():
    c = configlib.load(tiny_config(), 8)
    c.data.max_tokens_per_sample = 96  # 2 samples of 96 tokens in a 256-token row, 64 padding
    seg, tseg = aot.full_rows_layout(c)
    assert seg.shape == (8, 256) and tseg.shape == (8, 128)
    assert [int((seg[0] == s).sum()) for s in (0, 1, 2)] == [64, 96, 96]
    assert [int((tseg[0] == s).sum()) for s in (1, 2)] == [32, 32]  # model.text.max_len each


def _expected_shard_bytes(x, mesh_shape) -> int:
    """Per-device bytes of an abstract array from its PartitionSpec (independent of shard_shape)."""
    split = 1
    for axes in x.sharding.spec:
        for a in (axes,) if isinstance(axes, str) else (axes or ()):
            split *= mesh_shape[a]
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize // split


def _small(c):
    c.model.depth = 1
    c.model.attn_impl = "xla"
    c.data.row_len = 64
    c.data.max_tokens_per_sample = 64
    c.data.text_len = 64
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c


@pytest.mark.slow  # one compile for 8 CPU devices: ~40 s on two shared cores
def test_fsdp8_state_bytes_per_device_from_compiled_memory_analysis():
    """fsdp=8 on the 8 CPU devices: what XLA allocates for the arguments of one device is the
    state split 8 ways (plus that device's batch rows)."""
    c = configlib.load(_small(tiny_config()), 8, plan_only=True)
    r = aot.report(c, jax.devices())
    assert r["mesh"]["fsdp"] == 8
    b, total = r["bytes_per_device"], r["total_bytes"]
    state_total = sum(total.values())
    state_per_device = b["arguments"] - b["batch"]
    assert abs(state_per_device - state_total / 8) <= 0.10 * state_total / 8, (
        state_per_device,
        state_total / 8,
    )
    assert b["params"] == pytest.approx(total["params"] / 8, rel=0.10)
    assert b["aliased"] >= b["params"] + b["opt_state"] + b["ema"]  # the state is donated
    assert "chip" not in r and "total" in aot.format_report(r)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("name", ["v5p:2x2x1", "v6e:2x2"])
def test_compile_for_tpu_topology(name):
    c = _small(tiny_config())
    c.model.depth = 2  # scanned (the default): XLA counts the block once
    r = aot.compile_report(c, name)
    chip = topology.parse_topology(name).chip
    assert r["devices"] == 4 and r["mesh"]["fsdp"] == 4 and r["chip"]["name"] == chip.name
    assert r["chip"]["hbm_per_device"] == chip.hbm_bytes and r["fits"]

    # state bytes per device: shapes and PartitionSpecs, recomputed here from the specs
    devices = topology.topology_devices(topology.parse_topology(name))
    state = aot.build(configlib.load(c, 4), devices).state
    b = r["bytes_per_device"]
    for k in ("params", "opt_state", "ema"):
        assert b[k] == sum(_expected_shard_bytes(x, r["mesh"]) for x in jax.tree.leaves(state[k]))
        assert b[k] < r["total_bytes"][k] / 2  # sharded, not replicated
    # XLA's buffers hold at least those bytes (TPU layouts pad small arrays to tiles)
    assert b["arguments"] >= b["params"] + b["opt_state"] + b["ema"] + b["batch"]
    assert b["aliased"] >= b["params"] + b["opt_state"] + b["ema"]
    assert b["arguments"] <= b["total"] < r["chip"]["hbm_per_device"]

    f = r["flops"]
    # cost analysis counts the scanned blocks once: compare with the analytic count of the same
    ratio = f["xla_per_device"] / f["analytic_like_xla_per_device"]
    assert 1.0 <= ratio <= 1.3, ratio
    assert f["xla_per_device"] < f["per_device_executed"]  # depth 2 counted as 1
    assert 0 < r["mfu_bound"] <= 1
    text = aot.format_report(r)
    assert text.splitlines()[-1].startswith("fits: ")


def test_flops_report_on_pipeline_batches_and_full_rows():
    c = configlib.load(tiny_config(), plan_only=True)
    packed = plan.flops_report(c, batches=2)
    full = plan.flops_report(c, batches=0)
    assert "pipeline" in packed["layout"] and "max_tokens" in full["layout"]
    assert 0 < packed["fill"] <= 1 and full["fill"] == 1  # 256-token samples fill 256-token rows
    f = packed["flops"]
    assert f["total_useful"] == pytest.approx(f["matmul_useful"] + f["attention_useful"])
    assert 0 < f["text"] < f["matmul"] and f["recompute"] == 0
    text = plan.format_flops(packed)
    for part in (
        "matmul",
        "attention (useful",
        "attention (executed",
        "recompute",
        "text tokens",
        "total model FLOPs",
        "time_proj",
    ):
        assert part in text, part


def test_flops_cli_prints_json():
    proc = _vdit(
        "flops",
        f"--config={DEFAULT_CONFIG}:mu/4",
        "--batches=0",
        "--json",
        "--config.model.remat=full",
    )
    f = json.loads(proc.stdout)["flops"]
    assert f["recompute"] > 0 and f["total_executed"] > f["total_useful"] > 0


def test_compile_cli_rejects_an_unknown_topology():
    proc = _vdit("compile", f"--config={DEFAULT_CONFIG}:mu/4", "--topology=v9z-8", check=False)
    assert proc.returncode != 0 and "unknown TPU topology 'v9z-8'" in proc.stderr


@needs_libtpu
def test_multi_slice_mesh_puts_slices_outermost_on_data():
    """Two v5p:2x2x1 slices: `data` spans the slices (DCN), each slice holds fsdp x tensor (ICI)."""
    from vdit.parallel.mesh import make_mesh

    devices = topology.topology_devices(topology.parse_topology("v5p:2x2x1"), num_slices=2)
    assert sorted({d.slice_index for d in devices}) == [0, 1]
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices, dcn_data=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    for i in range(2):
        assert {d.slice_index for d in mesh.devices[i].ravel()} == {i}


@pytest.mark.parametrize(
    "rows, mesh, devices, scaled, split",
    [
        (2, {"data": -1}, 4, 4, "4 x 1"),  # the BUILD.md example: XL/2's 2 rows on v5p-8
        (6, {"data": -1}, 4, 8, "4 x 1"),  # the smallest multiple that is not smaller
        (4, {"data": -1, "fsdp": 2}, 8, 8, "4 x 2"),
        (2, {"data": -1, "fsdp": 2, "dcn_data": 2}, 8, 8, "4 x 2"),  # data spans the slices
    ],
)
def test_batch_rows_are_scaled_to_split_over_the_slice(rows, mesh, devices, scaled, split):
    c = tiny_config()
    c.data.batch_rows = rows
    c.mesh.update(mesh)
    fitted, notes = aot.fit_batch_rows(c, devices)
    assert fitted.data.batch_rows == scaled and c.data.batch_rows == rows  # the caller's is kept
    assert notes == [
        f"data.batch_rows={rows} -> {scaled}: rows split over mesh data x fsdp = {split}"
    ]
    configlib.load(fitted, devices, plan_only=True)  # now valid


def test_batch_rows_that_split_and_impossible_meshes_are_left_alone():
    c = tiny_config()  # 8 rows over 8 devices
    assert aot.fit_batch_rows(c, 8) == (c, [])
    c.mesh.fsdp = 3  # 8 devices do not split into data x 3: the config's own error, one line
    fitted, notes = aot.fit_batch_rows(c, 8)
    assert fitted is c and notes == []
    with pytest.raises(ValueError, match="mesh") as e:
        configlib.load(fitted, 8, plan_only=True)
    assert "\n" not in str(e.value)


@needs_libtpu
@pytest.mark.slow  # one compile of the mu model for v5p-8: ~30 s on two shared cores
def test_compile_cli_scales_batch_rows_and_says_so():
    proc = _vdit(
        "compile",
        f"--config={DEFAULT_CONFIG}:mu/4",
        "--topology=v5p-8",
        "--config.data.batch_rows=2",
    )
    lines = proc.stdout.splitlines()
    assert "note: data.batch_rows=2 -> 4: rows split over mesh data x fsdp = 4 x 1" in lines
    assert lines[-1].startswith("fits: ")


# ---------------------------------------------------------------------------------------------------
# libtpu's lock file: a JAX process started without JAX_PLATFORMS=cpu takes it (even with no TPU
# attached) and holds it for its life; a compile for a TPU topology in another process needs libtpu.
# ---------------------------------------------------------------------------------------------------
needs_no_tpu = pytest.mark.skipif(
    vdit.tpu_attached(), reason="a TPU is attached: the lock file guards the chips here"
)


def _env_without_platforms() -> dict[str, str]:
    """This environment as a user's shell has it: no JAX_PLATFORMS, no lock override."""
    drop = ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD")
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def libtpu_lock_holder():
    """A plain JAX process (no vdit) that started its backends without JAX_PLATFORMS: it holds
    libtpu's lock until its stdin closes."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, jax; jax.devices(); print('ready', flush=True); sys.stdin.read()",
        ],
        env=_env_without_platforms(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env_without_platforms(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@needs_libtpu
@needs_no_tpu
def test_topology_devices_while_another_process_holds_the_libtpu_lock(libtpu_lock_holder):
    get = "topologies.get_topology_desc(platform='tpu', topology_name='v5p:2x2x1')"
    # the failure: a compile-only process that is not vdit cannot start libtpu
    plain = _python(f"from jax.experimental import topologies; {get}")
    assert plain.returncode != 0 and "lockfile" in plain.stderr, plain.stderr[-2000:]
    # vdit lifts the lock where no TPU is attached
    ok = _python(
        "from vdit.parallel import topology as t; "
        "print(len(t.topology_devices(t.parse_topology('v5p:2x2x1'))))"
    )
    assert ok.returncode == 0 and ok.stdout.split() == ["4"], ok.stderr[-2000:]


@needs_libtpu
@needs_no_tpu
@pytest.mark.slow  # one compile of the mu model for v5p-8: ~30 s on two shared cores
def test_compile_cli_while_another_process_holds_the_libtpu_lock(libtpu_lock_holder):
    proc = subprocess.run(
        [sys.executable, "-m", "vdit.cli", "compile", f"--config={DEFAULT_CONFIG}:mu/4"]
        + ["--topology=v5p-8", "--config.data.batch_rows=2", "--json"],
        cwd=ROOT,
        env=_env_without_platforms(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout)
    assert r["notes"] == ["data.batch_rows=2 -> 4: rows split over mesh data x fsdp = 4 x 1"]
    assert r["fits"] and r["mesh"]["data"] == 4

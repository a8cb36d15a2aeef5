"""Compile the real train step ahead of time for a TPU slice this machine need not have.

    vdit compile --config=configs/default.py:XL/2 --topology=v5p-8 [--config.FIELD=VALUE ...]

With libtpu installed, `jax.experimental.topologies` describes the devices of a slice
(``v5p:2x2x1``, vdit/parallel/topology.py) without any TPU attached. The mesh and the train state
are built over those devices exactly as for training (:func:`build`, the one call into vdit/train),
and the jitted train step is lowered and compiled on abstract inputs: the abstract sharded state and
a batch of the packed contract's shapes at the config's sizes. Nothing is allocated. A
`data.batch_rows` that does not split over the slice's data x fsdp rows is scaled up to the next
multiple, and the report says so. The report gives, per device:

* the bytes of parameters, optimizer state and EMA from their shapes and shardings;
* XLA's `memory_analysis()`: arguments, outputs, aliased (donated) bytes, temporaries, generated
  code; their sum ``arguments + outputs - aliased + temporaries + code`` against the chip's HBM;
* the analytic FLOPs of the step (`vdit.flops`) and XLA's `cost_analysis()` flops.

The TPU compiler itself refuses a program that does not fit in HBM (RESOURCE_EXHAUSTED); the report
then gives what the compiler said it needed instead of the memory analysis, and "does NOT fit".

XLA's cost analysis counts a loop body once (the scanned blocks, the chunked kernel's block loops):
the report puts it next to the analytic count made the same way (one block when layers are scanned;
attention only when dense, ``"xla"``); ``model.scan_layers=False`` with ``model.attn_impl="xla"``
compares full steps. The analytic count assumes rows filled with the largest samples
(:func:`full_rows_layout`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vdit import configlib, flops
from vdit.data import packing, pipeline
from vdit.models.dit import DiTConfig
from vdit.parallel.mesh import resolve_mesh_shape
from vdit.parallel.topology import Chip, GiB, chip_for_device_kind, parse_topology, topology_devices


# ---------------------------------------------------------------------------------------------------
# Abstract inputs
# ---------------------------------------------------------------------------------------------------
def batch_shapes(c: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Global shape and dtype of every device key of a batch of the (loaded) config: the packed
    contract (`packing.batch_shapes`) at the config's sizes."""
    d, text = c.data, c.model.text
    shapes = packing.batch_shapes(
        rows=d.batch_rows,
        row_len=d.row_len,
        text_len=d.text_len,
        max_samples=d.max_samples_per_row,
        patch_dim=math.prod(configlib.patch_size(c)) * c.autoencoder.channels,
        text_dim=0 if text.kind == "bytes" else text.width,
    )
    return {k: v for k, v in shapes.items() if k in pipeline.DEVICE_KEYS}


def abstract_batch(
    c: ml_collections.ConfigDict, batch_shardings: Callable[[dict[str, int]], dict[str, Any]]
) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch of :func:`batch_shapes` as abstract arrays sharded by `batch_shardings` (key ->
    ndim to key -> sharding)."""
    shapes = batch_shapes(c)
    shardings = batch_shardings({k: len(s) for k, (s, _) in shapes.items()})
    return {k: jax.ShapeDtypeStruct(s, dt, sharding=shardings[k]) for k, (s, dt) in shapes.items()}


def full_rows_layout(c: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (B, L) and text segment ids (B, C) of rows filled with the largest samples.

    Each row holds ``min(row_len // max_tokens_per_sample, max_samples_per_row)`` samples of
    ``max_tokens_per_sample`` tokens (the rest is padding) and each sample a caption of
    ``min(model.text.max_len, text_len // samples)`` tokens.
    """
    d = c.data
    per_row = max(1, min(d.row_len // d.max_tokens_per_sample, d.max_samples_per_row))
    tokens = min(d.max_tokens_per_sample, d.row_len)
    text = max(1, min(c.model.text.max_len, d.text_len // per_row))
    seg = np.zeros((d.batch_rows, d.row_len), np.int32)
    tseg = np.zeros((d.batch_rows, d.text_len), np.int32)
    for s in range(per_row):
        seg[:, s * tokens : (s + 1) * tokens] = s + 1
        tseg[:, s * text : (s + 1) * text] = s + 1
    return seg, tseg


def sharded_nbytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of an abstract array (by shape; no layout padding)."""
    return math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


def nbytes(x) -> int:
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


# ---------------------------------------------------------------------------------------------------
# Compile and report
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Built:
    """The train step of a config over some devices, ready to lower: nothing is allocated."""

    model_cfg: DiTConfig
    mesh: Mesh
    state: dict[str, Any]  # the abstract train state, every leaf with its sharding
    batch: dict[str, jax.ShapeDtypeStruct]  # the abstract batch, sharded like real batches
    step: Callable  # the jitted train step(state, batch), donating the state


def build(c: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> Built:
    """The loaded config's train step over `devices`: the one place that calls into vdit/train."""
    from vdit.train.dit_task import DiTTask

    task = DiTTask(c, list(devices), data=False)
    batch = abstract_batch(c, task.batch_shardings)
    step = task.jit_train_step({k: v.sharding for k, v in batch.items()})
    return Built(task.model_cfg, task.mesh, task.state.abstract_sharded(), batch, step)


def compile_step(built: Built) -> tuple[jax.stages.Compiled, float]:
    """The train step lowered on the abstract inputs and compiled; and the seconds it took."""
    t0 = time.perf_counter()
    compiled = built.step.lower(built.state, built.batch).compile()
    return compiled, time.perf_counter() - t0


# The TPU compiler refuses a program whose buffers exceed HBM, e.g. "RESOURCE_EXHAUSTED: Ran out of
# memory on HBM, the total memory required for HLO temporaries (131.96G) exceeds available HBM
# (95.74G)." (sizes as XLA prints them).
_OOM = re.compile(
    r"(?:temporaries|required)[^(]*\(([\d.]+)([KMGT])\).*?available HBM \(([\d.]+)([KMGT])\)", re.S
)


def _xla_size(num: str, unit: str) -> int:
    return int(float(num) * 1024 ** "KMGT".index(unit) * 1024)


def _flops_like_xla(cfg, seg, tseg) -> float:
    """Analytic executed FLOPs counted as XLA's cost analysis counts them: a scanned stack of blocks
    once, and attention only when it is dense (the chunked kernel's block loops count once)."""
    once = dataclasses.replace(cfg, depth=1) if cfg.scan_layers else cfg
    f = flops.step_flops(once, seg, tseg)
    if cfg.attn_impl == "xla":
        return f["total_executed"]
    a = flops.attention_forward_flops(once, seg, tseg)
    recompute = f["recompute"] - (a["self_executed"] + a["cross_executed"] if f["recompute"] else 0)
    return f["matmul"] + recompute


def _suggestions(c: ml_collections.ConfigDict, mesh: dict[str, int]) -> list[str]:
    m, tries = c.model, []
    if m.remat in ("none", "save_dots"):
        tries.append("model.remat=full")
    if m.dtype == "float32":
        tries.append("model.dtype=bfloat16")
    if mesh["data"] > 1:
        tries.append("mesh.data=1 mesh.fsdp=-1 (shard parameters and optimizer over all devices)")
    if c.data.batch_rows > mesh["data"] * mesh["fsdp"]:
        tries.append(f"fewer data.batch_rows (now {c.data.batch_rows})")
    else:  # one row per device already: split rows' tokens instead
        tries.append("mesh.sequence > 1 (each row's tokens over several devices, fewer rows)")
    if m.param_dtype == "float32":
        tries.append("model.param_dtype=bfloat16 (halves parameters, optimizer state and EMA)")
    tries.append("a larger slice")
    return tries


def report(
    c: ml_collections.ConfigDict,
    devices: Sequence[jax.Device],
    *,
    chip: Chip | None = None,
    topology: str = "local",
) -> dict[str, Any]:
    """Compile the train step of the loaded config `c` over `devices`; every figure of the table."""
    built = build(c, devices)
    state, batch = built.state, built.batch
    oom, t0 = None, time.perf_counter()
    try:
        compiled, seconds = compile_step(built)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, oom = None, str(e).strip().splitlines()[0]
        seconds = time.perf_counter() - t0  # until the compiler gave up
    n = len(devices)
    per_chip = 1
    if chip is not None:  # compile-only v4 devices are TensorCores (2 per chip)
        per_chip = max(1, n // max(1, _chips_of(devices)))
    part = {
        k: sum(sharded_nbytes(x) for x in jax.tree.leaves(state[k]))
        for k in ("params", "opt_state", "ema")
    }
    part["step_counters"] = sharded_nbytes(state["step"]) + sharded_nbytes(state["skipped"])
    part["batch"] = sum(sharded_nbytes(x) for x in batch.values())
    if compiled is not None:
        ma = compiled.memory_analysis()
        mem = {
            "arguments": int(ma.argument_size_in_bytes),
            "outputs": int(ma.output_size_in_bytes),
            "aliased": int(ma.alias_size_in_bytes),
            "temporaries": int(ma.temp_size_in_bytes),
            "generated_code": int(ma.generated_code_size_in_bytes),
        }
        mem["total"] = sum(mem.values()) - 2 * mem["aliased"]  # args + outputs - aliased + ...
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
    else:  # the compiler refused: what it needed, from its message, on top of the state and batch
        m = _OOM.search(oom)
        temp = _xla_size(*m.group(1, 2)) if m else 0
        args = sum(part.values())
        mem = dict(arguments=args, outputs=args, aliased=args, temporaries=temp, generated_code=0)
        mem["total"] = args + temp
        cost = {}
    seg, tseg = full_rows_layout(c)
    cfg = built.model_cfg
    f = flops.step_flops(cfg, seg, tseg)
    out: dict[str, Any] = {
        "topology": topology,
        "devices": n,
        "device_kind": devices[0].device_kind,
        "mesh": {k: int(v) for k, v in built.mesh.shape.items()},
        "compile_seconds": seconds,
        "parameters": int(sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"]))),
        "total_bytes": {
            k: sum(nbytes(x) for x in jax.tree.leaves(state[k]))
            for k in ("params", "opt_state", "ema")
        },
        "bytes_per_device": {**part, **mem},
        "flops": {
            **{k: float(v) for k, v in f.items()},
            "per_device_executed": f["total_executed"] / n,
            "per_device_useful": f["total_useful"] / n,
            "xla_per_device": float(cost.get("flops", float("nan"))),
            "analytic_like_xla_per_device": _flops_like_xla(cfg, seg, tseg) / n,
            "scan_layers": cfg.scan_layers,
            "attn_impl": cfg.attn_impl,
        },
        "tokens_per_step": int((seg > 0).sum()),
    }
    if oom is not None:
        out["compile_error"] = oom
    if chip is not None:
        hbm = chip.hbm_bytes // per_chip
        peak = chip.peak_flops / per_chip
        out["chip"] = {
            "name": chip.name,
            "devices_per_chip": per_chip,
            "chips": n // per_chip,
            "hbm_per_device": hbm,
            "peak_flops_per_device": peak,
        }
        out["fits"] = oom is None and mem["total"] <= hbm
        # the step can take no less than its model FLOPs at peak; useful / executed bounds MFU
        out["step_seconds_at_peak"] = f["total_useful"] / (n * peak)
        out["mfu_bound"] = f["total_useful"] / f["total_executed"]
        if not out["fits"]:
            out["try"] = _suggestions(c, out["mesh"])
    return out


def _chips_of(devices: Sequence[jax.Device]) -> int:
    coords = {tuple(getattr(d, "coords", (d.id,))) for d in devices}
    return len(coords)


def _gib(b: float) -> str:
    return f"{b / GiB:.3f}"


def _size(b: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def format_report(r: dict[str, Any]) -> str:
    """The markdown tables and the verdict line."""
    b, f = r["bytes_per_device"], r["flops"]
    lines = [
        f"topology {r['topology']}: {r['devices']} x {r['device_kind']}, mesh {r['mesh']}, "
        f"{r['parameters']:,} parameters, {r['tokens_per_step']:,} tokens/step, "
        f"{'refused' if 'compile_error' in r else 'compiled'} in {r['compile_seconds']:.1f} s",
        *(f"note: {n}" for n in r.get("notes", ())),
        "",
        "| per device | bytes | source |",
        "|---|---:|---|",
    ]
    rows = [(k, "shapes and shardings") for k in ("params", "opt_state", "ema", "batch")]
    rows += [
        ("arguments", "memory_analysis"),
        ("outputs", "memory_analysis"),
        ("aliased", "memory_analysis (donated state)"),
        ("temporaries", "memory_analysis"),
        ("generated_code", "memory_analysis"),
        ("total", "arguments + outputs - aliased + temporaries + code"),
    ]
    if "compile_error" in r:  # nothing from memory_analysis: the compiler's own count instead
        rows = rows[:4] + [
            ("temporaries", "the TPU compiler's out-of-memory error"),
            ("total", "state + batch + temporaries (at least)"),
        ]
    lines += [f"| {k} | {_size(b[k])} | {src} |" for k, src in rows]
    chip = r.get("chip")
    if chip:
        lines.append(
            f"| HBM ({chip['name']}, {chip['devices_per_chip']} device(s) per chip) | "
            f"{_size(chip['hbm_per_device'])} | vdit.parallel.topology.CHIPS |"
        )
    once = "once" if f["scan_layers"] else "all"
    lines += [
        "",
        "| FLOPs per step | total | per device |",
        "|---|---:|---:|",
        f"| analytic model (useful: no padding, no recompute) | {f['total_useful']:.4g} | "
        f"{f['per_device_useful']:.4g} |",
        f"| analytic executed (padding, masked blocks, recompute) | {f['total_executed']:.4g} | "
        f"{f['per_device_executed']:.4g} |",
        f"| analytic counted like XLA (blocks {once}, "
        f"{'dense attention' if f['attn_impl'] == 'xla' else 'no chunked attention'}) | | "
        f"{f['analytic_like_xla_per_device']:.4g} |",
    ]
    if "compile_error" in r:
        lines.append("| XLA cost_analysis | | n/a: not compiled |")
    else:
        ratio = f["xla_per_device"] / f["analytic_like_xla_per_device"]
        lines += [
            f"| XLA cost_analysis (loop bodies once) | | {f['xla_per_device']:.4g} |",
            "",
            f"XLA / analytic counted alike = {ratio:.3f} (XLA also counts elementwise ops)",
        ]
    if chip:
        lines.append(
            f"peak {chip['peak_flops_per_device']:.3g} FLOP/s per device: step >= "
            f"{r['step_seconds_at_peak'] * 1e3:.3g} ms at 100% MFU; useful / executed FLOPs = "
            f"{r['mfu_bound']:.3f} (the MFU ceiling)"
        )
        hbm, total = chip["hbm_per_device"], b["total"]
        if "compile_error" in r:
            lines.append(f"compiler: {r['compile_error']}")
        if r["fits"]:
            lines.append(
                f"fits: {_gib(total)} of {_gib(hbm)} GiB per device ({100 * total / hbm:.0f}%)"
            )
        else:
            lines.append(
                f"does NOT fit: needs {_gib(total)} GiB, chip has {_gib(hbm)} GiB per "
                f"device; try {'; '.join(r['try'])}"
            )
    else:
        lines.append(
            f"total {_gib(b['total'])} GiB per device (device memory unknown: {r['device_kind']})"
        )
    return "\n".join(lines)


def fit_batch_rows(
    config: ml_collections.ConfigDict, num_devices: int
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """The config with `data.batch_rows` scaled up to the smallest multiple of the mesh's data x
    fsdp rows over `num_devices` when it does not split over them, and a note saying so.

    What a slice decides is fixed here rather than refused; any other mismatch is left for
    `configlib.load` to name."""
    if config.get("kind", "dit") != "dit":
        return config, []
    rows, dcn = int(config.data.batch_rows), int(config.mesh.get("dcn_data", 1))
    if rows < 1 or dcn < 1 or num_devices % dcn:
        return config, []
    try:
        mesh = resolve_mesh_shape(dict(config.mesh), num_devices // dcn)
    except ValueError:
        return config, []
    data, fsdp = mesh["data"] * dcn, mesh["fsdp"]
    if rows % (data * fsdp) == 0:
        return config, []
    scaled = -(-rows // (data * fsdp)) * data * fsdp
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.batch_rows = scaled
    note = f"data.batch_rows={rows} -> {scaled}: rows split over mesh data x fsdp = {data} x {fsdp}"
    return config, [note]


def compile_report(config: ml_collections.ConfigDict, topology: str) -> dict[str, Any]:
    """`vdit compile`: the report for a TPU topology name, or "local" for this process's devices.

    `data.batch_rows` is scaled to the slice when it does not split over it (``r["notes"]`` says
    so); any other config error is a one-line ValueError naming the field."""
    if topology == "local":
        devices, chip = jax.devices(), chip_for_device_kind(jax.devices()[0].device_kind)
    else:
        topo = parse_topology(topology)
        slices = int(config.mesh.get("dcn_data", 1))
        devices, chip = topology_devices(topo, slices), topo.chip
        topology = f"{topology} ({topo.name})" if topology != topo.name else topology
        topology += f" x {slices} slices" if slices > 1 else ""
    config, notes = fit_batch_rows(config, len(devices))
    c = configlib.load(config, len(devices), plan_only=True)
    r = report(c, devices, chip=chip, topology=topology)
    if notes:
        r["notes"] = notes
    return r

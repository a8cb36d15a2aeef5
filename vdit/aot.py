"""Compile the real train step ahead of time for a TPU slice this machine need not have.

    vdit compile --config=configs/default.py:XL/2 --topology=v5p-8 [--config.FIELD=VALUE ...]

With libtpu installed, `jax.experimental.topologies` describes the devices of a slice
(``v5p:2x2x1``) without any TPU attached. The mesh and the Trainer are built over those devices
exactly as for training, and the jitted train step is lowered and compiled on abstract inputs: the
Trainer's abstract sharded state and a batch of the config's shapes (``batch_rows x row_len``
tokens, ...). Nothing is allocated. The report gives, per device:

* the bytes of parameters, optimizer state and EMA from their shapes and shardings;
* XLA's `memory_analysis()`: arguments, outputs, aliased (donated) bytes, temporaries, generated
  code; their sum ``arguments + outputs - aliased + temporaries + code`` against the chip's HBM;
* the analytic FLOPs of the step (`vdit.flops`) and XLA's `cost_analysis()` flops.

The TPU compiler itself refuses a program that does not fit in HBM (RESOURCE_EXHAUSTED); the report
then gives what the compiler said it needed instead of the memory analysis, and "does NOT fit".

XLA's cost analysis counts the body of a while loop once. The blocks run under `nnx.scan`, and the
chunked attention kernel loops over block pairs, so its raw count of a scanned model is the step of
a one-block model with attention loops counted once. The report therefore puts it next to the
analytic count of the same thing (``depth = 1`` when layers are scanned; attention included only for
the dense ``"xla"`` implementation); a model compiled with ``model.scan_layers=False`` and
``model.attn_impl="xla"`` gives the full count on both sides.

Analytic FLOPs need a packing layout; the report assumes rows filled with samples of
``data.max_tokens_per_sample`` tokens each (as many as fit in a row and in
``data.max_samples_per_row``), each with a caption of ``model.text.max_len`` tokens
(:func:`full_rows_layout`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from vdit import configlib, flops
from vdit.data import latents, pipeline

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: what a chip has, and how its slices are named."""

    name: str  # generation as in topology names: "v5p"
    hbm_bytes: int  # HBM per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    cores_per_chip: int  # TensorCores; "v4-8" / "v5p-8" count cores, "v5e-8" / "v6e-8" chips
    torus_dims: int  # 3 (v4, v5p) or 2 (v5e, v6e) axes in the slice shape
    device_kinds: tuple[str, ...]  # jax `Device.device_kind` strings of this generation


# Cloud TPU documentation, "system architecture" of each generation: peak compute per chip (bf16)
# and HBM capacity per chip (the pages write "GB"; the runtimes report these sizes in GiB).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 275e12, 2, 3, ("TPU v4",)),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 1, 2, ("TPU v5 lite", "TPU v5e")),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2, 3, ("TPU v5", "TPU v5p")),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1, 2, ("TPU v6 lite", "TPU v6e")),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


def chip_for_device_kind(kind: str) -> Chip | None:
    """The chip of a jax `device_kind` ("TPU v5 lite" -> v5e), or None (CPU, GPU, unknown)."""
    for chip in CHIPS.values():
        if kind in chip.device_kinds:
            return chip
    return None


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """bf16 peak FLOP/s of one runtime device (TPU runtimes show one device per chip), or None."""
    device = jax.devices()[0] if device is None else device
    chip = chip_for_device_kind(device.device_kind)
    return None if chip is None else chip.peak_flops


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    shape: tuple[int, ...]  # chips along each torus axis

    @property
    def name(self) -> str:  # what `get_topology_desc` takes: "v5p:2x2x1"
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)


def _default_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The usual slice shape of `chips` chips: 4 -> 2x2x1 (3D) / 2x2 (2D), 8 -> 2x2x2 / 2x4, ..."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: slices hold a power of two")
    shape = [1] * dims
    while math.prod(shape) < chips:
        shape[shape.index(min(shape))] *= 2
    shape.sort()
    if dims == 3 and shape[0] == 1:  # 2x2x1, 2x1x1: the singleton axis last, as the docs write it
        shape = shape[1:] + [1]
    return tuple(shape)


_TOPOLOGY_HELP = (
    "expected GEN:AxB[xC] (e.g. v5p:2x2x1, v6e:2x2) or GEN-N as in accelerator types "
    "(v4-8, v5p-8: N TensorCores, 2 per chip; v5e-8 or v5litepod-8, v6e-8: N chips) "
    f"with GEN in {sorted(CHIPS) + sorted(_ALIASES)}"
)


def parse_topology(name: str) -> Topology:
    """ "v5p:2x2x1" or "v5p-8" -> Topology(v5p, (2, 2, 1)); ValueError for anything else."""
    m = re.fullmatch(r"(v\w+?)(?::(\d+(?:x\d+)*)|-(\d+))", name.strip())
    gen = None if m is None else _ALIASES.get(m.group(1), m.group(1))
    if m is None or gen not in CHIPS:
        raise ValueError(f"unknown TPU topology {name!r}: {_TOPOLOGY_HELP}")
    chip = CHIPS[gen]
    if m.group(2) is not None:
        shape = tuple(int(x) for x in m.group(2).split("x"))
        if len(shape) != chip.torus_dims or min(shape) < 1:
            raise ValueError(
                f"topology {name!r}: {gen} slices have {chip.torus_dims} positive axes, "
                f"e.g. {Topology(chip, _default_shape(4, chip.torus_dims)).name}"
            )
        return Topology(chip, shape)
    n = int(m.group(3))
    if n % chip.cores_per_chip:
        raise ValueError(
            f"topology {name!r}: {gen} names count TensorCores, {chip.cores_per_chip} per chip"
        )
    try:
        return Topology(chip, _default_shape(n // chip.cores_per_chip, chip.torus_dims))
    except ValueError as e:
        raise ValueError(f"topology {name!r}: {e}") from None


def topology_devices(topology: Topology, num_slices: int = 1) -> list[jax.Device]:
    """Compile-only devices of `num_slices` such slices (needs libtpu; no TPU needs to be attached).
    Devices of several slices carry their `slice_index` (see `mesh.dcn_data`)."""
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'"
        ) from e
    if "tpu" not in os.environ.get("JAX_PLATFORMS", "tpu"):
        # This process only compiles: do not take libtpu's single-process lock, which would stop
        # a training job or another compile on the same machine (and this one with them).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return list(
        topologies.get_topology_desc(
            platform="tpu", topology_name=topology.name, num_slices=num_slices
        ).devices
    )


# ---------------------------------------------------------------------------------------------------
# Abstract inputs
# ---------------------------------------------------------------------------------------------------
def batch_shapes(c: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Global shape and dtype of every device key of a batch of the (loaded) config."""
    d, m = c.data, c.model
    b, n, t, s = d.batch_rows, d.row_len, d.text_len, d.max_samples_per_row
    p = math.prod(configlib.patch_size(c)) * c.autoencoder.channels
    text = ((b, t), np.int32) if m.text.kind == "bytes" else ((b, t, m.text.width), np.float32)
    out = {
        "patches": ((b, n, p), np.float32),
        "segment_ids": ((b, n), np.int32),
        "positions": ((b, n, 3), np.int32),
        "text": text,
        "text_segment_ids": ((b, t), np.int32),
        "text_positions": ((b, t), np.int32),
        "cond_mask": ((b, n), np.bool_),
        "loss_mask": ((b, n), np.bool_),
        "grid": ((b, s, 3), np.int32),
    }
    return {k: (shape, np.dtype(dt)) for k, (shape, dt) in out.items() if k in pipeline.DEVICE_KEYS}


def abstract_batch(c: ml_collections.ConfigDict, trainer) -> dict[str, jax.ShapeDtypeStruct]:
    shapes = batch_shapes(c)
    shardings = trainer.batch_shardings({k: len(s) for k, (s, _) in shapes.items()})
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
def build(c: ml_collections.ConfigDict, devices: Sequence[jax.Device]):
    """(trainer, abstract sharded state, abstract batch) of the loaded config over `devices`."""
    from vdit.train.step import make_trainer

    trainer = make_trainer(c, list(devices))
    return trainer, trainer.abstract_sharded_state(), abstract_batch(c, trainer)


def compile_step(trainer, state, batch):
    """The jitted train step lowered on the abstract inputs and compiled; and the seconds it took."""
    shardings = {k: v.sharding for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = trainer.jit_train_step(shardings).lower(state, batch).compile()
    return compiled, time.perf_counter() - t0


def compile_train_step(c: ml_collections.ConfigDict, devices: Sequence[jax.Device]):
    """(trainer, compiled step, abstract state, abstract batch, seconds to lower + compile)."""
    trainer, state, batch = build(c, devices)
    compiled, seconds = compile_step(trainer, state, batch)
    return trainer, compiled, state, batch, seconds


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
    trainer, state, batch = build(c, devices)
    oom, t0 = None, time.perf_counter()
    try:
        compiled, seconds = compile_step(trainer, state, batch)
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
        mem["total"] = (
            mem["arguments"]
            + mem["outputs"]
            - mem["aliased"]
            + mem["temporaries"]
            + mem["generated_code"]
        )
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
    else:  # the compiler refused: what it needed, from its message, on top of the state and batch
        m = _OOM.search(oom)
        temp = _xla_size(*m.group(1, 2)) if m else 0
        args = sum(part.values())
        mem = {
            "arguments": args,
            "outputs": args,
            "aliased": args,
            "temporaries": temp,
            "generated_code": 0,
            "total": args + temp,
        }
        cost = {}
    seg, tseg = full_rows_layout(c)
    cfg = trainer.model_cfg
    f = flops.step_flops(cfg, seg, tseg)
    out: dict[str, Any] = {
        "topology": topology,
        "devices": n,
        "device_kind": devices[0].device_kind,
        "mesh": {k: int(v) for k, v in trainer.mesh.shape.items()},
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
        "",
        "| per device | bytes | source |",
        "|---|---:|---|",
    ]
    rows = [
        ("params", "shapes and shardings"),
        ("opt_state", "shapes and shardings"),
        ("ema", "shapes and shardings"),
        ("batch", "shapes and shardings"),
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
            f"{_size(chip['hbm_per_device'])} | vdit.aot.CHIPS |"
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


def compile_report(config: ml_collections.ConfigDict, topology: str) -> dict[str, Any]:
    """`vdit compile`: the report for a TPU topology name, or "local" for this process's devices."""
    if topology == "local":
        devices, chip = jax.devices(), chip_for_device_kind(jax.devices()[0].device_kind)
    else:
        topo = parse_topology(topology)
        slices = int(config.mesh.get("dcn_data", 1))
        devices, chip = topology_devices(topo, slices), topo.chip
        topology = f"{topology} ({topo.name})" if topology != topo.name else topology
        topology += f" x {slices} slices" if slices > 1 else ""
    c = configlib.load(config, len(devices), plan_only=True)
    return report(c, devices, chip=chip, topology=topology)


# ---------------------------------------------------------------------------------------------------
# `vdit flops`
# ---------------------------------------------------------------------------------------------------
def flops_report(c: ml_collections.ConfigDict, batches: int = 4) -> dict[str, Any]:
    """Analytic FLOPs of one step of the loaded config `c`, averaged over `batches` packed batches
    of its data pipeline, or on :func:`full_rows_layout` when `batches` is 0 or the config's latents
    folder does not exist (``autoencoder.kind="latent"`` planned before `vdit encode`)."""
    cfg = configlib.model_config(c)
    readable = c.data.source != "latents" or os.path.isfile(
        os.path.join(c.data.latents.path, latents.MANIFEST)
    )
    if batches > 0 and readable:
        it = iter(pipeline.build(configlib.pipeline_config(c)))
        layouts = [
            (b["segment_ids"], b["text_segment_ids"]) for b in (next(it) for _ in range(batches))
        ]
        source = f"mean of {batches} packed batches of the data pipeline"
    else:
        layouts = [full_rows_layout(c)]
        source = "rows filled with samples of data.max_tokens_per_sample tokens"
    per = [flops.step_flops(cfg, seg, tseg) for seg, tseg in layouts]
    f = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
    slots = math.prod(layouts[0][0].shape)
    tokens = float(np.mean([(seg > 0).sum() for seg, _ in layouts]))
    return {
        "flops": f,
        "layout": source,
        "tokens_per_step": tokens,
        "slots_per_step": slots,
        "fill": tokens / slots,
        "attn_impl": cfg.attn_impl,
        "remat": cfg.remat,
        "matmul_per_token": flops.matmul_flops_per_token(cfg),
        "text_matmul_per_token": flops.text_matmul_flops_per_token(cfg),
    }


def format_flops(r: dict[str, Any]) -> str:
    f = r["flops"]
    rows = [
        ("matmul (executed, padding included)", f["matmul"]),
        ("matmul (useful tokens)", f["matmul_useful"]),
        ("  of which text tokens (executed)", f["text"]),
        ("attention (useful: same-segment pairs)", f["attention_useful"]),
        (f"attention (executed by {r['attn_impl']!r})", f["attention_executed"]),
        (f"recompute (remat {r['remat']!r})", f["recompute"]),
        ("total model FLOPs (useful; MFU numerator)", f["total_useful"]),
        ("total executed", f["total_executed"]),
    ]
    tot = f["total_executed"]
    lines = [
        f"FLOPs of one train step (forward + backward) on {r['layout']}: "
        f"{r['tokens_per_step']:,.0f} tokens in {r['slots_per_step']:,} slots "
        f"(fill {r['fill']:.3f})",
        "",
        "| part | FLOPs | share of executed |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {v:.4g} | {v / tot:.3f} |" for name, v in rows]
    lines += ["", "| forward FLOPs per token | video | text |", "|---|---:|---:|"]
    parts = {
        **{k: (v, None) for k, v in r["matmul_per_token"].items()},
        **{k: (None, v) for k, v in r["text_matmul_per_token"].items()},
    }
    for k, (v, t) in parts.items():
        lines.append(
            f"| {k} | {'' if v is None else f'{v:.4g}'} | {'' if t is None else f'{t:.4g}'} |"
        )
    lines.append(
        f"\nmodel FLOPs per useful token: {f['total_useful'] / max(r['tokens_per_step'], 1):.4g}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# `vdit params`
# ---------------------------------------------------------------------------------------------------
def param_table(c: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> str:
    """Every parameter's path, shape and PartitionSpec on the config's mesh over `devices` (default
    all), from abstract shapes only: what `vdit params` prints and tests/golden/ holds."""
    from vdit.parallel.sharding import describe
    from vdit.train.step import make_trainer

    trainer = make_trainer(c, None if devices is None else list(devices))
    rows = describe(trainer.abstract_state["params"], trainer.param_shardings)
    lines = [f"mesh {dict(trainer.mesh.shape)}"]
    lines += [f"{name:60s} {str(shape):24s} {spec}" for name, shape, spec in rows]
    lines.append(f"total parameters: {sum(math.prod(s) for _, s, _ in rows):,}")
    return "\n".join(lines)

"""TPU chips and slices: what each generation has, slice names, and compile-only slice devices.

    CHIPS["v5p"]                   HBM, bf16 peak, cores per chip (the MFU denominator, the HBM budget)
    parse_topology("v5p-8")        -> Topology(v5p, (2, 2, 1)): 4 chips, named "v5p:2x2x1"
    topology_devices(topology)     compile-only devices of the slice (libtpu, no TPU attached)

The mesh (vdit/parallel/mesh.py) is built over these devices exactly as over real ones, so a train
step can be compiled for a slice this machine does not have (vdit/aot.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

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
    Devices of several slices carry their `slice_index` (see `mesh.dcn_data`).

    ValueError (one line) without libtpu, or when another process holds libtpu's lock file on a
    machine with a TPU attached (vdit/__init__.py lifts the lock where no TPU is attached)."""
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ValueError(
            f"topology {topology.name} needs libtpu to compile for: pip install -e '.[tpu]' "
            "(or --topology=local for this machine's devices)"
        ) from None
    if "tpu" not in os.environ.get("JAX_PLATFORMS", "tpu"):
        # This process only compiles: do not take libtpu's single-process lock, which would stop
        # a training job or another compile on the same machine (and this one with them).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.name, num_slices=num_slices
        )
    except jax.errors.JaxRuntimeError as e:
        if "lockfile" not in str(e):
            raise
        raise ValueError(
            "libtpu is in use by another process on this machine (its lock file): compile with "
            "JAX_PLATFORMS=cpu, which needs no TPU runtime"
        ) from None
    return list(desc.devices)

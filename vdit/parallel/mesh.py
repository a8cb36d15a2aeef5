"""Device mesh from the config: axes ``data``, ``fsdp``, ``tensor``, ``sequence``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "sequence")


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill one ``-1`` axis with the devices left over; raise naming the axis when it cannot fit."""
    out = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    unknown = [a for a, s in out.items() if s == -1]
    for a, s in out.items():
        if s == 0 or s < -1:
            raise ValueError(f"mesh.{a}={s}: mesh axis sizes must be positive or -1")
    if len(unknown) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {unknown}")
    known = math.prod(s for s in out.values() if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"mesh.{unknown[0]}=-1: {num_devices} devices are not divisible by the product "
                f"{known} of the other axes {out}"
            )
        out[unknown[0]] = num_devices // known
    total = math.prod(out.values())
    if total != num_devices:
        raise ValueError(
            f"mesh {out} has {total} devices but {num_devices} are available; set one axis to -1 "
            "or change the sizes"
        )
    return out


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(dims, MESH_AXES, axis_types=auto, devices=devices)

"""Device mesh from the config: axes ``data``, ``fsdp``, ``tensor``, ``sequence``.

Multi-slice (several TPU slices joined by the data-center network, DCN): ``dcn_data`` slices each
hold the same (data, fsdp, tensor, sequence) layout over their fast interconnect (ICI), and the
``data`` axis spans the slices, outermost, so only data-parallel gradient reductions cross the DCN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
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


def make_mesh(
    sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None, dcn_data: int = 1
) -> Mesh:
    """The mesh of `sizes` (axis -> size, one may be -1) over `devices`, `dcn_data` slices deep."""
    devices = list(jax.devices() if devices is None else devices)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if dcn_data == 1:
        shape = resolve_mesh_shape(sizes, len(devices))
        dims = tuple(shape[a] for a in MESH_AXES)
        return jax.make_mesh(dims, MESH_AXES, axis_types=auto, devices=devices)
    if dcn_data < 1 or len(devices) % dcn_data:
        raise ValueError(
            f"mesh.dcn_data={dcn_data}: {len(devices)} devices do not split into "
            f"{dcn_data} equal slices"
        )
    ici = resolve_mesh_shape(sizes, len(devices) // dcn_data)
    ici_dims = tuple(ici[a] for a in MESH_AXES)
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) > 1:
        if len(slices) != dcn_data:
            raise ValueError(
                f"mesh.dcn_data={dcn_data} but the devices are in {len(slices)} slices"
            )
        array = mesh_utils.create_hybrid_device_mesh(
            ici_dims, (dcn_data,) + (1,) * (len(MESH_AXES) - 1), devices
        )
    else:  # one physical slice (or CPU): consecutive device groups play the slices
        array = np.asarray(devices, dtype=object).reshape(dcn_data * ici_dims[0], *ici_dims[1:])
    return Mesh(array, MESH_AXES, axis_types=auto)


def mesh_from_config(mesh: Mapping, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of a config's `mesh` section (axis sizes and `dcn_data`) over `devices`."""
    return make_mesh({a: mesh[a] for a in MESH_AXES}, devices, mesh.get("dcn_data", 1))

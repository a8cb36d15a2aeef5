"""Logical axis names -> mesh axes.

Models name the axes of their parameters and activations with logical names (``batch``, ``length``,
``embed``, ``heads``, ``mlp``, ...). One rules table (``config.sharding.rules``) maps each logical name
to a mesh axis, a tuple of mesh axes, or ``None`` (replicated). Changing the parallelism of a run is a
change of that table and of the mesh shape, never of the model.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Rules = Sequence[tuple[str, Any]]

# The default table: data parallel over `data`, parameters and batch sharded over `fsdp` (ZeRO-3 style),
# attention heads and MLP hidden units over `tensor`, tokens of a row over `sequence`.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("text_length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("patch", None),
    ("vocab", None),
    ("text_embed", "fsdp"),
    ("modulation", None),
    ("layers", None),
    ("channels", None),
    ("vae_in", None),  # input channels of VAE convolutions
    (
        "vae_out",
        "fsdp",
    ),  # output channels of VAE convolutions (replicated where fsdp does not divide)
)


def _as_tuple(axes: Any) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def logical_to_spec(
    names: Sequence[str | None] | None,
    rules: Rules,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> P:
    """PartitionSpec for an array whose dimensions carry the logical ``names``.

    A mesh axis is used at most once per array (the first dimension that asks for it gets it). Mesh axes
    of size 1 are dropped. With ``mesh`` and ``shape`` given, a dimension that the mesh axes do not divide
    is replicated instead (small parameters such as biases of tiny test models), so every table works
    with every model; `vdit.parallel.sharding.describe` shows where that happened.
    """
    if names is None:
        return P()
    table = {k: _as_tuple(v) for k, v in rules}
    used: set[str] = set()
    out: list[Any] = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules table")
        axes = [a for a in table[name] if a not in used]
        if mesh is not None:
            axes = [a for a in axes if mesh.shape[a] > 1]
            if shape is not None:
                size = 1
                for a in axes:
                    size *= mesh.shape[a]
                if shape[i] % size:
                    axes = []
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def logical_sharding(names, rules: Rules, mesh: Mesh, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


# ---------------------------------------------------------------------------------------------------
# Activation constraints: models call `constrain(x, ("batch", "length", "embed"))`; it is a no-op
# unless a mesh and rules table are active (`with activation_sharding(mesh, rules):`).
# ---------------------------------------------------------------------------------------------------
_CTX = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules) -> Iterator[None]:
    prev = getattr(_CTX, "value", None)
    _CTX.value = (mesh, tuple(rules)) if mesh is not None else None
    try:
        yield
    finally:
        _CTX.value = prev


def current() -> tuple[Mesh, tuple] | None:
    """The active (mesh, rules) of `activation_sharding`, or None."""
    return getattr(_CTX, "value", None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    ctx = getattr(_CTX, "value", None)
    if ctx is None:
        return x
    mesh, rules = ctx
    if len(names) != x.ndim:
        raise ValueError(
            f"constrain: {len(names)} names {tuple(names)} for an array of shape {x.shape}"
        )
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def param_shardings(abstract_state: Any, rules: Rules, mesh: Mesh) -> dict:
    """NamedShardings, as a pure dict, for an nnx State from its variables' logical axis names.

    The result has the structure of `nnx.to_pure_dict(state)`, which is how the train state holds
    parameters.
    """
    from flax import nnx

    out: dict = {}
    for path, var in nnx.to_flat_state(abstract_state):
        names = var.get_metadata().get("out_sharding")
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = NamedSharding(
            mesh, logical_to_spec(names, rules, mesh, var.get_value().shape)
        )
    return out


def describe(params: Any, shardings: Any) -> list[tuple[str, tuple[int, ...], str]]:
    """(path, shape, PartitionSpec) for every parameter: the table `vdit` prints and golden files hold."""
    rows = []
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sh in zip(flat_p, flat_s, strict=True):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        rows.append((name, tuple(leaf.shape), str(sh.spec)))
    return rows

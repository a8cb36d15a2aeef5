"""Sharded safetensors files, Hugging Face style: the tensor names, the writer and the checked reader.

    OUT/model-00001-of-00003.safetensors ... model-00003-of-00003.safetensors
    OUT/model.safetensors.index.json        {"metadata": {"total_size": ..., ...},
                                             "weight_map": {name: file}}

Names are a parameter's path in the model's tree joined by dots (`blocks.self_attn.q.kernel`,
`text_encoder.blocks.0.attn.q.kernel`). The DiT's scanned blocks keep their stacked layout: every
tensor under `blocks.` has the layer axis first (`blocks.self_attn.q.kernel` is (depth, D, D); layer
i is `[i]`), the layout the model computes with, so a tensor is written and read as one piece.

Tensors are assigned to files in name order, a new file starting where the next tensor would pass
the size cap (a tensor larger than the cap has a file of its own). The writer fetches one file's
tensors at a time from the (possibly sharded) arrays and writes them with `safetensors`: the host
holds one file's tensors, never the model. In a multi-process run every process takes part in
fetching each tensor (a collective gather for arrays spread over processes) and process p writes the
files i with i % process_count == p; process 0 writes the index.

Each file's header metadata carries a SHA-256 of its tensors (names, dtypes, shapes and bytes, in
name order), checked on every read: a truncated file fails to open, an altered one fails its
checksum, each with an error naming the file. Reading uses `safetensors` and `json` only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
DIGEST = "vdit_sha256"  # the header metadata key of a file's checksum


def names(tree: Any) -> dict[str, Any]:
    """{dotted name: leaf} of a nested dict (a pure-dict parameter tree), in name order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(str(k.key) for k in path): leaf for path, leaf in flat}


def unflatten(like: Any, by_name: Mapping[str, Any]) -> Any:
    """The tree of `like` (as `names` reads it) with each leaf replaced by `by_name[name]`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = [by_name[".".join(str(k.key) for k in path)] for path, _ in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def nest(flat: Mapping[str, Any]) -> dict:
    """The inverse of `names` without a template: {"a.0.b": x} -> {"a": {0: {"b": x}}} (digit keys
    become ints, as nnx's pure dicts have them)."""
    out: dict = {}
    for name, x in flat.items():
        node = out
        keys = [int(k) if k.isdigit() else k for k in name.split(".")]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = x
    return out


def plan(sizes: Mapping[str, int], max_file_bytes: int) -> list[list[str]]:
    """The tensors of each file: names in order, a new file where the next would pass the cap."""
    files: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if files[-1] and used + n > max_file_bytes:
            files.append([])
            used = 0
        files[-1].append(name)
        used += n
    return files


def floating(dtype: Any) -> bool:
    """Whether `dtype` is a floating type (bfloat16 included, which numpy does not count)."""
    return bool(jax.numpy.issubdtype(dtype, jax.numpy.floating))


def file_name(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of tensors: each one's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.name}|{a.shape}|".encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def fetch(x: Any) -> np.ndarray:
    """One whole tensor on this host; a collective of all processes for an array some of whose
    shards live on other processes. The host copy is made from a temporary device copy: jax keeps
    the host value of an array it converts for that array's life, which would keep every tensor
    of the model on the host."""
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        x = jax.numpy.copy(x)
    return np.asarray(x)


def write(
    out: str,
    tensors: Mapping[str, Any],
    *,
    dtype: Any,
    max_file_bytes: int,
    metadata: Mapping[str, str],
) -> dict:
    """Write `tensors` ({name: array}, any sharding) cast to `dtype` into size-capped files under
    `out` and the index; every process calls it. Returns the index."""
    dtype = np.dtype(dtype)
    cast = lambda x: x.astype(dtype) if floating(x.dtype) else x
    sizes = {
        n: int(np.prod(x.shape)) * (dtype if floating(x.dtype) else np.dtype(x.dtype)).itemsize
        for n, x in tensors.items()
    }
    files = plan(sizes, max_file_bytes)
    pid, count = jax.process_index(), jax.process_count()
    os.makedirs(out, exist_ok=True)
    weight_map = {}
    for i, members in enumerate(files):
        name = file_name(i, len(files))
        weight_map.update({n: name for n in members})
        mine = i % count == pid
        arrays = {}
        for n in members:
            host = fetch(cast(tensors[n]))  # the cast runs where the array lives
            if mine:
                arrays[n] = np.ascontiguousarray(host)
        if mine:
            path = os.path.join(out, name)
            header = {**metadata, DIGEST: digest(arrays), "written_by_process": str(pid)}
            save_file(arrays, path + ".tmp", metadata=header)
            os.replace(path + ".tmp", path)
        del arrays
    index = {
        "metadata": {**metadata, "total_size": sum(sizes.values())},
        "weight_map": weight_map,
    }
    if pid == 0:
        with open(os.path.join(out, INDEX), "w") as f:
            json.dump(index, f, indent=1)
    multihost_utils.sync_global_devices("vdit_export_safetensors_written")
    return index


def read_index(out: str) -> dict:
    path = os.path.join(out, INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{out}: no {INDEX}; give a directory written by `vdit export --format=safetensors`"
        )
    try:
        with open(path) as f:
            index = json.load(f)
        weight_map = index["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a safetensors index ({e}); export again") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path}: its weight_map is not a mapping; export again")
    return index


def check(out: str, expected: Mapping[str, tuple[int, ...]], what: str) -> dict:
    """Check the files' tensors against `expected` ({name: shape}, the model `what` describes)
    from the headers alone (no tensor data is read): the same names and shapes. Returns the index."""
    index = read_index(out)
    stored = set(index["weight_map"])
    missing, extra = sorted(set(expected) - stored), sorted(stored - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"has tensors the files lack ({', '.join(missing[:3])}...)")
        if extra:
            parts.append(f"lacks tensors the files hold ({', '.join(extra[:3])}...)")
        raise ValueError(
            f"{out}: the model {what} describes {' and '.join(parts)}: the config does not match "
            "the tensors; export again"
        )
    for fname, members in _by_file(index).items():
        with _open(out, fname) as f:
            keys = set(f.keys())
            if keys != set(members):
                raise ValueError(
                    f"{os.path.join(out, fname)}: holds {sorted(keys)[:3]}..., not the tensors "
                    f"{INDEX} assigns it; export again"
                )
            for n in members:
                shape = tuple(f.get_slice(n).get_shape())
                if shape != tuple(expected[n]):
                    raise ValueError(
                        f"{os.path.join(out, fname)}: tensor {n} has shape {shape}, the model "
                        f"{what} describes has {tuple(expected[n])}: the config does not match "
                        "the tensors; export again"
                    )
    return index


def read(out: str) -> Iterator[dict[str, np.ndarray]]:
    """The tensors of each file of `out` in turn ({name: array}), each file's checksum checked
    before it is given."""
    for fname in _by_file(read_index(out)):
        path = os.path.join(out, fname)
        with _open(out, fname) as f:
            try:
                arrays = {n: f.get_tensor(n) for n in f.keys()}
            except SafetensorError as e:
                raise ValueError(
                    f"{path}: unreadable safetensors file ({e}); export again"
                ) from None
            stored = (f.metadata() or {}).get(DIGEST)
        if stored is None:
            raise ValueError(
                f"{path}: its header holds no {DIGEST} checksum; export again with vdit"
            )
        if digest(arrays) != stored:
            raise ValueError(
                f"{path}: its tensors do not match the checksum written with them (the file was "
                "altered or damaged); export again"
            )
        yield arrays


def _by_file(index: dict) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    for n, fname in index["weight_map"].items():
        files.setdefault(fname, []).append(n)
    return dict(sorted(files.items()))


def _open(out: str, fname: str):
    path = os.path.join(out, fname)
    if os.path.basename(fname) != fname or not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (named in {INDEX}); export again")
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise ValueError(
            f"{path}: truncated or not a safetensors file ({e}); export again"
        ) from None

"""`export(workdir, out, fmt=...)`: one set of a checkpoint's parameters (EMA or raw, in float32 or
bfloat16) written as safetensors, a params-only orbax checkpoint, or StableHLO programs.

The parameters are restored sharded over every device of every process on the `fsdp` axis
(`load(..., shard=True)`), so no host holds the whole model; the safetensors writer then fetches
one file's tensors at a time. Every process calls `export` together. `export.json`, written last,
marks a complete export.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vdit.export import tensors
from vdit.train import load as loader
from vdit.train.checkpoint import read_config

FORMATS = ("safetensors", "orbax", "stablehlo")
DTYPES = ("float32", "bfloat16")
MAX_FILE_BYTES = 2 << 30  # safetensors files of at most 2 GiB (one larger tensor gets its own)


def version() -> str:
    try:
        return importlib.metadata.version("vdit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def export(
    workdir: str,
    out: str,
    *,
    fmt: str = "safetensors",
    step: int | None = None,
    ema: bool | None = None,
    dtype: str = "float32",
    max_file_bytes: int = MAX_FILE_BYTES,
    shape: Sequence[int] | None = None,
    batch: int = 1,
    platforms: Sequence[str] = ("cpu", "tpu", "cuda"),
) -> dict:
    """Export the checkpoint of `workdir` at `step` (default: the latest) to the new directory
    `out`; returns a summary (files and their bytes). `ema=None` takes the config's choice."""
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt}: not one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype}: not one of {', '.join(DTYPES)}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out={out}: exists and is not an empty directory; give a new one")
    if loader.is_export(workdir):
        raise ValueError(f"--workdir={workdir} is an export; give the work directory of a run")
    multihost_utils.sync_global_devices("vdit_export_checked")  # every process saw `out` empty
    loaded = loader.load(workdir, step, ema=ema, shard=True)
    c = loaded.config
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    named = tensors.names(loaded.params)
    if loaded.buffers is not None:
        named.update(tensors.names(loaded.buffers))
    meta = {
        "format": fmt,
        "kind": c.get("kind", "dit"),
        "step": loaded.step,
        "workdir": os.path.abspath(workdir),
        "vdit_version": version(),
        "params": "ema" if loaded.ema else "raw",
        "dtype": dtype,
        "names": "tree paths joined by '.'; tensors under 'blocks.' have the layer axis first",
        "tensors": {n: list(x.shape) for n, x in named.items()},
    }
    os.makedirs(out, exist_ok=True)
    if fmt == "orbax":
        cast = lambda x: x.astype(np_dtype) if tensors.floating(x.dtype) else x
        tree = {"params": jax.tree.map(cast, loaded.params)}
        if loaded.buffers is not None:
            tree["stats"] = loaded.buffers  # the latent statistics keep their dtype
        with ocp.PyTreeCheckpointer() as ckpt:
            ckpt.save(os.path.join(os.path.abspath(out), loader.ORBAX_PARAMS), tree)
    else:
        header = {k: str(v) for k, v in meta.items() if k != "tensors"}
        header["format"] = "vdit"
        tensors.write(out, named, dtype=np_dtype, max_file_bytes=max_file_bytes, metadata=header)
        if fmt == "stablehlo":
            from vdit.export import stablehlo

            meta["stablehlo"] = stablehlo.export(
                out,
                loaded,
                dtype=np_dtype,
                shape=tuple(shape or c.sample.grid_shape),
                batch=batch,
                platforms=tuple(platforms),
            )["programs"]
    stored = read_config(os.path.join(workdir, "checkpoints"), loaded.step)
    if jax.process_index() == 0:
        with open(os.path.join(out, loader.EXPORT_CONFIG), "w") as f:
            json.dump(_json_config(stored), f, indent=1)
        with open(os.path.join(out, loader.EXPORT), "w") as f:  # last: the export is complete
            json.dump(meta, f, indent=1)
    multihost_utils.sync_global_devices("vdit_export_done")
    files = sorted(
        os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs
    )
    total = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    return {
        "out": out,
        "format": fmt,
        "step": loaded.step,
        "params": meta["params"],
        "dtype": dtype,
        "tensors": len(named),
        "files": len(files),
        "bytes": total,
    }


def _json_config(stored: dict) -> dict:
    return json.loads(ml_collections.ConfigDict(stored).to_json_best_effort())

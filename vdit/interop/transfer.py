"""`vdit import` and `vdit export --format=diffusers`: Wan2.1 weights into a `vdit export` directory
and back out as a diffusers model folder.

    import_diffusers(src, out, base)   src: a `WanTransformer3DModel` folder, or a pipeline folder
                                       with transformer/ (and vae/, imported to OUT/vae when this
                                       vdit has the Wan VAE mapping, vdit/interop/wan_vae.py)
    export_diffusers(workdir, out)     a run's checkpoint (or any `vdit export` directory) -> a
                                       folder `WanTransformer3DModel.from_pretrained` reads

The import holds the vdit model it builds and one source tensor at a time; the export fetches one
layer's tensor at a time from the (sharded) parameters.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from safetensors import safe_open

from vdit import configlib
from vdit.export import tensors
from vdit.export.writer import MAX_FILE_BYTES, version
from vdit.interop import diffusers_io, wan_dit
from vdit.train import load as loader

log = logging.getLogger(__name__)
VAE_MODULE = "vdit.interop.wan_vae"  # the Wan VAE's mapping (vae_config_from_diffusers, ...)


def _new_dir(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out={out}: exists and is not an empty directory; give a new one")
    os.makedirs(out, exist_ok=True)


def _write_export(
    out: str,
    c: ml_collections.ConfigDict,
    named: dict[str, np.ndarray],
    *,
    source: str,
    kind: str,
    dtype: str,
    max_file_bytes: int,
) -> None:
    """A safetensors `vdit export` directory of step 0 holding `named` ({vdit name: array})."""
    meta = {
        "format": "safetensors",
        "kind": kind,
        "step": 0,
        "workdir": None,
        "imported_from": os.path.abspath(source),
        "vdit_version": version(),
        "params": "raw",
        "dtype": dtype,
        "names": "tree paths joined by '.'; tensors under 'blocks.' have the layer axis first",
        "tensors": {n: list(x.shape) for n, x in named.items()},
    }
    header = {k: str(v) for k, v in meta.items() if k != "tensors"}
    header["format"] = "vdit"
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    tensors.write(out, named, dtype=np_dtype, max_file_bytes=max_file_bytes, metadata=header)
    with open(os.path.join(out, loader.EXPORT_CONFIG), "w") as f:
        json.dump(json.loads(c.to_json_best_effort()), f, indent=1)
    with open(os.path.join(out, loader.EXPORT), "w") as f:  # last: the export is complete
        json.dump(meta, f, indent=1)


def import_diffusers(
    src: str,
    out: str,
    base: ml_collections.ConfigDict,
    *,
    dtype: str = "float32",
    max_file_bytes: int = MAX_FILE_BYTES,
) -> dict:
    """Write the Wan2.1 transformer of the diffusers folder `src` (and its VAE) as the `vdit
    export` directory `out`, its config `base` with the model's settings from config.json."""
    folder = diffusers_io.model_folder(src, "transformer")
    c = wan_dit.config_from_diffusers(diffusers_io.read_config(folder), base)
    pipeline = folder != src
    vae_dir = os.path.join(src, "vae")
    vae = pipeline and os.path.isfile(os.path.join(vae_dir, diffusers_io.CONFIG))
    has_vae_mapping = importlib.util.find_spec(VAE_MODULE) is not None
    if vae and has_vae_mapping:
        with c.unlocked():
            c.autoencoder.kind = "latent"
            c.autoencoder.vae = os.path.join(out, "vae")
    c = configlib.load(c, plan_only=True)  # validated as a config for sampling and fine-tuning
    _new_dir(out)
    with diffusers_io.Tensors(folder) as source:
        named = wan_dit.lazy_params_from_diffusers(source, c)  # made one at a time, as written
        _write_export(
            out,
            c,
            named,
            source=folder,
            kind="dit",
            dtype=dtype,
            max_file_bytes=max_file_bytes,
        )
    summary = {
        "out": out,
        "transformer": folder,
        "tensors": len(named),
        "parameters": int(sum(np.prod(x.shape) for x in named.values())),
        "dtype": dtype,
    }
    del named
    if vae and not has_vae_mapping:
        log.warning("skipped %s: this vdit has no Wan VAE mapping (%s)", vae_dir, VAE_MODULE)
        summary["vae"] = f"skipped: no {VAE_MODULE}"
    elif vae:
        summary["vae"] = _import_vae(vae_dir, os.path.join(out, "vae"), dtype, max_file_bytes)
    return summary


def _import_vae(folder: str, out: str, dtype: str, max_file_bytes: int) -> str:
    """The diffusers AutoencoderKLWan of `folder` as the `vdit export` directory `out`, by the
    Wan VAE mapping's agreed functions."""
    wan_vae = importlib.import_module(VAE_MODULE)
    c = wan_vae.vae_config_from_diffusers(diffusers_io.read_config(folder))
    _new_dir(out)
    with diffusers_io.Tensors(folder) as source:
        params, buffers = wan_vae.params_from_diffusers(source, c)
    # the latent statistics (buffers) sit beside the parameters' names, as `vdit.train.load` reads them
    named = {**tensors.names(params), **tensors.names(buffers)}
    _write_export(
        out,
        c,
        {n: np.asarray(x) for n, x in named.items()},
        source=folder,
        kind="vae",
        dtype=dtype,
        max_file_bytes=max_file_bytes,
    )
    return out


class _ExportTensors:
    """The tensors of a safetensors `vdit export` directory, a layer at a time: the files' names,
    shapes and checksums are checked first (each file read once, one at a time), then
    `slice(name)` gives a lazily read tensor whose `[i]` reads layer i alone."""

    def __init__(self, out: str, shapes: dict[str, tuple[int, ...]]):
        self.out = out
        index = tensors.check(out, shapes, f"{out}/{loader.EXPORT_CONFIG}")
        for _ in tensors.read(out):  # every file's checksum, one file in memory at a time
            pass
        self.file = dict(index["weight_map"])
        self.handles: dict[str, Any] = {}

    def __enter__(self) -> _ExportTensors:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles.values():
            h.__exit__(None, None, None)

    def slice(self, name: str):
        fname = self.file[name]
        if fname not in self.handles:
            h = safe_open(os.path.join(self.out, fname), framework="numpy")
            self.handles[fname] = h.__enter__()
        return _Lazy(self.handles[fname].get_slice(name))


class _Lazy:
    """A stored tensor: `[i]` reads one layer, `np.asarray` all of it."""

    def __init__(self, sl):
        self.sl = sl

    def __getitem__(self, i):
        return self.sl[i]

    def __array__(self, dtype=None, copy=None):
        a = self.sl[:]
        return a if dtype is None else a.astype(dtype)


def _export_vae(workdir, out, step, ema, dtype, max_file_bytes) -> dict:
    """A Wan-architecture VAE (a run or an export) as a diffusers `AutoencoderKLWan` folder."""
    wan_vae = importlib.import_module(VAE_MODULE)
    loaded = loader.load(workdir, step, ema=ema, shard=not loader.is_export(workdir))
    c = loaded.config
    if c.vae.get("arch", "vdit") != "wan":
        raise ValueError(
            f"--workdir={workdir}: a VAE of arch {c.vae.get('arch', 'vdit')!r}; "
            "--format=diffusers exports the Wan architecture (vae.arch='wan') only"
        )
    config = wan_vae.diffusers_config(c, loaded.buffers)
    _new_dir(out)
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    named = wan_vae.params_to_diffusers(loaded.params, loaded.buffers, c)
    files = diffusers_io.write(
        out,
        {n: (tuple(a.shape), np_dtype) for n, a in named.items()},
        lambda n: np.asarray(named[n]).astype(np_dtype),
        config,
        max_file_bytes=max_file_bytes,
    )
    return _summary(
        out, wan_vae.CLASS, loaded.step, "ema" if loaded.ema else "raw", dtype, len(named), files
    )


def _summary(out, cls, step, params, dtype, n_tensors, files) -> dict:
    """What `vdit export --format=diffusers` prints of a folder it wrote."""
    return {
        "out": out,
        "format": "diffusers",
        "class": cls,
        "step": step,
        "params": params,
        "dtype": dtype,
        "tensors": n_tensors,
        "files": len(files),
        "bytes": sum(os.path.getsize(os.path.join(out, f)) for f in files),
    }


def export_diffusers(
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    ema: bool | None = None,
    dtype: str = "float32",
    max_file_bytes: int = MAX_FILE_BYTES,
) -> dict:
    """The DiT of `workdir` (a run's checkpoint at `step`, or a `vdit export` directory) as a
    diffusers `WanTransformer3DModel` folder `out`; a Wan-architecture VAE as an
    `AutoencoderKLWan` folder."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype={dtype}: not one of float32, bfloat16")
    if jax.process_count() > 1:
        raise ValueError(
            "--format=diffusers runs in one process; run it without the multi-process flags"
        )
    if loader.is_export(workdir):
        c = loader.read_export(workdir)[1]
    else:
        c = loader.read_config(workdir, step)[0]
    if c.get("kind", "dit") == "vae":
        return _export_vae(workdir, out, step, ema, dtype, max_file_bytes)
    if c.get("kind", "dit") != "dit":
        raise ValueError(
            f"--workdir={workdir}: a {c.kind} model; --format=diffusers exports the DiT or the VAE"
        )
    config = wan_dit.diffusers_config(c)  # refuses a model Wan's cannot hold, before loading
    _new_dir(out)
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    if loader.is_export(workdir) and loader.read_export(workdir)[0]["format"] == "safetensors":
        # an export or an import: read layer by layer from its files, after checking them
        meta = loader.read_export(workdir)[0]
        if ema is not None and ema != (meta["params"] == "ema"):
            raise ValueError(f"{workdir} holds the {meta['params']} parameters only")
        shapes = {n: s for n, (s, _) in wan_dit.abstract_params(c).items()}
        with _ExportTensors(workdir, shapes) as source:
            specs, get = wan_dit.params_to_diffusers(source.slice, c)
            files = diffusers_io.write(
                out,
                {n: (shape, np_dtype) for n, (shape, _) in specs.items()},
                lambda n: get(n).astype(np_dtype),
                config,
                max_file_bytes=max_file_bytes,
            )
        step_done, params = int(meta["step"]), meta["params"]
    else:
        loaded = loader.load(workdir, step, ema=ema, shard=not loader.is_export(workdir))
        flat = tensors.names(loaded.params)
        specs, get = wan_dit.params_to_diffusers(flat.__getitem__, loaded.config)
        files = diffusers_io.write(
            out,
            {n: (shape, np_dtype) for n, (shape, _) in specs.items()},
            lambda n: get(n).astype(np_dtype),
            config,
            max_file_bytes=max_file_bytes,
        )
        step_done, params = loaded.step, "ema" if loaded.ema else "raw"
    return _summary(out, wan_dit.CLASS, step_done, params, dtype, len(specs), files)

"""diffusers model folders: `config.json` plus safetensors weights, read lazily and written back.

    FOLDER/config.json                                         {"_class_name": ..., settings}
    FOLDER/diffusion_pytorch_model.safetensors                 one file, or
    FOLDER/diffusion_pytorch_model-0000i-of-0000N.safetensors  shards, with
    FOLDER/diffusion_pytorch_model.safetensors.index.json      {"weight_map": {name: file}}

A pipeline folder holds one such folder per part (`transformer/`, `vae/`, `text_encoder/`, ...);
`model_folder` finds the part. Reading opens the files with `safetensors` and hands one tensor at a
time (`Tensors`, a mapping), so a converter holds the model it builds and one source tensor, never
both whole models. bfloat16 tensors read and write as `ml_dtypes.bfloat16` numpy arrays.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator, Mapping

import ml_dtypes  # noqa: F401  (numpy learns bfloat16, which safetensors' numpy reader needs)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model"
INDEX = f"{WEIGHTS}.safetensors.index.json"


def model_folder(path: str, part: str) -> str:
    """`path` if it is a model folder (config.json), else its `part` subfolder (a pipeline)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--from={path}: no such directory")
    if os.path.isfile(os.path.join(path, CONFIG)):
        return path
    sub = os.path.join(path, part)
    if os.path.isfile(os.path.join(sub, CONFIG)):
        return sub
    raise FileNotFoundError(
        f"--from={path}: neither a diffusers model folder (config.json and safetensors) nor a "
        f"pipeline folder with {part}/config.json"
    )


def read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {CONFIG}; give a diffusers model folder") from None
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")
    return cfg


class Tensors(Mapping):
    """{name: np.ndarray} over a folder's safetensors files; a tensor is read when it is looked up.
    Names iterate file by file, and a file is closed once each of its tensors has been read, so a
    reader that takes the tensors in that order maps at most one file at a time. Use as a context
    manager (it closes what is still open)."""

    def __init__(self, folder: str):
        self.folder = folder
        index = sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json")))
        if len(index) > 1:
            raise ValueError(f"{folder}: several safetensors indexes ({index}); keep one")
        if index:
            try:
                with open(index[0]) as f:
                    weight_map = json.load(f)["weight_map"]
                self._file = {str(n): str(f) for n, f in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index[0]}: not a safetensors index ({e})") from None
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(f"{folder}/*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{folder}: no *.safetensors files")
            self._file = {}
            for fname in files:
                with self._open(fname) as f:
                    for n in f.keys():
                        if n in self._file:
                            raise ValueError(
                                f"{folder}: tensor {n} is in {self._file[n]} and {fname}"
                            )
                        self._file[n] = fname
        self._handles: dict[str, object] = {}
        self._unread: dict[str, set[str]] = {}
        for n, fname in self._file.items():
            self._unread.setdefault(fname, set()).add(n)

    def _open(self, fname: str):
        path = os.path.join(self.folder, fname)
        if os.path.basename(fname) != fname or not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing (named in the safetensors index)")
        try:
            return safe_open(path, framework="numpy")
        except SafetensorError as e:
            raise ValueError(f"{path}: truncated or not a safetensors file ({e})") from None

    def __enter__(self) -> Tensors:
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()

    def _handle(self, name: str):
        fname = self._file[name]
        if fname not in self._handles:
            h = self._open(fname)
            h.__enter__()
            self._handles[fname] = h
        return self._handles[fname]

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from its file's header (no data read)."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def __getitem__(self, name: str) -> np.ndarray:
        h = self._handle(name)
        fname = self._file[name]
        if name not in h.keys():
            raise ValueError(f"{self.folder}/{fname}: lacks {name} (its index names it)")
        a = h.get_tensor(name)
        self._unread[fname].discard(name)
        if not self._unread[fname]:  # every tensor of the file read: unmap it
            self._handles.pop(fname).__exit__(None, None, None)
        return a

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._file, key=lambda n: (self._file[n], n)))

    def __len__(self) -> int:
        return len(self._file)


def write(
    folder: str,
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    get: Callable[[str], np.ndarray],
    config: dict,
    *,
    max_file_bytes: int,
) -> list[str]:
    """A diffusers model folder: config.json and the tensors `specs` names ({name: (shape,
    dtype)}), each made by `get(name)` while its file is written, in files of at most
    `max_file_bytes` (one file without an index when all fit, as diffusers writes). Returns the
    files written."""
    os.makedirs(folder, exist_ok=True)
    sizes = {n: int(np.prod(s)) * np.dtype(d).itemsize for n, (s, d) in sorted(specs.items())}
    files: list[list[str]] = [[]]
    used = 0
    for n, size in sizes.items():
        if files[-1] and used + size > max_file_bytes:
            files.append([])
            used = 0
        files[-1].append(n)
        used += size
    names = (
        [f"{WEIGHTS}.safetensors"]
        if len(files) == 1
        else [f"{WEIGHTS}-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )
    for fname, members in zip(names, files, strict=True):
        arrays = {n: np.ascontiguousarray(get(n)) for n in members}
        save_file(arrays, os.path.join(folder, fname), metadata={"format": "pt"})
        del arrays
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {n: f for f, members in zip(names, files, strict=True) for n in members},
        }
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump(index, f, indent=1)
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(config, f, indent=1)
    return [*names, CONFIG] + ([INDEX] if len(files) > 1 else [])

"""`vdit import`: open Wan2.1 weights (a diffusers folder) -> a `vdit export` directory that `vdit
sample --checkpoint`, `train.init_from` and `vdit export --format=diffusers` read (vdit/interop/)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from vdit.cli.base import Command, UsageError, define_config


def _import_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    define_config(
        fv,
        argv,
        "The vdit config the imported model trains and samples with (configs/wan.py); its model "
        "sizes and options are replaced by those of the diffusers config.json.",
    )
    flags.DEFINE_string(
        "from",
        None,
        "A diffusers WanTransformer3DModel folder (config.json + safetensors, sharded or not) or "
        "a pipeline folder with transformer/ (and vae/).",
        flag_values=fv,
    )
    flags.DEFINE_string("out", None, "The new export directory (new, or empty).", flag_values=fv)
    flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16"], "Dtype of the written tensors.", flag_values=fv
    )
    flags.DEFINE_float("max_file_mb", 2048, "Largest safetensors file in MiB.", flag_values=fv)


def _import(fv: flags.FlagValues) -> None:
    from vdit.interop.transfer import import_diffusers

    if fv.max_file_mb <= 0:
        raise UsageError(f"--max_file_mb={fv.max_file_mb}: must be > 0")
    summary = import_diffusers(
        fv["from"].value,
        fv.out,
        fv.config,
        dtype=fv.dtype,
        max_file_bytes=int(fv.max_file_mb * (1 << 20)),
    )
    print(json.dumps(summary))


IMPORT = Command(
    name="import",
    summary="open Wan2.1 weights (diffusers format) -> a vdit export for sample / init_from",
    usage="--config=configs/wan.py --from=DIFFUSERS_DIR --out=DIR [--dtype=float32|bfloat16]",
    example="vdit import --config=configs/wan.py --from=Wan2.1-T2V-1.3B-Diffusers "
    "--out=imports/wan13b",
    define=_import_flags,
    run=_import,
    required=(
        ("config", "the config to fine-tune and sample with, e.g. --config=configs/wan.py"),
        ("from", "a diffusers model or pipeline folder, e.g. --from=Wan2.1-T2V-1.3B-Diffusers"),
        ("out", "a new directory for the import, e.g. --out=imports/wan13b"),
    ),
    notes="The output is a safetensors `vdit export` directory (step 0): sample from it with "
    "`vdit sample --checkpoint=DIR`, fine-tune from it with `vdit train "
    "--config.train.init_from=DIR`, write it back with `vdit export --workdir=DIR "
    "--format=diffusers`. Missing, unknown or mis-shaped tensors are named in one error. "
    "BUILD.md, 'Wan2.1 weights', walks through it.",
)

COMMANDS = (IMPORT,)

"""`vdit export`: a trained model's parameters out of its work directory, as safetensors, a
params-only orbax checkpoint (for `train.init_from`) or StableHLO programs (vdit/export/)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from vdit.cli.base import Command, UsageError


def _export_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    flags.DEFINE_string(
        "workdir", None, "The work directory of a `vdit train` run.", flag_values=fv
    )
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
    flags.DEFINE_string("out", None, "The export directory (new, or empty).", flag_values=fv)
    flags.DEFINE_enum(
        "format",
        "safetensors",
        ["safetensors", "orbax", "stablehlo", "diffusers"],
        "safetensors: sharded files + index + config.json; orbax: a params-only checkpoint "
        "(train.init_from); stablehlo: the DiT's forward pass and guided sampling step, "
        "serialized with jax.export, the parameters alongside as safetensors; diffusers: a "
        "Wan2.1-architecture DiT (configs/wan.py) as a WanTransformer3DModel folder, or a "
        "vae.arch='wan' VAE as an AutoencoderKLWan folder (--workdir may also be a `vdit export` "
        "or `vdit import` directory).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "params",
        None,
        ["ema", "raw"],
        "Which parameters (default: the config's sample.use_ema; the EMA for the VAE).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16"], "Dtype of the written tensors.", flag_values=fv
    )
    flags.DEFINE_float(
        "max_file_mb",
        2048,
        "safetensors: largest file in MiB; more tensors go to further files.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "shape",
        None,
        "stablehlo: FRAMES,HEIGHT,WIDTH of the samples the programs take (default: the "
        "config's sample.grid_shape).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "batch", 1, "stablehlo: samples per call (the forward pass takes 2x rows).", flag_values=fv
    )
    flags.DEFINE_string(
        "platforms",
        "cpu,tpu,cuda",
        "stablehlo: the platforms the programs are lowered for (comma-separated).",
        flag_values=fv,
    )


def _shape(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--shape={value}: expected FRAMES,HEIGHT,WIDTH, e.g. --shape=8,32,32")
    return shape


def _export(fv: flags.FlagValues) -> None:
    from vdit.export.writer import export

    if fv.batch < 1:
        raise UsageError(f"--batch={fv.batch}: must be >= 1")
    if fv.max_file_mb <= 0:
        raise UsageError(f"--max_file_mb={fv.max_file_mb}: must be > 0")
    platforms = tuple(p for p in fv.platforms.split(",") if p)
    bad = sorted(set(platforms) - {"cpu", "tpu", "cuda", "rocm"})
    if bad or not platforms:
        raise UsageError(f"--platforms={fv.platforms}: give some of cpu,tpu,cuda,rocm")
    try:
        if fv.format == "diffusers":
            from vdit.interop.transfer import export_diffusers

            summary = export_diffusers(
                fv.workdir,
                fv.out,
                step=fv.step,
                ema=None if fv.params is None else fv.params == "ema",
                dtype=fv.dtype,
                max_file_bytes=int(fv.max_file_mb * (1 << 20)),
            )
            print(json.dumps(summary))
            return
        summary = export(
            fv.workdir,
            fv.out,
            fmt=fv.format,
            step=fv.step,
            ema=None if fv.params is None else fv.params == "ema",
            dtype=fv.dtype,
            max_file_bytes=int(fv.max_file_mb * (1 << 20)),
            shape=_shape(fv.shape),
            batch=fv.batch,
            platforms=platforms,
        )
    except FileNotFoundError as e:
        raise UsageError(
            f"--workdir={fv.workdir}: {e}; give the work directory of a `vdit train` run that "
            "saved a checkpoint (and a --step it holds)"
        ) from None
    print(json.dumps(summary))


EXPORT = Command(
    name="export",
    summary="write a trained model's parameters as safetensors, params-only orbax, or StableHLO",
    usage="--workdir=DIR --out=DIR [--step=N] [--format=safetensors|orbax|stablehlo|diffusers] "
    "[--params=ema|raw] [--dtype=float32|bfloat16]",
    example="vdit export --workdir=runs/default --out=exports/default --format=safetensors",
    define=_export_flags,
    run=_export,
    required=(
        ("workdir", "the work directory of a `vdit train` run, e.g. --workdir=runs/default"),
        ("out", "a new directory for the export, e.g. --out=exports/default"),
    ),
    distributed=True,
    notes="`vdit sample --checkpoint=OUT` samples from a safetensors export; "
    "`vdit train --config.train.init_from=OUT` starts a run from an orbax (or safetensors) export "
    "with a fresh optimizer at step 0. In a multi-process run every process reads its shards and "
    "writes its own safetensors files. BUILD.md, 'Exporting checkpoints', describes the layouts.",
)

COMMANDS = (EXPORT,)

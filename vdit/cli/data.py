"""`vdit prepare` and `vdit encode`: videos -> records -> VAE latents, for training."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags

from vdit.cli.base import Command, UsageError, define_config


def _progress(line: str) -> None:
    print(line, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# vdit prepare
# ----------------------------------------------------------------------------------------------
def _prepare_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    define_config(
        fv,
        argv,
        "Prepare settings (configs/prepare.py): shots, filters, captioner, text encoder, runner. "
        "Without it every stage is off (one record per file).",
    )
    flags.DEFINE_string(
        "input",
        None,
        "Folder of videos and images (walked recursively), a glob, or a .txt list of paths.",
        flag_values=fv,
    )
    flags.DEFINE_string("out", None, "Output folder for the shards; must be empty.", flag_values=fv)
    flags.DEFINE_string(
        "captions",
        None,
        'JSON Lines file of {"file": path relative to --input, "caption": text}; files without '
        "a line use a sidecar NAME.txt, else an empty caption.",
        flag_values=fv,
    )
    flags.DEFINE_integer("shard_size", 1000, "Records per shard.", flag_values=fv)
    flags.DEFINE_integer("max_frames", 0, "Keep the first N frames (0 = all).", flag_values=fv)
    flags.DEFINE_integer(
        "max_side",
        0,
        "Downsize to at most N pixels on the longer side, aspect kept (0 = native).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "encoding",
        "raw",
        ["raw", "mp4"],
        "Frames stored raw (lossless) or as H.264 MP4 (lossy, much smaller, decoded when training "
        "reads them); images are always raw.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "workers",
        0,
        "Files decoded at a time in worker processes (0 = in this process); the output does not "
        "depend on it.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "runner",
        "local",
        ["local", "beam"],
        "local: a process pool on this host; beam: an Apache Beam pipeline (DirectRunner, or the "
        "runner in --beam_options). The output does not depend on it.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "beam_options",
        "",
        'Beam pipeline options for --runner=beam, e.g. "--runner=FlinkRunner --flink_master=H:P".',
        flag_values=fv,
    )


_OPTION_FLAGS = (
    "shard_size",
    "max_frames",
    "max_side",
    "encoding",
    "workers",
    "runner",
    "beam_options",
)


def _prepare(fv: flags.FlagValues) -> None:
    import dataclasses

    from vdit.data import prepare

    input_dir, out = fv.input, fv.out
    try:
        if fv.config is not None:  # its fields, then the flags given on the command line
            options = prepare.options_from_config(fv.config)
            given = {k: fv[k].value for k in _OPTION_FLAGS if fv[k].present}
            options = dataclasses.replace(options, **given)
        else:
            options = prepare.PrepareOptions(**{k: fv[k].value for k in _OPTION_FLAGS})
        manifest = prepare.prepare(input_dir, out, fv.captions, options, progress=_progress)
    except (ValueError, OSError, ImportError) as e:
        # a missing input, a used output folder, a bad captions file or config field, a stage
        # whose extra is not installed
        raise UsageError(str(e)) from None
    print(prepare.summary(manifest))
    print(
        json.dumps(
            {
                "out": out,
                "written": manifest["written"],
                "skipped": manifest["skipped_count"],
                "shards": len(manifest["shards"]),
            }
        )
    )


PREPARE = Command(
    name="prepare",
    summary="decode a folder of videos and images into record shards (data.source='records')",
    usage="--input=DIR|GLOB|LIST.txt --out=DIR [--config=configs/prepare.py] "
    "[--captions=FILE.jsonl] [--shard_size=N] [--max_frames=N] [--max_side=N] "
    "[--encoding=raw|mp4] [--workers=N] [--runner=local|beam] [--beam_options=...]",
    example="vdit prepare --input=videos/ --out=data/videos --captions=captions.jsonl",
    define=_prepare_flags,
    run=_prepare,
    required=(
        ("input", "the folder of videos and images to prepare"),
        ("out", "the output folder for the shards (empty or new)"),
    ),
    notes="Files that cannot be used are listed by reason and skipped, never fatal. With "
    "--config=configs/prepare.py videos are cut into shots, clips are scored and filtered (counted "
    "by name in manifest.json, shown in report.md), and optionally captioned and embedded.",
)


# ----------------------------------------------------------------------------------------------
# vdit encode
# ----------------------------------------------------------------------------------------------
def _encode_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    define_config(
        fv,
        argv,
        "The DiT config that trains on the latents (configs/latent.py[:VARIANT]): its patch "
        "(model.patch_t, the variant's p), data.max_tokens_per_sample, data.time_fit, "
        "data.frame_stride and data.max_fps decide every latent's size.",
    )
    flags.DEFINE_string(
        "vae",
        None,
        "The VAE work directory (vdit train --config=configs/vae.py), or a `vdit export` "
        "directory of a VAE (an imported one: vdit import).",
        flag_values=fv,
    )
    flags.DEFINE_integer("vae_step", -1, "The VAE checkpoint step (-1: latest).", flag_values=fv)
    flags.DEFINE_string(
        "input",
        None,
        "Records written by `vdit prepare`: a folder or a glob.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "out",
        None,
        "Output folder for the latent shards; must be empty.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "chunk_frames",
        16,
        "Pixel frames per encoder call after the first (exact; bounds memory in time; 0: whole "
        "videos).",
        flag_values=fv,
    )
    flags.DEFINE_integer("tile", 0, "Spatial tiles of N latent pixels (0: none).", flag_values=fv)
    flags.DEFINE_integer(
        "tile_overlap", 4, "Latent pixels neighbouring tiles share.", flag_values=fv
    )
    flags.DEFINE_enum(
        "store",
        "moments",
        ["moments", "sample"],
        "Store the posterior mean and log-variance, or one sample.",
        flag_values=fv,
    )
    flags.DEFINE_integer("shard_size", 1000, "Records per shard.", flag_values=fv)
    flags.DEFINE_integer(
        "seed", 0, "Seed of the posterior samples of --store=sample.", flag_values=fv
    )


def _encode(fv: flags.FlagValues) -> None:
    import jax

    from vdit import encode
    from vdit.parallel import distributed

    out = fv.out
    options = encode.options_from_config(
        fv.config,
        chunk_frames=fv.chunk_frames,
        tile=fv.tile,
        tile_overlap=fv.tile_overlap,
        store=fv.store,
        shard_size=fv.shard_size,
        seed=fv.seed,
    )
    manifest = encode.encode_dataset(
        fv.vae,
        fv.input,
        out,
        options,
        vae_step=None if fv.vae_step < 0 else fv.vae_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        progress=_progress,
    )
    if jax.process_count() > 1:
        distributed.barrier("vdit_encode_done")
        if jax.process_index() != 0:
            return
        manifest = encode.merge_manifests(out, jax.process_count())
    print(encode.summary(manifest))
    print(
        json.dumps(
            {
                "out": out,
                "written": manifest["written"],
                "skipped": manifest["skipped_count"],
                "tokens": manifest["tokens"],
                "shards": len(manifest["shards"]),
            }
        )
    )


ENCODE = Command(
    name="encode",
    summary="encode prepared records into VAE latents for the DiT config that trains on them",
    usage="--config=FILE[:VARIANT] --vae=DIR --input=RECORDS --out=DIR [--chunk_frames=16] "
    "[--tile=0] [--store=moments|sample]",
    example="vdit encode --config=configs/latent.py --vae=runs/vae --input=data/records \\\n"
    "    --out=data/latents",
    define=_encode_flags,
    run=_encode,
    required=(
        ("config", "the DiT config that trains on the latents, e.g. --config=configs/latent.py"),
        ("vae", "the work directory of the VAE (vdit train --config=configs/vae.py)"),
        ("input", "the records of `vdit prepare` (a folder or a glob)"),
        ("out", "the output folder for the latent shards (empty or new)"),
    ),
    distributed=True,
    notes="Each record goes through the size policy the config would apply to pixels, so every "
    "latent is a whole number of the config's patches under data.max_tokens_per_sample. Train on "
    "the output with the same --config and --config.data.latents.path=DIR.",
)

COMMANDS = (PREPARE, ENCODE)

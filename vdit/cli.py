"""The `vdit` command.

    vdit train  --config=configs/default.py[:VARIANT] --workdir=DIR [--config.FIELD=VALUE ...]
    vdit sample --workdir=DIR --prompt="a red square moves left" --frames=8 --height=32 --width=32
                --seed=0 --out=sample.mp4
    vdit eval   --workdir=DIR [--num=48]          colour / motion accuracy of samples vs prompts
    vdit params --config=configs/default.py       every parameter's shape and sharding on the mesh
    vdit flops  --config=configs/default.py       analytic FLOPs of one train step, by part
    vdit compile --config=configs/default.py:XL/2 --topology=v5p-8 [--json]
                                                  compile the train step for a TPU slice (needs
                                                  libtpu, not a TPU): memory per device, FLOPs, fit
    vdit prepare --input=DIR --out=DIR [--captions=FILE.jsonl] [--shard_size=N] [--max_frames=N]
                 [--max_side=N] [--encoding=raw|mp4] [--workers=N]
                                                  videos and images -> shards for data.source=records
    vdit encode --vae=VAE_WORKDIR --input=RECORDS --out=DIR [--latent_patch=1,2,2] [--max_tokens=N]
                [--chunk_frames=16] [--tile=0] [--store=moments|sample]
                                                  prepared records -> VAE latents for
                                                  data.source=latents (vdit/data/encode.py)

`train` resumes from the latest checkpoint in its work directory by itself.

Multi-process runs (one process per host, all running the same command; `train`, `sample`, `eval`,
`encode`):

    --coordinator_address=HOST:PORT --num_processes=N --process_id=I [--local_device_ids=0,1]
    --distributed=auto|on|off

`auto` (the default) initializes `jax.distributed` from these flags, or with no arguments when the
environment is a cluster JAX detects (SLURM, Open MPI, a TPU slice; see vdit/parallel/distributed.py
for the variables read), and otherwise runs one process. `on` always calls
`jax.distributed.initialize()` (for other environments JAX knows), `off` never does. In `train` every
process reads its share of the data and process 0 writes metrics and samples; in `sample` and `eval`
every process computes the same result and process 0 writes the file.
"""

from __future__ import annotations

import json
import logging
import math
import sys

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("train", "sample", "eval", "params", "flops", "compile", "prepare", "encode")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:arg]).", lock_config=False
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (checkpoints, metrics, samples).")
_PROMPT = flags.DEFINE_string("prompt", "a red square moves right", "Caption to sample.")
_FRAMES = flags.DEFINE_integer("frames", 8, "Frames to sample (1 = an image).")
_HEIGHT = flags.DEFINE_integer("height", 32, "Height in pixels.")
_WIDTH = flags.DEFINE_integer("width", 32, "Width in pixels.")
_SEED = flags.DEFINE_integer(
    "seed", 0, "Sampling seed (encode: of the posterior samples of --store=sample)."
)
_OUT = flags.DEFINE_string(
    "out",
    "sample.mp4",
    "sample: output file, .mp4, .gif (or .png for one "
    "frame); prepare, encode: output folder for the shards (required).",
)
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's sample.steps).")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: sample.cfg_scale).")
_NUM = flags.DEFINE_integer("num", 48, "Prompts to evaluate.")
_UPSCALE = flags.DEFINE_integer("upscale", 1, "Nearest-neighbour enlargement of written videos.")
_INPUT = flags.DEFINE_string(
    "input",
    None,
    "prepare: folder of videos and images (walked "
    "recursively); encode: prepared records (a folder or a glob).",
)
_CAPTIONS = flags.DEFINE_string(
    "captions",
    None,
    'prepare: JSON Lines file of {"file": path relative to --input, "caption": '
    "text}; files without a line use a sidecar NAME.txt, else an empty caption.",
)
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 1000, "prepare, encode: records per shard.")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", 0, "prepare: keep the first N frames (0 = all).")
_MAX_SIDE = flags.DEFINE_integer(
    "max_side",
    0,
    "prepare: downsize to at most N pixels on the longer side, aspect kept (0 = native).",
)
_ENCODING = flags.DEFINE_enum(
    "encoding",
    "raw",
    ["raw", "mp4"],
    "prepare: frames stored raw (lossless) or as H.264 MP4 "
    "(lossy, much smaller, decoded when training reads them); images are always raw.",
)
_WORKERS = flags.DEFINE_integer(
    "workers",
    0,
    "prepare: files decoded at a time in worker processes (0 = in this process); "
    "the output does not depend on it.",
)
_VAE = flags.DEFINE_string(
    "vae", None, "encode: the VAE work directory (vdit train --config=configs/vae.py)."
)
_VAE_STEP = flags.DEFINE_integer("vae_step", -1, "encode: the VAE checkpoint step (-1: latest).")
_LATENT_PATCH = flags.DEFINE_list(
    "latent_patch",
    ["1", "2", "2"],
    "encode: the DiT patch (pt,ph,pw) in latent units; latent "
    "grids are made whole multiples of it.",
)
_MAX_TOKENS = flags.DEFINE_integer(
    "max_tokens",
    0,
    "encode: DiT tokens per sample at most (data.max_tokens_per_sample); larger "
    "samples are resized down, never cropped (0: no cap).",
)
_TIME_FIT = flags.DEFINE_enum(
    "time_fit",
    "resample",
    ["resample", "trim"],
    "encode: frames short of a whole latent patch (as data.time_fit).",
)
_FRAME_STRIDE = flags.DEFINE_integer("frame_stride", 1, "encode: keep every k-th source frame.")
_MAX_FPS = flags.DEFINE_float(
    "max_fps", 0.0, "encode: stride sources above this frame rate (0: off)."
)
_CHUNK_FRAMES = flags.DEFINE_integer(
    "chunk_frames",
    16,
    "encode: pixel frames per encoder call after the first (exact; bounds "
    "memory in time; 0: whole videos).",
)
_TILE = flags.DEFINE_integer("tile", 0, "encode: spatial tiles of N latent pixels (0: none).")
_TILE_OVERLAP = flags.DEFINE_integer("tile_overlap", 4, "encode: latent pixels tiles share.")
_STORE = flags.DEFINE_enum(
    "store",
    "moments",
    ["moments", "sample"],
    "encode: store posterior mean and log-variance, or one sample.",
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Multi-process start-up: auto = from the --coordinator_address/--num_processes/--process_id flags "
    "or a detected cluster (SLURM, Open MPI, TPU slice), else one process; on = always call "
    "jax.distributed.initialize() (any environment JAX detects); off = one process.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordinator (multi-process runs)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
_LOCAL_DEVICE_IDS = flags.DEFINE_string(
    "local_device_ids", None, "Comma-separated local devices this process uses (e.g. one GPU each)."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "compile: TPU slice, 'v5p:2x2x1' or 'v5p-8', 'v4-8', 'v5e-8', 'v6e-8' "
    "(v4/v5p count TensorCores, v5e/v6e chips), or 'local' for this process's devices.",
)
_JSON = flags.DEFINE_bool("json", False, "compile / flops: print the figures as one JSON object.")
_BATCHES = flags.DEFINE_integer(
    "batches", 4, "flops: packed batches of the data pipeline to average over (0: full rows)."
)


def _usage() -> str:
    return f"usage: vdit {{{'|'.join(COMMANDS)}}} [flags]; `vdit COMMAND --help` lists the flags"


def _require(flag, name: str):
    if flag.value is None:
        raise app.UsageError(f"--{name} is required")
    return flag.value


def _init_distributed() -> None:
    """jax.distributed from the flags or the cluster (before any device is touched); log the layout."""
    from vdit.parallel import distributed

    try:
        distributed.initialize(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            _LOCAL_DEVICE_IDS.value,
            _DISTRIBUTED.value,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    logging.getLogger("vdit").info(distributed.describe())


def _train() -> None:
    from vdit.train.loop import train_and_evaluate

    config = _require(_CONFIG, "config")
    workdir = _require(_WORKDIR, "workdir")
    metrics = train_and_evaluate(config, workdir)
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))


def _load(workdir: str):
    from vdit.train.checkpoint import restore_for_inference

    config, trainer, state = restore_for_inference(workdir)
    params = state["ema"] if config.sample.use_ema else state["params"]
    return config, trainer, params


def _sample() -> None:
    import dataclasses

    import jax

    from vdit import configlib
    from vdit.data.video_io import upscale, write_video
    from vdit.diffusion.evaluate import generate
    from vdit.train.samples import eval_setup

    config, trainer, params = _load(_require(_WORKDIR, "workdir"))
    shape = (_FRAMES.value, _HEIGHT.value, _WIDTH.value)
    tokens = configlib.tokens_per_sample(config, *shape)  # raises on a size the patch cannot tile
    setup = eval_setup(config)
    setup = dataclasses.replace(
        setup,
        steps=_STEPS.value or setup.steps,
        cfg_scale=setup.cfg_scale if _CFG_SCALE.value is None else _CFG_SCALE.value,
    )
    (video,) = generate(trainer.graphdef, params, [_PROMPT.value], shape, setup, seed=_SEED.value)
    path = _OUT.value
    if jax.process_index() == 0:  # every process computes the same sample; one writes it
        path = write_video(path, upscale(video, _UPSCALE.value), fps=config.sample.fps)
    print(json.dumps({"out": path, "shape": list(video.shape), "tokens": tokens}))


def _eval() -> None:
    from vdit.diffusion.evaluate import evaluate
    from vdit.train.samples import eval_setup

    config, trainer, params = _load(_require(_WORKDIR, "workdir"))
    scores = evaluate(
        trainer.graphdef,
        params,
        eval_setup(config),
        n=_NUM.value,
        shape=tuple(config.sample.grid_shape),
        seed=_SEED.value,
    )
    print(json.dumps(scores))


def _params() -> None:
    import jax

    from vdit import aot, configlib

    c = configlib.load(_require(_CONFIG, "config"), jax.device_count(), plan_only=True)
    if c.get("kind", "dit") == "vae":
        from vdit.parallel.sharding import describe
        from vdit.train.vae_train import make_trainer as make_vae_trainer

        trainer = make_vae_trainer(c)
        rows = describe(trainer.abstract_state["params"], trainer.param_shardings)
        if trainer.disc_on:  # loss.disc_weight > 0: the patch discriminator's too
            rows += [
                (f"disc/{name}", shape, spec)
                for name, shape, spec in describe(
                    trainer.abstract_state["disc_params"], trainer.disc_shardings
                )
            ]
        print(f"mesh {dict(trainer.mesh.shape)}")
        for name, shape, spec in rows:
            print(f"{name:60s} {str(shape):24s} {spec}")
        print(f"total parameters: {sum(math.prod(s) for _, s, _ in rows):,}")
        return
    print(aot.param_table(c))


def _flops() -> None:
    from vdit import aot, configlib

    c = configlib.load(_require(_CONFIG, "config"), plan_only=True)
    r = aot.flops_report(c, _BATCHES.value)
    print(json.dumps(r) if _JSON.value else aot.format_flops(r))


def _compile() -> None:
    from vdit import aot

    r = aot.compile_report(_require(_CONFIG, "config"), _require(_TOPOLOGY, "topology"))
    print(json.dumps(r) if _JSON.value else aot.format_report(r))


def _prepare() -> None:
    from vdit.data import prepare

    if not flags.FLAGS["out"].present:  # --out's default is sample's file name, not a folder
        raise app.UsageError("--out is required (the output folder)")
    try:
        options = prepare.PrepareOptions(
            shard_size=_SHARD_SIZE.value,
            max_frames=_MAX_FRAMES.value,
            max_side=_MAX_SIDE.value,
            encoding=_ENCODING.value,
            workers=_WORKERS.value,
        )
        manifest = prepare.prepare(
            _require(_INPUT, "input"),
            _OUT.value,
            _CAPTIONS.value,
            options,
            progress=lambda line: print(line, file=sys.stderr),
        )
    except (ValueError, OSError) as e:  # a missing input, a used output folder, a bad captions file
        raise app.UsageError(str(e)) from None
    print(prepare.summary(manifest))
    print(
        json.dumps(
            {
                "out": _OUT.value,
                "written": manifest["written"],
                "skipped": manifest["skipped_count"],
                "shards": len(manifest["shards"]),
            }
        )
    )


def _encode() -> None:
    import jax

    from vdit import encode
    from vdit.parallel import distributed

    if not flags.FLAGS["out"].present:
        raise app.UsageError("--out is required (the output folder)")
    try:
        options = encode.EncodeOptions(
            latent_patch=tuple(int(v) for v in _LATENT_PATCH.value),
            max_tokens=_MAX_TOKENS.value,
            time_fit=_TIME_FIT.value,
            frame_stride=_FRAME_STRIDE.value,
            max_fps=_MAX_FPS.value,
            chunk_frames=_CHUNK_FRAMES.value,
            tile=_TILE.value,
            tile_overlap=_TILE_OVERLAP.value,
            store=_STORE.value,
            shard_size=_SHARD_SIZE.value,
            seed=_SEED.value,
        )
        manifest = encode.encode_dataset(
            _require(_VAE, "vae"),
            _require(_INPUT, "input"),
            _OUT.value,
            options,
            vae_step=None if _VAE_STEP.value < 0 else _VAE_STEP.value,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            progress=lambda line: print(line, file=sys.stderr),
        )
    except (ValueError, FileNotFoundError) as e:  # missing input or VAE, a used folder, bad options
        raise app.UsageError(str(e)) from None
    if jax.process_count() > 1:
        distributed.barrier("vdit_encode_done")
        if jax.process_index() != 0:
            return
        manifest = encode.merge_manifests(_OUT.value, jax.process_count())
    print(encode.summary(manifest))
    print(
        json.dumps(
            {
                "out": _OUT.value,
                "written": manifest["written"],
                "skipped": manifest["skipped_count"],
                "tokens": manifest["tokens"],
                "shards": len(manifest["shards"]),
            }
        )
    )


def _main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(_usage())
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments {argv[2:]}; {_usage()}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if argv[1] in ("train", "sample", "eval", "encode"):
        _init_distributed()
    {
        "train": _train,
        "sample": _sample,
        "eval": _eval,
        "params": _params,
        "flops": _flops,
        "compile": _compile,
        "prepare": _prepare,
        "encode": _encode,
    }[argv[1]]()


def main() -> None:
    app.run(_main, argv=sys.argv)


if __name__ == "__main__":
    main()

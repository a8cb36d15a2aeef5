"""The `vdit` command.

    vdit train  --config=configs/default.py[:VARIANT] --workdir=DIR [--config.FIELD=VALUE ...]
    vdit sample --workdir=DIR --prompt="a red square moves left" --frames=8 --height=32 --width=32
                --seed=0 --out=sample.mp4
    vdit eval   --workdir=DIR [--num=48]          colour / motion accuracy of samples vs prompts
    vdit params --config=configs/default.py       every parameter's shape and sharding on the mesh

`train` resumes from the latest checkpoint in its work directory by itself.

Multi-process runs (one process per host, all running the same command; `train`, `sample`, `eval`):

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

COMMANDS = ("train", "sample", "eval", "params")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (checkpoints, metrics, samples).")
_PROMPT = flags.DEFINE_string("prompt", "a red square moves right", "Caption to sample.")
_FRAMES = flags.DEFINE_integer("frames", 8, "Frames to sample (1 = an image).")
_HEIGHT = flags.DEFINE_integer("height", 32, "Height in pixels.")
_WIDTH = flags.DEFINE_integer("width", 32, "Width in pixels.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", "sample.mp4", "Output file: .mp4, .gif (or .png for one frame).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's sample.steps).")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: sample.cfg_scale).")
_NUM = flags.DEFINE_integer("num", 48, "Prompts to evaluate.")
_UPSCALE = flags.DEFINE_integer("upscale", 1, "Nearest-neighbour enlargement of written videos.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process start-up: auto = from the --coordinator_address/--num_processes/--process_id flags "
    "or a detected cluster (SLURM, Open MPI, TPU slice), else one process; on = always call "
    "jax.distributed.initialize() (any environment JAX detects); off = one process.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordinator (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
_LOCAL_DEVICE_IDS = flags.DEFINE_string(
    "local_device_ids", None, "Comma-separated local devices this process uses (e.g. one GPU each).")


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
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               _LOCAL_DEVICE_IDS.value, _DISTRIBUTED.value)
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
    scores = evaluate(trainer.graphdef, params, eval_setup(config), n=_NUM.value,
                      shape=tuple(config.sample.grid_shape), seed=_SEED.value)
    print(json.dumps(scores))


def _params() -> None:
    import jax

    from vdit import configlib
    from vdit.parallel.sharding import describe
    from vdit.train.step import make_trainer

    c = configlib.load(_require(_CONFIG, "config"), jax.device_count())
    if c.get("kind", "dit") == "vae":
        from vdit.train.vae_train import make_trainer as make_vae_trainer

        trainer = make_vae_trainer(c)
    else:
        trainer = make_trainer(c)
    rows = describe(trainer.abstract_state["params"], trainer.param_shardings)
    print(f"mesh {dict(trainer.mesh.shape)}")
    for name, shape, spec in rows:
        print(f"{name:60s} {str(shape):24s} {spec}")
    total = sum(math.prod(s) for _, s, _ in rows)
    print(f"total parameters: {total:,}")


def _main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(_usage())
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments {argv[2:]}; {_usage()}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if argv[1] in ("train", "sample", "eval"):
        _init_distributed()
    {"train": _train, "sample": _sample, "eval": _eval, "params": _params}[argv[1]]()


def main() -> None:
    app.run(_main, argv=sys.argv)


if __name__ == "__main__":
    main()

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

`train` resumes from the latest checkpoint in its work directory by itself.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("train", "sample", "eval", "params", "flops", "compile")

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
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "compile: TPU slice, 'v5p:2x2x1' or 'v5p-8', 'v4-8', 'v5e-8', 'v6e-8' "
    "(v4/v5p count TensorCores, v5e/v6e chips), or 'local' for this process's devices.")
_JSON = flags.DEFINE_bool("json", False, "compile / flops: print the figures as one JSON object.")
_BATCHES = flags.DEFINE_integer(
    "batches", 4, "flops: packed batches of the data pipeline to average over (0: full rows).")


def _usage() -> str:
    return f"usage: vdit {{{'|'.join(COMMANDS)}}} [flags]; `vdit COMMAND --help` lists the flags"


def _require(flag, name: str):
    if flag.value is None:
        raise app.UsageError(f"--{name} is required")
    return flag.value


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
    path = write_video(_OUT.value, upscale(video, _UPSCALE.value), fps=config.sample.fps)
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

    from vdit import aot, configlib

    c = configlib.load(_require(_CONFIG, "config"), jax.device_count())
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


def _main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(_usage())
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments {argv[2:]}; {_usage()}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    {"train": _train, "sample": _sample, "eval": _eval, "params": _params, "flops": _flops,
     "compile": _compile}[argv[1]]()


def main() -> None:
    app.run(_main, argv=sys.argv)


if __name__ == "__main__":
    main()

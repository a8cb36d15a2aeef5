"""`vdit train`, `vdit sample`, `vdit eval`: train a model from a config, and use a trained one.

The calls into vdit/train sit in one small function each (`_train_and_evaluate`, `_load_model`,
`_eval_setup`), the only places this file reaches into it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from vdit.cli.base import Command, UsageError, define_config

_TRAINED = "the work directory of a `vdit train` run, e.g. --workdir=runs/default"


# ----------------------------------------------------------------------------------------------
# The trainer, behind three small functions
# ----------------------------------------------------------------------------------------------
def _train_and_evaluate(config, workdir: str) -> dict:
    from vdit.train.loop import train_and_evaluate

    return train_and_evaluate(config, workdir)


def _read_config(workdir: str):
    """(config, step) of the latest checkpoint of `workdir`, no array read. FileNotFoundError when
    there is none."""
    from vdit.train.load import read_config

    return read_config(workdir)


def _load_model(workdir: str, step: int | None = None):
    """(config, graphdef, params) of the checkpoint of `workdir` at `step` (default: the latest),
    or of a `vdit export` directory: EMA parameters when the config's sample.use_ema, else the raw
    ones. FileNotFoundError when there is none."""
    from vdit.train.load import load

    loaded = load(workdir, step)
    return loaded.config, loaded.graphdef, loaded.params


def _eval_setup(config):
    from vdit.train.samples import eval_setup

    return eval_setup(config)


def _no_checkpoint(workdir: str, e: Exception) -> UsageError:
    return UsageError(
        f"--workdir={workdir}: {e}; give the work directory of a `vdit train` run that "
        "saved a checkpoint"
    )


def _config(workdir: str):
    """(config, step) of `workdir`'s latest checkpoint, read before any argument is checked
    against it and before the model loads."""
    try:
        return _read_config(workdir)
    except FileNotFoundError as e:
        raise _no_checkpoint(workdir, e) from None


def _load(workdir: str, step: int | None = None):
    try:
        return _load_model(workdir, step)
    except FileNotFoundError as e:
        raise _no_checkpoint(workdir, e) from None


def _export_config(out: str):
    """The config of the `vdit export` directory `out`, read before the arguments are checked
    against it and before the model loads."""
    from vdit.train.load import is_export, read_export

    if not is_export(out):
        raise UsageError(
            f"--checkpoint={out}: not a `vdit export` directory (no export.json); export one "
            "with `vdit export --workdir=DIR --out=OUT`"
        )
    try:
        return read_export(out)[1]
    except FileNotFoundError as e:
        raise UsageError(f"--checkpoint={out}: {e}") from None


def _load_export(out: str):
    try:
        return _load_model(out)
    except FileNotFoundError as e:
        raise UsageError(f"--checkpoint={out}: {e}") from None


def _check_guidance(fv: flags.FlagValues) -> None:
    """--steps and --cfg_scale, checked before anything loads."""
    if fv.steps is not None and fv.steps < 1:
        raise UsageError(
            f"--steps={fv.steps}: sampling takes at least 1 step (leave it out for the "
            "config's sample.steps)"
        )
    if fv.cfg_scale is not None and fv.cfg_scale < 0:
        raise UsageError(f"--cfg_scale={fv.cfg_scale}: must be >= 0 (1 = no guidance)")


def _guided(setup, fv: flags.FlagValues):
    """The eval setup with the --steps / --cfg_scale given (unset: the config's)."""
    import dataclasses

    return dataclasses.replace(
        setup,
        steps=setup.steps if fv.steps is None else fv.steps,
        cfg_scale=setup.cfg_scale if fv.cfg_scale is None else fv.cfg_scale,
    )


# ----------------------------------------------------------------------------------------------
# vdit train
# ----------------------------------------------------------------------------------------------
def _train_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    define_config(
        fv,
        argv,
        "Config file: configs/*.py[:VARIANT], the DiT's or (kind='vae') the VAE's.",
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "Work directory: checkpoints, metrics.jsonl, tensorboard/, samples/.",
        flag_values=fv,
    )


def _train(fv: flags.FlagValues) -> None:
    metrics = _train_and_evaluate(fv.config, fv.workdir)
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))


TRAIN = Command(
    name="train",
    summary="train the model a config describes (the DiT, or the VAE), resuming in --workdir",
    usage="--config=FILE[:VARIANT] --workdir=DIR [--config.FIELD=VALUE ...]",
    example="vdit train --config=configs/default.py --workdir=runs/default",
    define=_train_flags,
    run=_train,
    required=(
        ("config", "a config file, e.g. --config=configs/default.py"),
        ("workdir", "where checkpoints and metrics go, e.g. --workdir=runs/default"),
    ),
    distributed=True,
    notes="Resumes from the latest checkpoint in --workdir by itself. In a multi-process run every "
    "process reads its share of the data and process 0 writes metrics and samples.",
)


# ----------------------------------------------------------------------------------------------
# vdit sample
# ----------------------------------------------------------------------------------------------
def _guidance_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "workdir", None, "The work directory of a `vdit train` run.", flag_values=fv
    )
    flags.DEFINE_integer(
        "steps", None, "Sampling steps (default: the config's sample.steps).", flag_values=fv
    )
    flags.DEFINE_float(
        "cfg_scale",
        None,
        "Guidance scale (default: the config's sample.cfg_scale).",
        flag_values=fv,
    )
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)


def _sample_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    _guidance_flags(fv)
    flags.DEFINE_string("prompt", "a red square moves right", "Caption to sample.", flag_values=fv)
    flags.DEFINE_string(
        "expand_prompt_with",
        None,
        "A local causal language model folder that rewrites --prompt into a descriptive one "
        "(printed, and written beside --out as OUT.prompt.json; vdit/text/expand.py).",
        flag_values=fv,
    )
    flags.DEFINE_integer("frames", 8, "Frames to sample (1 = an image).", flag_values=fv)
    flags.DEFINE_integer("height", 32, "Height in pixels.", flag_values=fv)
    flags.DEFINE_integer("width", 32, "Width in pixels.", flag_values=fv)
    flags.DEFINE_string(
        "out", "sample.mp4", "Output file: .mp4, .gif, or .png for one frame.", flag_values=fv
    )
    flags.DEFINE_integer(
        "upscale", 1, "Nearest-neighbour enlargement of the written video.", flag_values=fv
    )
    flags.DEFINE_string(
        "checkpoint",
        None,
        "A `vdit export --format=safetensors` (or orbax) directory, instead of --workdir.",
        flag_values=fv,
    )


def _sample(fv: flags.FlagValues) -> None:
    import jax

    from vdit import configlib
    from vdit.data.video_io import upscale, write_video
    from vdit.diffusion.evaluate import generate

    _check_guidance(fv)
    if fv.upscale < 1:
        raise UsageError(f"--upscale={fv.upscale}: must be >= 1 (1 = as sampled)")
    if (fv.workdir is None) == (fv.checkpoint is None):
        raise UsageError(
            "give one of --workdir (a `vdit train` run) or --checkpoint (a `vdit export` "
            "directory), e.g. --workdir=runs/default"
        )
    # the arguments are checked against the model's config before the model loads
    if fv.checkpoint is not None:
        config, step = _export_config(fv.checkpoint), None
    else:
        config, step = _config(fv.workdir)
    shape = (fv.frames, fv.height, fv.width)
    try:
        configlib.sample_grid(config, shape)
    except ValueError as e:
        raise UsageError(f"--frames/--height/--width: {e}") from None
    tokens = configlib.tokens_per_sample(config, *shape)
    if fv.checkpoint is not None:
        config, graphdef, params = _load_export(fv.checkpoint)
    else:
        config, graphdef, params = _load(fv.workdir, step)
    setup = _guided(_eval_setup(config), fv)
    prompt = fv.prompt
    if fv.expand_prompt_with:  # vdit/text/expand.py
        from vdit.text import expand

        prompt = expand.for_sample(fv.prompt, fv.expand_prompt_with, fv.out)
    (video,) = generate(graphdef, params, [prompt], shape, setup, seed=fv.seed)
    path = fv.out
    if jax.process_index() == 0:  # every process computes the same sample; one writes it
        path = write_video(path, upscale(video, fv.upscale), fps=config.sample.fps)
    print(json.dumps({"out": path, "shape": list(video.shape), "tokens": tokens}))


SAMPLE = Command(
    name="sample",
    summary="sample one video (or image) from a trained model for a caption, written to --out",
    usage="--workdir=DIR | --checkpoint=EXPORT [--prompt=TEXT] [--frames=N --height=N --width=N] "
    "[--out=FILE]",
    example='vdit sample --workdir=runs/default --prompt="a red square moves left" --frames=8 \\\n'
    "    --height=32 --width=32 --seed=0 --out=red.mp4 --upscale=4",
    define=_sample_flags,
    run=_sample,
    distributed=True,
    notes="The frame count and size must make whole patches of the model's latent grid (one frame, an "
    "image, always can), checked with the other flags before the model loads. In a "
    "multi-process run every process computes the same sample and process 0 writes the file. "
    "--checkpoint=OUT samples from a `vdit export` directory, without the work directory.",
)


# ----------------------------------------------------------------------------------------------
# vdit eval
# ----------------------------------------------------------------------------------------------
def _eval_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    _guidance_flags(fv)
    flags.DEFINE_integer("num", 48, "Prompts to evaluate.", flag_values=fv)


def _eval(fv: flags.FlagValues) -> None:
    from vdit.diffusion.evaluate import evaluate

    _check_guidance(fv)
    if fv.num < 1:
        raise UsageError(f"--num={fv.num}: evaluate at least 1 prompt")
    config, graphdef, params = _load(fv.workdir)
    setup = _guided(_eval_setup(config), fv)
    scores = evaluate(
        graphdef, params, setup, n=fv.num, shape=tuple(config.sample.grid_shape), seed=fv.seed
    )
    print(json.dumps(scores))


EVAL = Command(
    name="eval",
    summary="colour / motion accuracy of a trained model's samples against their prompts",
    usage="--workdir=DIR [--num=48] [--seed=0]",
    example="vdit eval --workdir=runs/default --num=48",
    define=_eval_flags,
    run=_eval,
    required=(("workdir", _TRAINED),),
    distributed=True,
    notes="Samples --num procedural captions at the config's sample.grid_shape and scores each "
    "sample's colour and motion with the procedural data's detector.",
)

COMMANDS = (TRAIN, SAMPLE, EVAL)

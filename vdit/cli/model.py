"""`vdit train`, `vdit sample`, `vdit eval`: train a model from a config, and use a trained one.

The calls into vdit/train sit in one small function each (`_train_and_evaluate`, `_load_model`,
`_eval_setup`), the only places this file reaches into it.
"""

from __future__ import annotations

import json
import os
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
    flags.DEFINE_integer(
        "frames", 8, "Frames to sample (1 = an image); with --video, the total.", flag_values=fv
    )
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
    flags.DEFINE_enum(
        "mode",
        None,
        list(_MODES),
        "Prompting mode (default: the one the inputs imply: --image i2v, --video "
        "extend_forward, --video with --video_end connect, --edit edit, none t2v).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "image", None, "An image to animate (it becomes frame 0), or to loop.", flag_values=fv
    )
    flags.DEFINE_string(
        "video",
        None,
        "A video to extend (--mode=extend_forward|extend_backward), to loop, or to connect "
        "(its end joined to --video_end's start).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "video_end", None, "With --video: the video the output ends with.", flag_values=fv
    )
    flags.DEFINE_string(
        "edit", None, "A video to edit (SDEdit) into the prompt, with --strength.", flag_values=fv
    )
    flags.DEFINE_float(
        "strength",
        None,
        "SDEdit strength in [0, 1]: the --edit video is noised to t = strength and sampled from "
        "there (0 = the input, 1 = ignore it).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "requests",
        None,
        "A .jsonl file, one request per line with the flags' names as keys (prompt, frames, "
        "height, width, seed, out, mode, image, video, video_end, edit, strength, "
        "text_embedding); missing keys take the flags' values; all are packed together.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "text_embedding",
        None,
        "Precomputed-text models: the caption's embedding, a .npy of shape (tokens, width).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "null_text_embedding",
        None,
        "Precomputed-text models: the empty caption's embedding for guidance (default: "
        "WORKDIR/text_null.npy).",
        flag_values=fv,
    )


_MODES = ("t2v", "i2v", "extend_forward", "extend_backward", "loop", "connect", "edit")
_REQUEST_KEYS = (
    "prompt",
    "frames",
    "height",
    "width",
    "seed",
    "out",
    "mode",
    "image",
    "video",
    "video_end",
    "edit",
    "strength",
    "text_embedding",
)
_INPUT_KEYS = ("image", "video", "video_end", "edit")


def _read_requests(fv: flags.FlagValues) -> list[dict]:
    """The requests: one from the flags, or one per line of --requests (keys = flag names; a
    missing key takes the flag's value; `out` defaults to --out numbered by line)."""
    defaults = {k: getattr(fv, k) for k in _REQUEST_KEYS}
    if fv.requests is None:
        return [{**defaults, "where": ""}]
    try:
        with open(fv.requests) as f:
            lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
    except OSError as e:
        raise UsageError(f"--requests={fv.requests}: {e.strerror}") from None
    if not lines:
        raise UsageError(f"--requests={fv.requests}: no request in the file")
    stem, ext = os.path.splitext(fv.out)
    out = []
    for k, (n, line) in enumerate(lines):
        where = f"--requests={fv.requests} line {n}: "
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}not JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise UsageError(f"{where}expected a JSON object of flag names")
        unknown = sorted(set(r) - set(_REQUEST_KEYS))
        if unknown:
            raise UsageError(
                f"{where}unknown key {unknown[0]!r}; the keys are {', '.join(_REQUEST_KEYS)}"
            )
        r = {
            **defaults,
            "seed": fv.seed + k,
            "out": f"{stem}_{k:03d}{ext}",
            # inputs and the mode are per request: a flag's input does not leak into every line
            **{key: None for key in (*_INPUT_KEYS, "mode", "strength", "text_embedding")},
            **r,
            "where": where,
        }
        if r["mode"] is not None and r["mode"] not in _MODES:
            raise UsageError(f"{where}mode {r['mode']!r}: choose one of {', '.join(_MODES)}")
        out.append(r)
    return out


def _plan(r: dict, config):
    """The request's mode placed on its output (vdit.diffusion.modes), its inputs read."""
    from vdit.data.video_io import read_video, video_fps
    from vdit.diffusion import modes

    where = r["where"]
    inputs, fps_in = {}, {}
    for key in _INPUT_KEYS:
        path = r[key]
        if path is None:
            continue
        if not os.path.isfile(path):
            raise UsageError(f"{where}--{key}={path}: no such file")
        try:
            inputs[key] = read_video(path)
            fps_in[key] = video_fps(path)
        except (OSError, ValueError) as e:
            raise UsageError(
                f"{where}--{key}={path}: cannot read it as a video or image ({e})"
            ) from None
    try:
        mode = modes.infer_mode(r["mode"], *(inputs.get(k) for k in _INPUT_KEYS))
        ct, pt = tuple(config.autoencoder.compression)[0], config.model.patch_t
        plan = modes.place(
            mode,
            r["frames"],
            r["height"],
            r["width"],
            strength=r["strength"],
            fps=float(config.sample.fps),
            fps_in=fps_in,
            leave=modes.unit(ct, pt),
            **inputs,
        )
    except ValueError as e:
        raise UsageError(f"{where}{e}") from None
    return mode, plan


def _text(r: dict, config, fv: flags.FlagValues):
    """The request's (Nc, E) caption embedding for a precomputed-text model (None for byte text)."""
    from vdit.data import text_embeddings

    where, path = r["where"], r["text_embedding"]
    if config.model.text.kind != "precomputed":
        if path is not None:
            raise UsageError(
                f"{where}--text_embedding: this model encodes its captions itself "
                f"(model.text.kind={config.model.text.kind!r}); leave it out"
            )
        return None
    if path is None:
        raise UsageError(
            f"{where}this model reads precomputed text (model.text.kind='precomputed'): give "
            "the caption's embedding with --text_embedding=FILE.npy (a (tokens, width) array)"
        )
    try:
        return text_embeddings.load(path, config.model.text.width)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"{where}--text_embedding: {e}") from None


def _null_text(config, fv: flags.FlagValues):
    from vdit.data import text_embeddings

    if config.model.text.kind != "precomputed":
        return None
    path = fv.null_text_embedding
    if path is None:
        base = fv.workdir if fv.workdir is not None else fv.checkpoint
        path = os.path.join(base, text_embeddings.NULL_FILE)
        if not os.path.isfile(path):
            raise UsageError(
                f"no {text_embeddings.NULL_FILE} in {base} for the unconditional pass of this "
                "precomputed-text model: give --null_text_embedding=FILE.npy (the empty "
                "caption's embedding)"
            )
    try:
        return text_embeddings.load(path, config.model.text.width)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--null_text_embedding: {e}") from None


def _sample(fv: flags.FlagValues) -> None:
    import dataclasses
    import sys
    import time

    import jax

    from vdit import configlib
    from vdit.data.video_io import upscale, write_video
    from vdit.diffusion import sampler
    from vdit.diffusion.evaluate import generate_requests, request

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
    reqs = _read_requests(fv)
    planned = []
    for r in reqs:
        shape = (r["frames"], r["height"], r["width"])
        try:
            configlib.sample_grid(config, shape)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{r['where']}--frames/--height/--width: {e}") from None
        mode, plan = _plan(r, config)
        planned.append((r, shape, mode, plan, _text(r, config, fv)))
    null = _null_text(config, fv)
    if fv.checkpoint is not None:
        config, graphdef, params = _load_export(fv.checkpoint)
    else:
        config, graphdef, params = _load(fv.workdir, step)
    setup = _guided(_eval_setup(config), fv)
    if fv.expand_prompt_with:  # vdit/text/expand.py: each request's prompt, rewritten
        from vdit.text import expand

        for r, *_ in planned:
            r["prompt"] = expand.for_sample(r["prompt"], fv.expand_prompt_with, r["out"])
    tokens = [configlib.tokens_per_sample(config, *shape) for _, shape, *_ in planned]
    row_len = config.data.row_len if max(tokens) <= config.data.row_len else None
    setup = dataclasses.replace(setup, row_len=row_len, null_text=null)
    try:
        sample_reqs = [
            request(r["prompt"], shape, setup, r["seed"], None if mode == "t2v" else plan, text)
            for r, shape, mode, plan, text in planned
        ]
    except ValueError as e:
        raise UsageError(str(e)) from None
    for r, _, mode, plan, _ in planned:
        for note in plan.notes:
            print(f"{r['where']}{mode}: {note}", file=sys.stderr)
    t0 = time.perf_counter()
    before = sampler.compile_stats()
    videos = generate_requests(graphdef, params, sample_reqs, setup)
    seconds = time.perf_counter() - t0
    stats = sampler.compile_stats()
    for (r, _, mode, plan, _), n, video in zip(planned, tokens, videos, strict=True):
        path = r["out"]
        if jax.process_index() == 0:  # every process computes the same sample; one writes it
            path = write_video(path, upscale(video, fv.upscale), fps=config.sample.fps)
        print(
            json.dumps(
                {"out": path, "mode": mode, "shape": list(video.shape), "tokens": n}
                | ({"strength": plan.strength} if mode == "edit" else {})
            )
        )
    if fv.requests is not None:
        print(
            json.dumps(
                {
                    "requests": len(reqs),
                    "seconds": round(seconds, 3),
                    "compiles": stats.compiles - before.compiles,
                    "compile_seconds": round(stats.seconds - before.seconds, 3),
                    "model_calls": stats.calls - before.calls,
                }
            )
        )


SAMPLE = Command(
    name="sample",
    summary="sample videos (or images) from a trained model: from text, an image, a video (extend, "
    "loop, connect, edit), or a file of requests",
    usage="--workdir=DIR | --checkpoint=EXPORT [--prompt=TEXT] [--frames=N --height=N --width=N] "
    "[--image=F | --video=F [--video_end=F] | --edit=F --strength=S] [--mode=M] "
    "[--requests=FILE.jsonl] [--out=FILE]",
    example='vdit sample --workdir=runs/default --prompt="a red square moves left" --frames=8 \\\n'
    "    --height=32 --width=32 --seed=0 --out=red.mp4 --upscale=4",
    define=_sample_flags,
    run=_sample,
    distributed=True,
    notes="Modes: text to video (--frames=1: an image); --image animates an image; --video with "
    "--mode=extend_forward|extend_backward continues a video after its end or before its start "
    "(--frames is the total); --mode=loop with --image or --video ends where it starts; --video "
    "with --video_end connects two videos; --edit with --strength is SDEdit. Given frames are "
    "kept exactly; inputs of another size are resized with their aspect kept and padded (never "
    "cropped), of another frame rate resampled to sample.fps, and what was done is printed. "
    "The frame count and size must make whole patches of the model's latent grid (one frame, an "
    "image, always can), checked with the other flags before the model loads. --requests packs "
    "requests of any sizes into shared rows and prints the compile count. In a multi-process "
    "run every process computes the same samples and process 0 writes the files. "
    "--checkpoint=OUT samples from a `vdit export` directory, without the work directory.",
)


# ----------------------------------------------------------------------------------------------
# vdit eval
# ----------------------------------------------------------------------------------------------
def _eval_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    _guidance_flags(fv)
    flags.DEFINE_integer("num", 48, "Prompts to evaluate.", flag_values=fv)
    flags.DEFINE_bool(
        "modes",
        False,
        "Score the prompting modes instead (i2v, extensions, loop, connect, SDEdit at several "
        "strengths), each next to its chance level, on --num procedural clips.",
        flag_values=fv,
    )


def _eval(fv: flags.FlagValues) -> None:
    from vdit.diffusion.evaluate import evaluate, evaluate_modes

    _check_guidance(fv)
    if fv.num < 1:
        raise UsageError(f"--num={fv.num}: evaluate at least 1 prompt")
    config, graphdef, params = _load(fv.workdir)
    setup = _guided(_eval_setup(config), fv)
    run = evaluate_modes if fv.modes else evaluate
    scores = run(
        graphdef, params, setup, n=fv.num, shape=tuple(config.sample.grid_shape), seed=fv.seed
    )
    print(json.dumps(scores))


EVAL = Command(
    name="eval",
    summary="colour / motion accuracy of a trained model's samples against their prompts",
    usage="--workdir=DIR [--num=48] [--seed=0] [--modes]",
    example="vdit eval --workdir=runs/default --num=48",
    define=_eval_flags,
    run=_eval,
    required=(("workdir", _TRAINED),),
    distributed=True,
    notes="Samples --num procedural captions at the config's sample.grid_shape and scores each "
    "sample's colour and motion with the procedural data's detector. --modes scores the prompting "
    "modes (given frames exact, colour / size / motion kept by animations and extensions, loop "
    "seams, connections, SDEdit distance by strength), each next to its chance level.",
)

COMMANDS = (TRAIN, SAMPLE, EVAL)

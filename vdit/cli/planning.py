"""`vdit params`, `vdit flops`, `vdit compile`: plan a run from its config, without training it.

`vdit params` of a VAE config reaches into the VAE task in one small function (`_vae_param_rows`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence

from absl import flags

from vdit.cli.base import Command, define_config

_CONFIG_HELP = "Config file: configs/*.py[:VARIANT]."
_NEED_CONFIG = "a config file, e.g. --config=configs/default.py:B/2"


# ----------------------------------------------------------------------------------------------
# vdit params
# ----------------------------------------------------------------------------------------------
def _params_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    define_config(fv, argv, _CONFIG_HELP + " The mesh is config.mesh over this process's devices.")


def _vae_param_rows(c) -> tuple[dict, list[tuple[str, tuple, object]]]:
    """(mesh shape, [(name, shape, spec)]) of the VAE's parameters, and of its discriminator's when
    loss.disc_weight > 0."""
    from vdit.parallel.sharding import describe
    from vdit.train.vae_task import VAETask

    task = VAETask(c)
    rows = describe(task.state.abstract["params"], task.state.param_shardings)
    if task.disc_on:
        disc = describe(task.state.abstract["disc_params"], task.state.aux_shardings["disc"])
        rows += [(f"disc/{name}", shape, spec) for name, shape, spec in disc]
    return dict(task.mesh.shape), rows


def _params(fv: flags.FlagValues) -> None:
    import jax

    from vdit import aot, configlib, plan

    config, notes = aot.fit_batch_rows(fv.config, jax.device_count())  # shapes do not depend on it
    for note in notes:
        print(f"vdit params: note: {note}", file=sys.stderr)
    c = configlib.load(config, jax.device_count(), plan_only=True)
    if c.get("kind", "dit") != "vae":
        print(plan.param_table(c))
        return
    mesh, rows = _vae_param_rows(c)
    print(f"mesh {mesh}")
    for name, shape, spec in rows:
        print(f"{name:60s} {str(shape):24s} {spec}")
    print(f"total parameters: {sum(math.prod(s) for _, s, _ in rows):,}")


PARAMS = Command(
    name="params",
    summary="every parameter's shape and sharding on the config's mesh (no arrays are made)",
    usage="--config=FILE[:VARIANT] [--config.FIELD=VALUE ...]",
    example="vdit params --config=configs/default.py:XL/2 --config.mesh.data=2 "
    "--config.mesh.fsdp=4",
    define=_params_flags,
    run=_params,
    notes="A data.batch_rows that does not split over the mesh's data x fsdp rows is scaled up to "
    "the next multiple (the parameters do not depend on it), and a note says so.",
    required=(("config", _NEED_CONFIG),),
)


# ----------------------------------------------------------------------------------------------
# vdit flops
# ----------------------------------------------------------------------------------------------
def _flops_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    define_config(fv, argv, _CONFIG_HELP)
    flags.DEFINE_integer(
        "batches",
        4,
        "Packed batches of the data pipeline to average over (0: rows filled with samples of "
        "data.max_tokens_per_sample tokens).",
        flag_values=fv,
    )
    flags.DEFINE_bool("json", False, "Print the figures as one JSON object.", flag_values=fv)


def _flops(fv: flags.FlagValues) -> None:
    from vdit import configlib, plan

    c = configlib.load(fv.config, plan_only=True)
    r = plan.flops_report(c, fv.batches)
    print(json.dumps(r) if fv.json else plan.format_flops(r))


FLOPS = Command(
    name="flops",
    summary="analytic FLOPs of one train step by part (useful vs executed, attention, recompute)",
    usage="--config=FILE[:VARIANT] [--batches=4] [--json]",
    example="vdit flops --config=configs/default.py:B/2",
    define=_flops_flags,
    run=_flops,
    required=(("config", _NEED_CONFIG),),
)


# ----------------------------------------------------------------------------------------------
# vdit compile
# ----------------------------------------------------------------------------------------------
def _compile_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    define_config(fv, argv, _CONFIG_HELP)
    flags.DEFINE_string(
        "topology",
        None,
        "TPU slice: 'v5p:2x2x1' or 'v5p-8', 'v4-8', 'v5e-8', 'v6e-8' (v4/v5p count TensorCores, "
        "v5e/v6e chips), or 'local' for this process's devices.",
        flag_values=fv,
    )
    flags.DEFINE_bool("json", False, "Print the report as one JSON object.", flag_values=fv)


def _compile(fv: flags.FlagValues) -> None:
    from vdit import aot

    r = aot.compile_report(fv.config, fv.topology)
    print(json.dumps(r) if fv.json else aot.format_report(r))


COMPILE = Command(
    name="compile",
    summary="compile the train step for a TPU slice (needs libtpu, not a TPU): memory, FLOPs, fit",
    usage="--config=FILE[:VARIANT] --topology=SLICE [--json]",
    example="vdit compile --config=configs/default.py:XL/2 --topology=v5p-8",
    define=_compile_flags,
    run=_compile,
    required=(
        ("config", _NEED_CONFIG),
        ("topology", "a TPU slice such as --topology=v5p-8, or local"),
    ),
    notes="A data.batch_rows that does not split over the slice's data x fsdp rows is scaled up to "
    "the next multiple, and the report says which value it used.",
)

COMMANDS = (PARAMS, FLOPS, COMPILE)

"""Planning a run from its config, without training it: `vdit flops` and `vdit params`.

    flops_report(c)   analytic FLOPs of one train step by part, on packed batches of the data
                      pipeline or on rows filled with the largest samples (no device work)
    param_table(c)    every parameter's path, shape and PartitionSpec on the config's mesh, from
                      abstract shapes only (what tests/golden/ holds)

`vdit compile` (vdit/aot.py) goes one step further and compiles the step for a TPU slice.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from vdit import aot, configlib, flops
from vdit.data import latents, pipeline
from vdit.parallel.sharding import describe


# ---------------------------------------------------------------------------------------------------
# `vdit flops`
# ---------------------------------------------------------------------------------------------------
def flops_report(c: ml_collections.ConfigDict, batches: int = 4) -> dict[str, Any]:
    """Analytic FLOPs of one step of the loaded config `c`, averaged over `batches` packed batches
    of its data pipeline, or on :func:`vdit.aot.full_rows_layout` when `batches` is 0 or the
    config's latents folder does not exist (``autoencoder.kind="latent"`` planned before
    `vdit encode`)."""
    cfg = configlib.model_config(c)
    readable = c.data.source != "latents" or os.path.isfile(
        os.path.join(c.data.latents.path, latents.MANIFEST)
    )
    if batches > 0 and readable:
        it = iter(pipeline.build(configlib.pipeline_config(c)))
        layouts = [
            (b["segment_ids"], b["text_segment_ids"]) for b in (next(it) for _ in range(batches))
        ]
        source = f"mean of {batches} packed batches of the data pipeline"
    else:
        layouts = [aot.full_rows_layout(c)]
        source = "rows filled with samples of data.max_tokens_per_sample tokens"
    per = [flops.step_flops(cfg, seg, tseg) for seg, tseg in layouts]
    f = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
    slots = math.prod(layouts[0][0].shape)
    tokens = float(np.mean([(seg > 0).sum() for seg, _ in layouts]))
    return {
        "flops": f,
        "layout": source,
        "tokens_per_step": tokens,
        "slots_per_step": slots,
        "fill": tokens / slots,
        "attn_impl": cfg.attn_impl,
        "remat": cfg.remat,
        "matmul_per_token": flops.matmul_flops_per_token(cfg),
        "text_matmul_per_token": flops.text_matmul_flops_per_token(cfg),
    }


def format_flops(r: dict[str, Any]) -> str:
    """The markdown tables of a :func:`flops_report`."""
    f = r["flops"]
    rows = [
        ("matmul (executed, padding included)", f["matmul"]),
        ("matmul (useful tokens)", f["matmul_useful"]),
        ("  of which text tokens (executed)", f["text"]),
        ("attention (useful: same-segment pairs)", f["attention_useful"]),
        (f"attention (executed by {r['attn_impl']!r})", f["attention_executed"]),
        (f"recompute (remat {r['remat']!r})", f["recompute"]),
        ("total model FLOPs (useful; MFU numerator)", f["total_useful"]),
        ("total executed", f["total_executed"]),
    ]
    tot = f["total_executed"]
    lines = [
        f"FLOPs of one train step (forward + backward) on {r['layout']}: "
        f"{r['tokens_per_step']:,.0f} tokens in {r['slots_per_step']:,} slots "
        f"(fill {r['fill']:.3f})",
        "",
        "| part | FLOPs | share of executed |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {v:.4g} | {v / tot:.3f} |" for name, v in rows]
    lines += ["", "| forward FLOPs per token | video | text |", "|---|---:|---:|"]
    parts = {
        **{k: (v, None) for k, v in r["matmul_per_token"].items()},
        **{k: (None, v) for k, v in r["text_matmul_per_token"].items()},
    }
    for k, (v, t) in parts.items():
        lines.append(
            f"| {k} | {'' if v is None else f'{v:.4g}'} | {'' if t is None else f'{t:.4g}'} |"
        )
    lines.append(
        f"\nmodel FLOPs per useful token: {f['total_useful'] / max(r['tokens_per_step'], 1):.4g}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# `vdit params`
# ---------------------------------------------------------------------------------------------------
def param_table(c: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> str:
    """Every parameter's path, shape and PartitionSpec on the config's mesh over `devices` (default
    all), from abstract shapes only: what `vdit params` prints and tests/golden/ holds."""
    built = aot.build(c, jax.devices() if devices is None else devices)
    params = built.state["params"]  # abstract, each leaf with its sharding
    rows = describe(params, jax.tree.map(lambda x: x.sharding, params))
    lines = [f"mesh {dict(built.mesh.shape)}"]
    lines += [f"{name:60s} {str(shape):24s} {spec}" for name, shape, spec in rows]
    lines.append(f"total parameters: {sum(math.prod(s) for _, s, _ in rows):,}")
    return "\n".join(lines)

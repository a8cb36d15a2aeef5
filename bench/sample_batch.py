"""Packed vs per-size batch sampling of a mixed request file: compiles, compile time, samples/s.

    python bench/sample_batch.py                      # the default model (Ti/4), random weights
    python bench/sample_batch.py --workdir=runs/default --steps=25

"packed" is `vdit sample --requests`: every request, whatever its size, best-fit packed into shared
rows of data.row_len tokens with segment ids (as training packs), one compiled Euler loop for the
row shape; "rows fitted" packs into rows of the smallest power-of-two multiple of 128 tokens that
holds the largest request (what `sampler.sample` picks without a row_len). "per size" runs one
batch per size, one sample per row of exactly its tokens (no padding, no packing), so each size
compiles its own loop. Each way runs once to compile (counted by `sampler.compile_stats`), then
all are timed in turns --repeats times (the fastest kept) for samples/s. The conditional and
unconditional passes share each call in all. Weights do not change the speed: without --workdir
the model is freshly initialised.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from common import default_config  # noqa: E402
from flax import nnx  # noqa: E402

from vdit import configlib  # noqa: E402
from vdit.diffusion import sampler  # noqa: E402
from vdit.models.dit import VideoDiT  # noqa: E402

# (frames, height, width) of the mixed request file: images and clips of several sizes
SIZES = ((8, 32, 32), (4, 16, 32), (8, 24, 32), (1, 32, 32), (4, 32, 16), (1, 16, 16))


def _model(workdir: str | None):
    if workdir:
        from vdit.train.load import load

        loaded = load(workdir)
        return loaded.config, loaded.graphdef, loaded.params
    c = configlib.load(default_config(), 1, plan_only=True)
    graphdef, params = nnx.split(
        nnx.jit(lambda: VideoDiT(configlib.model_config(c), rngs=nnx.Rngs(0)))()
    )
    return c, graphdef, nnx.to_pure_dict(params)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="a `vdit train` run (default: a fresh model)")
    p.add_argument("--requests", type=int, default=12, help="requests (sizes cycle over SIZES)")
    p.add_argument("--steps", type=int, default=10, help="Euler steps per sample")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each way (min kept)")
    p.add_argument("--json", default="bench/results/sample_batch.json")
    a = p.parse_args(argv)

    c, graphdef, params = _model(a.workdir)
    patch = configlib.patch_size(c)
    kw = dict(
        patch=patch,
        channels=c.autoencoder.channels,
        flow_cfg=configlib.flow_config(c),
        steps=a.steps,
        cfg_scale=c.sample.cfg_scale,
        text_len=c.model.text.max_len,
    )
    caps = ("a red square moves right", "a blue circle moves up", "a green square stands still")
    reqs = [
        sampler.SampleRequest(
            caps[i % len(caps)], configlib.sample_grid(c, SIZES[i % len(SIZES)]), seed=i
        )
        for i in range(a.requests)
    ]
    tokens = [configlib.tokens_per_sample(c, *SIZES[i % len(SIZES)]) for i in range(a.requests)]

    def packed():
        return sampler.sample(graphdef, params, reqs, **kw, row_len=c.data.row_len)

    def packed_fitted():
        return sampler.sample(graphdef, params, reqs, **kw)

    def per_size():
        out = []
        for size in sorted({r.grid for r in reqs}):
            group = [r for r in reqs if r.grid == size]
            n = next(t for r, t in zip(reqs, tokens, strict=True) if r.grid == size)
            out += sampler.sample(graphdef, params, group, **kw, row_len=n, max_samples_per_row=1)
        return out

    ways = (
        (f"packed, rows of {c.data.row_len}", packed),
        ("packed, rows fitted", packed_fitted),
        ("per size", per_size),
    )
    rows = []
    for name, fn in ways:  # the first run of each way compiles
        sampler.clear_cache()
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        st = sampler.compile_stats()
        rows.append(
            {
                "way": name,
                "compiles": st.compiles,
                "compile_s": round(st.seconds, 2),
                "first_call_s": round(first, 2),
                "model_calls": st.calls,
                "run_s": [],
            }
        )
        keep = dict(sampler._COMPILED)
        rows[-1]["_cache"] = keep
    for _ in range(a.repeats):  # then timed in turns (a busy machine slows both alike)
        for row, (_, fn) in zip(rows, ways, strict=True):
            sampler._COMPILED.update(row["_cache"])
            t0 = time.perf_counter()
            fn()
            row["run_s"].append(time.perf_counter() - t0)
    for row in rows:
        del row["_cache"]
        row["run_s"] = round(float(min(row["run_s"])), 2)
        row["samples_per_s"] = round(a.requests / row["run_s"], 3)
    print(
        f"{a.requests} requests of sizes {sorted(set(SIZES[: a.requests]))}, "
        f"{sum(tokens)} tokens in all, {a.steps} steps, rows of {c.data.row_len} tokens, "
        f"{jax.devices()[0].platform}"
    )
    head = list(rows[0])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in head) + " |")
    ratio = rows[0]["samples_per_s"] / rows[2]["samples_per_s"]
    fitted = rows[1]["samples_per_s"] / rows[2]["samples_per_s"]
    print(f"packed / per size throughput: {ratio:.2f}x (rows fitted to the largest: {fitted:.2f}x)")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"rows": rows, "ratio": ratio, "ratio_fitted": fitted}, f, indent=1)


if __name__ == "__main__":
    main()

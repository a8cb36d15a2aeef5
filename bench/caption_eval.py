"""Score samples of a trained run against their prompts with the synthetic-domain detector.

    python bench/caption_eval.py --workdir=runs/default [--num=48] [--out=bench/results/caption_eval.json]

Samples `--num` captions (all six colours, four directions) with the run's EMA parameters, reads the
colour and the direction of motion from each video, and prints accuracy next to chance and next to
the same model at initialisation.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from vdit.diffusion.evaluate import evaluate  # noqa: E402
from vdit.train.dit_task import DiTTask  # noqa: E402
from vdit.train.load import load  # noqa: E402
from vdit.train.samples import eval_setup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--num", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/caption_eval.json")
    args = ap.parse_args()

    ema, raw = load(args.workdir, ema=True), load(args.workdir, ema=False)
    config = ema.config
    init = DiTTask(config, jax.local_devices()[:1], data=False).state.init()["params"]
    setup = eval_setup(config)
    shape = tuple(config.sample.grid_shape)
    rows = []
    t0 = time.perf_counter()
    for name, params in (
        ("trained (EMA)", ema.params),
        ("trained (raw)", raw.params),
        ("initialisation", init),
    ):
        s = evaluate(ema.graphdef, params, setup, n=args.num, shape=shape, seed=args.seed)
        rows.append({"model": name, **s})
    elapsed = time.perf_counter() - t0
    print(
        f"step {ema.step}, {args.num} prompts at {shape} (frames, H, W), "
        f"{setup.steps} Euler steps, CFG {setup.cfg_scale}; {elapsed:.0f} s"
    )
    print("| model | colour accuracy | motion accuracy |")
    print("|---|---|---|")
    print("| chance | 0.167 | 0.250 |")
    for r in rows:
        print(f"| {r['model']} | {r['color_accuracy']:.3f} | {r['motion_accuracy']:.3f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"step": ema.step, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

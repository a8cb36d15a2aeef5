"""Fault injection: real `vdit train` processes killed at random moments, restarted, compared with a
run that never stopped.

Each trial starts `python -m vdit.cli train` on a tiny config (the "mu" model, a checkpoint every
step, saved asynchronously, so a good share of kills land inside a save), waits until a random step
k in 1..11 is logged (its row in metrics.jsonl), waits a random part of one step's time more, and
sends the fault:

- **kill -9**: SIGKILL. A kill counts as "during a save" when orbax's temporary step directory
  (`<step>.orbax-checkpoint-tmp*`, renamed to `<step>` on commit) is on disk right after it.
- **kill -9 in a save**: the same, sent as soon as (after the random delay) a temporary step
  directory appears: always inside an asynchronous save.
- **SIGTERM**: a preemption notice. The run must save the step it reached, wait for the commit and
  exit 0 (the seconds from the signal to the exit are the grace period it needs).

The same command is then run again to the end. "Survived": the rerun exits 0 at the last step.
"Resumed bit-exact": every step's logged loss (the last row of a step run twice) and the final raw
and EMA parameters equal the uninterrupted run's, bit for bit.

`--grace` also measures SIGTERM -> exit on `configs/default.py` itself (the embedded default,
its own shapes), the figure BUILD.md quotes for the grace period a scheduler must allow.

Usage: python bench/faults.py [--kills 12] [--save_kills 4] [--sigterms 4] [--grace 3] [--seed 0]
       [--out bench/results/faults.json]
JAX's persistent compilation cache (in --cache) is shared by all processes, so a restart costs
start-up and restore, not a compile (the cached executables are the same programs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
IN_SAVE = "kill -9 in a save"
FAULTS = ("kill -9", IN_SAVE, "SIGTERM")

# configs/default.py shrunk to the tests' tiny shapes (tests/tiny.py), as command-line overrides.
TINY = (
    "--config.model.text.width=32",
    "--config.model.text.depth=1",
    "--config.model.text.heads=2",
    "--config.model.text.max_len=32",
    "--config.data.synthetic.frame_choices=(4,)",
    "--config.data.synthetic.size_choices=((16,16),(16,32),(32,16))",
    "--config.data.batch_rows=8",
    "--config.data.row_len=256",
    "--config.data.text_len=128",
    "--config.data.max_samples_per_row=8",
    "--config.data.packing_bins=8",
    "--config.data.max_tokens_per_sample=256",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=1",
    "--config.train.keep_checkpoints=2",
    "--config.train.progress=False",
    "--config.sample.steps=2",
    "--config.sample.grid_shape=(4,16,16)",
    "--config.sample.grid_prompts=('a red square moves right',)",
    "--config.mesh.data=1",
)


def env(cache: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""),
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    e.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
    return e


def train_cmd(workdir: str, steps: int = STEPS, config: str = "configs/default.py:mu/4", tiny=True):
    return [
        sys.executable,
        "-m",
        "vdit.cli",
        "train",
        f"--config={ROOT / config.split(':')[0]}"
        + (":" + config.split(":")[1] if ":" in config else ""),
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        *(TINY if tiny else ("--config.train.log_every=1", "--config.train.progress=False")),
    ]


def losses(workdir: str) -> dict[int, float]:
    out = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path):
            if line.strip():
                row = json.loads(line)
                if "loss" in row:
                    out[row["step"]] = row["loss"]
    return out


def params(workdir: str) -> list[np.ndarray]:
    """The raw and EMA parameters of the latest checkpoint (the inference loader)."""
    import jax

    from vdit.train.load import load

    return [
        np.asarray(x)
        for ema in (False, True)
        for x in jax.tree.leaves(load(workdir, ema=ema).params)
    ]


def same_run(a: str, b: str, pa: list[np.ndarray]) -> bool:
    la, lb = losses(a), losses(b)
    if la != lb or sorted(la) != list(range(1, STEPS + 1)):
        return False
    pb = params(b)
    return len(pa) == len(pb) and all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True))


def tmp_dirs(workdir: str) -> list[str]:
    d = os.path.join(workdir, "checkpoints")
    return [n for n in os.listdir(d) if ".orbax-checkpoint-tmp" in n] if os.path.isdir(d) else []


def wait_for_training(proc: subprocess.Popen, workdir: str, rows: int = 1, timeout=900) -> float:
    """Until `rows` metrics rows are written (step `rows` is logged); its time.monotonic()."""
    t0 = time.monotonic()
    path = os.path.join(workdir, "metrics.jsonl")
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            break
        if os.path.exists(path) and open(path, "rb").read().count(b"\n") >= rows:
            return time.monotonic()
        time.sleep(0.01)
    return time.monotonic()


def run_to_end(cmd, e, log) -> int:
    with open(log, "a") as f:
        return subprocess.run(
            cmd, env=e, stdout=f, stderr=subprocess.STDOUT, check=False
        ).returncode


def trial(fault: str, workdir: str, after: int, delay: float, e, ref_params, ref_dir) -> dict:
    """One fault `delay` seconds after step `after` is logged, then the rerun to the end."""
    log = workdir + ".log"
    with open(log, "w") as f:
        proc = subprocess.Popen(train_cmd(workdir), env=e, stdout=f, stderr=subprocess.STDOUT)
        wait_for_training(proc, workdir, rows=after)
        time.sleep(delay)
        while fault == IN_SAVE and not tmp_dirs(workdir) and proc.poll() is None:
            time.sleep(0.001)  # until a save is under way
        if proc.poll() is not None:  # finished before the fault: not a trial of the fault
            return {"fault": fault, "landed": False}
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM if fault == "SIGTERM" else signal.SIGKILL)
        during_save = bool(tmp_dirs(workdir)) if fault != "SIGTERM" else None
        code = proc.wait()
        exit_s = time.monotonic() - sent
    stopped_at = max(losses(workdir), default=0)
    ckpts = (
        sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
        if os.path.isdir(os.path.join(workdir, "checkpoints"))
        else []
    )
    clean = fault != "SIGTERM" or (code == 0 and stopped_at in ckpts)
    rerun = run_to_end(train_cmd(workdir), e, log)
    survived = rerun == 0 and max(losses(workdir), default=0) == STEPS
    return {
        "fault": fault,
        "landed": True,
        "after_step": after,
        "delay_s": round(delay, 3),
        "during_save": during_save,
        "exit_code": code,
        "exit_s": round(exit_s, 3),
        "stopped_at": stopped_at,
        "clean_stop": clean,
        "survived": survived and clean,
        "bit_exact": survived and same_run(ref_dir, workdir, ref_params),
    }


def grace(workdir: str, delay: float, e) -> dict:
    """SIGTERM -> exit of the embedded default (configs/default.py, its own shapes)."""
    log = workdir + ".log"
    with open(log, "w") as f:
        cmd = train_cmd(workdir, steps=100_000, config="configs/default.py", tiny=False)
        proc = subprocess.Popen(cmd, env=e, stdout=f, stderr=subprocess.STDOUT)
        wait_for_training(proc, workdir)
        time.sleep(delay)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait()
        exit_s = time.monotonic() - sent
    ckpts = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
    rows = [json.loads(r) for r in open(os.path.join(workdir, "metrics.jsonl")) if r.strip()]
    step_s = [1 / r["steps_per_s"] for r in rows if "steps_per_s" in r][1:]  # the first compiles
    return {
        "exit_code": code,
        "exit_s": round(exit_s, 3),
        "saved": max(losses(workdir)) in ckpts,
        "step_s": statistics.median(step_s) if step_s else None,
    }


def main() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only reads checkpoints
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kills", type=int, default=12, help="kill -9 trials")
    ap.add_argument("--save_kills", type=int, default=4, help="kill -9 in a save trials")
    ap.add_argument("--sigterms", type=int, default=4, help="SIGTERM trials")
    ap.add_argument("--grace", type=int, default=3, help="SIGTERM -> exit of configs/default.py")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random delays")
    ap.add_argument("--workdir", default="", help="where the runs go (default: a temporary folder)")
    ap.add_argument("--cache", default="", help="JAX compilation cache (default: in --workdir)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "faults.json"))
    args = ap.parse_args()
    base = args.workdir or tempfile.mkdtemp(prefix="vdit-faults-")
    os.makedirs(base, exist_ok=True)
    e = env(args.cache or os.path.join(base, "jax-cache"))
    rng = random.Random(args.seed)

    ref = os.path.join(base, "reference")
    shutil.rmtree(ref, ignore_errors=True)
    t0 = time.monotonic()
    assert run_to_end(train_cmd(ref), e, ref + ".log") == 0, f"the reference run failed: {ref}.log"
    # One step's time, between the first and the last metrics row, on a warm compilation cache.
    warm = os.path.join(base, "warm")
    shutil.rmtree(warm, ignore_errors=True)
    with open(warm + ".log", "w") as f:
        proc = subprocess.Popen(train_cmd(warm), env=e, stdout=f, stderr=subprocess.STDOUT)
        began = wait_for_training(proc, warm)
        last = wait_for_training(proc, warm, rows=STEPS)
        proc.wait()
        step_s = (last - began) / (STEPS - 1)
    ref_params = params(ref)
    print(f"reference: {STEPS} steps in {time.monotonic() - t0:.0f} s; one step {step_s:.2f} s")

    rows = []
    for fault, n in zip(FAULTS, (args.kills, args.save_kills, args.sigterms), strict=True):
        for i in range(n):
            w = os.path.join(base, f"{fault.replace(' ', '_').replace('-', '')}-{i}")
            shutil.rmtree(w, ignore_errors=True)
            after = rng.randint(1, STEPS - 1)  # the fault comes during step after + 1 or later
            r = trial(fault, w, after, rng.uniform(0, step_s), e, ref_params, ref)
            rows.append(r)
            print(json.dumps(r), flush=True)
    graces = []
    for i in range(args.grace):
        w = os.path.join(base, f"grace-{i}")
        shutil.rmtree(w, ignore_errors=True)
        g = grace(w, rng.uniform(1, 10), e)
        graces.append(g)
        print(json.dumps(g), flush=True)

    print()
    print(
        "| fault | trials | kills during a save | survived | resumed bit-exact | SIGTERM -> exit (s) |"
    )
    print("|---|---|---|---|---|---|")
    for fault in FAULTS:
        rs = [r for r in rows if r["fault"] == fault and r["landed"]]
        if not rs:
            continue
        saves = sum(bool(r["during_save"]) for r in rs) if fault != "SIGTERM" else "-"
        exits = [r["exit_s"] for r in rs]
        exit_col = (
            f"median {statistics.median(exits):.2f}, max {max(exits):.2f}"
            if fault == "SIGTERM"
            else "-"
        )
        print(
            f"| {fault} | {len(rs)} | {saves} | {sum(r['survived'] for r in rs)} | "
            f"{sum(r['bit_exact'] for r in rs)} | {exit_col} |"
        )
    missed = sum(not r["landed"] for r in rows)
    if missed:
        print(f"({missed} faults came after the run had finished: not counted)")
    if graces:
        exits = [g["exit_s"] for g in graces]
        steps = [g["step_s"] for g in graces if g["step_s"]]
        print(
            f"\nconfigs/default.py, SIGTERM -> exit 0 with the step's checkpoint committed: "
            f"{sum(g['exit_code'] == 0 and g['saved'] for g in graces)} of {len(graces)}; "
            f"median {statistics.median(exits):.2f} s, max {max(exits):.2f} s "
            f"(one train step: median {statistics.median(steps) if steps else float('nan'):.2f} s)"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"args": vars(args), "steps": STEPS, "trials": rows, "grace": graces}, f, indent=1
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Compute-scaling sweeps: the held-out eval loss, the planner, the fitter, resuming, end to end.

- the held-out set is disjoint from training for the procedural and for finite sources, and
  building it changes no training batch;
- eval_loss is deterministic and the same on 1 and 8 devices (and moves with the parameters);
- the planner's steps spend each budget, counted on the batches the run trains on;
- the fitter recovers known exponents from synthetic losses, within its own intervals;
- a stopped sweep resumes: finished runs are not rerun, the stopped one continues from its
  checkpoint;
- (slow) a tiny sweep through `vdit sweep` writes every output.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from tiny import ROOT, tiny_config

from vdit import configlib, flops
from vdit.data import pipeline, sources
from vdit.data.synthetic import SyntheticVideos
from vdit.sweep import fit
from vdit.sweep import plan as plan_lib
from vdit.sweep import run as run_lib
from vdit.train.dit_task import DiTTask
from vdit.train.metrics import read_metrics


def sweep_config(variant: str = "smoke"):
    spec = importlib.util.spec_from_file_location(
        "vdit_sweep", os.path.join(ROOT, "configs", "sweep.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def tiny_sweep(sizes, budgets, min_steps=2):
    """A sweep of the tests' tiny config: runs of a few steps."""
    sc = sweep_config("smoke")
    base = tiny_config()
    base.data.eval_samples = 16
    base.train.checkpoint_every = 100
    base.train.log_every = 1
    base.sample.grid_prompts = ()
    sc.base = base
    sc.sizes, sc.budgets = sizes, budgets
    sc.min_steps, sc.max_steps = min_steps, 1000
    sc.flops_batches = 4
    sc.time_steps = 0
    sc.grid_prompts = ("a red square moves right", "a blue circle moves up")
    sc.grid_shape = (4, 16, 16)
    return sc


# --------------------------------------------------------------------------------------------
# The held-out set and eval_loss
# --------------------------------------------------------------------------------------------
def _pipeline_cfg(eval_samples: int):
    c = tiny_config()
    c.data.eval_samples = eval_samples
    return configlib.pipeline_config(configlib.load(c))


def test_held_out_set_is_disjoint_from_training(caplog):
    cfg = _pipeline_cfg(10)
    # finite sources (records, latents, tfds): evenly spaced elements held out, the rest trained on
    finite = [{"index": i} for i in range(197)]
    train, held = sources.split(finite, cfg)
    train_idx = {train[i]["index"] for i in range(len(train))}
    held_idx = {held[i]["index"] for i in range(len(held))}
    assert len(held_idx) == 10 and not train_idx & held_idx
    assert train_idx | held_idx == set(range(197))
    assert min(held_idx) < 20 and max(held_idx) > 170  # spread over the whole source
    # a small source holds out at most one sample in ten (and says so), a tiny one none
    with caplog.at_level("WARNING"):
        train, held = sources.split(finite[:50], cfg)
    assert len(held) == 5 and len(train) == 45 and "holding out 5" in caplog.text
    assert sources.split(finite[:9], cfg) == (finite[:9], None)
    # the procedural source: training keeps its index space untouched, eval lies past it
    synthetic = SyntheticVideos(cfg.synthetic)
    train, held = sources.split(synthetic, cfg)
    assert train is synthetic
    n = cfg.synthetic.num_samples
    assert [held[i]["index"] for i in range(len(held))] == list(range(n, n + 10))
    assert sources.split(synthetic, dataclasses.replace(cfg, eval_samples=0)) == (synthetic, None)


def test_the_held_out_set_leaves_the_training_batches_alone():
    c = tiny_config()
    off = DiTTask(configlib.load(c), jax.devices()[:1])
    c.data.eval_samples = 16
    on = DiTTask(configlib.load(c), jax.devices()[:1])
    first = jax.device_get(on.batch(0)[0])
    assert on.eval_rows() is not None  # built between two training batches
    for step, want in enumerate([jax.device_get(off.batch(i)[0]) for i in range(3)]):
        got = first if step == 0 else jax.device_get(on.batch(step)[0])
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_eval_loss_is_deterministic_and_the_same_on_1_and_8_devices():
    c = tiny_config()
    c.data.eval_samples = 24
    c.train.eval_timesteps = (0.3, 0.8)
    c = configlib.load(c)
    rows = pipeline.held_out(configlib.pipeline_config(c))
    assert (rows["grid"][..., 0] > 0).sum() == 24  # every held-out sample is in the set
    one = DiTTask(c, jax.devices()[:1], data=False)
    eight = DiTTask(c, jax.devices()[:8], data=False)
    params1 = one.state.init()["params"]
    params8 = jax.device_put(params1, eight.state.param_shardings)
    a, b = one.eval_loss(params1), one.eval_loss(params1)
    assert a == b  # bit for bit
    assert set(a) == {"eval_loss"} | {f"eval_loss_t{t:g}" for t in c.train.eval_timesteps}
    assert a["eval_loss"] == pytest.approx(
        np.mean([a[f"eval_loss_t{t:g}"] for t in c.train.eval_timesteps])
    )
    e = eight.eval_loss(params8)
    for k in a:
        assert e[k] == pytest.approx(a[k], rel=1e-5), k
    # other parameters give another number (the zero-initialised output layer moved too)
    rng = np.random.default_rng(0)
    moved = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), params1)
    assert abs(one.eval_loss(moved)["eval_loss"] - a["eval_loss"]) > 1e-4


# --------------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------------
def test_planner_steps_spend_the_budget_on_the_runs_own_batches():
    sc = tiny_sweep(((16, 1, 2), (32, 2, 2)), (2e9, 4e9, 1e6), min_steps=2)
    plan = plan_lib.make_plan(sc)
    assert len(plan.runs) == 4
    # a budget under min_steps of every size is left out and listed
    assert {(s, b, why) for s, b, _, why in plan.left_out} == {
        ("w16d1", 1e6, "too few steps"),
        ("w32d2", 1e6, "too few steps"),
    }
    for r in plan.runs:
        assert abs(r.flops - r.budget) <= r.flops_per_step / 2  # steps = round(C / per step)
        c = configlib.load(plan_lib.run_config(sc, r.width, r.depth, r.heads, r.steps))
        assert c.train.steps == r.steps and c.model.width == r.width
        assert c.optim.warmup_steps == max(1, round(sc.warmup_fraction * r.steps))
        if r.budget != 2e9:
            continue  # one size's batches are the same at every budget
        # the FLOPs per step are the run's own: its first batches, attention included
        task = DiTTask(c, jax.devices()[:1])
        hosts = [task.batch(i)[1] for i in range(sc.flops_batches)]
        assert r.flops_per_step == pytest.approx(np.mean([h["flops"] for h in hosts]), rel=1e-12)
        assert r.tokens_per_step == pytest.approx(np.mean([h["tokens"] for h in hosts]))
        cfg = configlib.model_config(c)
        seg = np.ones((1, 64), np.int32)
        assert flops.step_flops(cfg, seg, np.ones((1, 8), np.int32))["attention_useful"] > 0
    table = plan_lib.plan_table(plan)
    assert "C2.00e09_w16d1" in table and "left out: w32d2 at C=1e+06" in table


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    from vdit import cli

    workdir = tmp_path / "sweep"
    cli.run(
        [
            "sweep",
            f"--config={ROOT}/configs/sweep.py:smoke",
            f"--workdir={workdir}",
            "--dry_run",
            "--config.time_steps=0",
            "--config.base.data.batch_rows=8",  # over the tests' 8 devices
        ]
    )
    out = capsys.readouterr().out
    assert "| run | width | depth | params N |" in out and "| C8.00e10_w48d2 |" in out
    assert "left out: w48d2 at C=4e+10" in out  # under min_steps at twice the batch
    assert not workdir.exists()
    with pytest.raises(SystemExit) as e:
        cli.run(
            [
                "sweep",
                f"--config={ROOT}/configs/sweep.py:smoke",
                f"--workdir={workdir}",
                "--dry_run",
                "--config.base.data.batch_rows=8",
                "--config.budgets=(1e3,)",
            ]
        )
    assert e.value.code == 2
    assert "every pair is left out" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The fitter
# --------------------------------------------------------------------------------------------
ALPHA, GAMMA = 0.55, -0.05


def synthetic_runs(sizes_per_budget: int, noise: float, seed: int = 0) -> list[dict]:
    """Losses L = L_opt(C) + k (log10 N / N_opt(C))^2 + noise, N_opt = 0.1 C^ALPHA, D = C / 6N
    (so D_opt ~ C^(1 - ALPHA)), L_opt = 5 C^GAMMA."""
    rng = np.random.default_rng(seed)
    runs = []
    for c in (1e15, 1e16, 1e17, 1e18):
        n_opt, l_opt = 0.1 * c**ALPHA, 5 * c**GAMMA
        for f in np.logspace(-0.9, 0.9, sizes_per_budget):
            n = n_opt * f
            loss = l_opt + 0.08 * np.log10(f) ** 2 + rng.normal(0, noise)
            runs.append({"budget": c, "params": n, "tokens": c / (6 * n), "eval_loss": loss})
    return runs


def test_fitter_recovers_known_exponents_within_its_intervals():
    r = fit.fit(synthetic_runs(6, 0.002), bootstrap=400, target_flops=1e20)
    for name, truth in (("alpha", ALPHA), ("beta", 1 - ALPHA), ("gamma", GAMMA)):
        lo, hi = r[name]["ci"]
        assert lo <= r[name]["value"] <= hi, name
        assert lo <= truth <= hi, (name, truth, lo, hi)
        assert hi - lo < 0.05, name  # an interval that says something
    assert r["bootstrap"]["valid"] == 400
    n_lo, n_hi = r["target"]["n_opt"]["ci"]
    assert n_lo <= 0.1 * 1e20**ALPHA <= n_hi
    assert all(b["ok"] and b["inside"] for b in r["per_budget"])
    # more noise: a wider interval, still around the truth
    wide = fit.fit(synthetic_runs(6, 0.01, seed=1), bootstrap=400)
    narrow = r["alpha"]["ci"][1] - r["alpha"]["ci"][0]
    assert wide["alpha"]["ci"][1] - wide["alpha"]["ci"][0] > 2 * narrow
    assert wide["alpha"]["ci"][0] <= ALPHA <= wide["alpha"]["ci"][1]
    # three sizes per budget leave no residual: a fit, but no interval
    exact = fit.fit(synthetic_runs(3, 0.0), bootstrap=100)
    assert exact["alpha"]["value"] == pytest.approx(ALPHA, abs=1e-6)
    assert exact["alpha"]["ci"] is None and "no interval" in exact["bootstrap"]["note"]


# --------------------------------------------------------------------------------------------
# Resuming a stopped sweep
# --------------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def logging_train(stop_at: dict[str, int] | None = None, calls: list | None = None):
    """A stand-in for train_and_evaluate that logs like it (loss rows, eval_loss at the last step)
    and resumes like it (from the last logged step); it stops (raises Stop) at `stop_at[name]`."""

    def train(c, d):
        name = os.path.basename(d)
        if calls is not None:
            calls.append(name)
        path = os.path.join(d, "metrics.jsonl")
        done = read_metrics(d)[-1]["step"] if os.path.isfile(path) else 0
        stop = (stop_at or {}).get(name)
        with open(path, "a") as f:
            for step in range(done + 1, c.train.steps + 1):
                if step == stop:
                    raise Stop
                f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
            f.write(json.dumps({"step": c.train.steps, "eval_loss": c.model.width / 100}) + "\n")

    return train


def test_a_stopped_sweep_resumes_without_rerunning_finished_runs(tmp_path):
    sc = tiny_sweep(((16, 1, 2), (32, 1, 2)), (2e9, 4e9), min_steps=2)
    plan = plan_lib.make_plan(sc)
    assert len(plan.runs) == 4
    workdir, calls = str(tmp_path), []
    stopped = plan.runs[2]
    with pytest.raises(Stop):  # runs 0 and 1 finish, run 2 stops half way
        run_lib.run_all(sc, workdir, plan, logging_train({stopped.name: stopped.steps // 2}, calls))
    assert calls == [r.name for r in plan.runs[:3]]
    finished = {
        r.name: open(os.path.join(run_lib.run_dir(workdir, r), "metrics.jsonl")).read()
        for r in plan.runs[:2]
    }
    assert run_lib.final_metrics(workdir, stopped) is None

    calls.clear()
    records = run_lib.run_all(sc, workdir, plan, logging_train(calls=calls))
    assert calls == [r.name for r in plan.runs[2:]]  # the finished runs are skipped
    for r in plan.runs[:2]:
        assert (
            open(os.path.join(run_lib.run_dir(workdir, r), "metrics.jsonl")).read()
            == finished[r.name]
        )
    steps = [m["step"] for m in read_metrics(run_lib.run_dir(workdir, stopped)) if "loss" in m]
    assert steps == list(range(1, stopped.steps + 1))  # continued in its own work directory
    assert [r["name"] for r in records] == [r.name for r in plan.runs]
    assert [r["eval_loss"] for r in records] == [r.width / 100 for r in plan.runs]
    assert all(r["wall_seconds"] >= 0 and r["steps"] > 0 for r in records)
    calls.clear()
    run_lib.run_all(sc, workdir, plan, logging_train(calls=calls))
    assert calls == []  # a finished sweep trains nothing
    # every run is an ordinary `vdit train` work directory with its config and launch line
    last = run_lib.run_dir(workdir, plan.runs[-1])
    launch = open(os.path.join(workdir, "launch.sh")).read().splitlines()
    assert launch[-1] == f"vdit train --config={last}/config.py --workdir={last}"
    stored = run_lib.read_run_config(os.path.join(last, "config.py"))
    assert stored["train"]["steps"] == plan.runs[-1].steps and stored["model"]["width"] == 32
    want = plan_lib.run_config(sc, 32, 1, 2, plan.runs[-1].steps).to_dict()
    assert run_lib._tuples(want) == run_lib._tuples(stored)  # exactly the plan's config
    # a changed sweep config is refused rather than mixed into the same directory
    sc.warmup_fraction = 0.5
    with pytest.raises(ValueError, match="another config"):
        run_lib.run_all(sc, workdir, plan, logging_train())


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_tiny_sweep_end_to_end(tmp_path, capsys, monkeypatch):
    """`vdit sweep` on 2 budgets x 3 sizes of real runs, stopped in its 4th run after a checkpoint
    and run again: it resumes that run, skips the finished ones, and writes every output."""
    import matplotlib.image

    from vdit import cli, sweep
    from vdit.data.video_io import read_video
    from vdit.train import loop

    sc = tiny_sweep(((16, 1, 2), (24, 1, 2), (32, 1, 2)), (2e9, 4e9), min_steps=2)
    sc.base.train.checkpoint_every = 2
    workdir = str(tmp_path / "sweep")
    real_sweep, real_train = sweep.sweep, loop.train_and_evaluate
    monkeypatch.setattr(sweep, "sweep", lambda _c, *a, **k: real_sweep(sc, *a, **k))
    args = ["sweep", f"--config={ROOT}/configs/sweep.py:smoke", f"--workdir={workdir}"]
    plan = plan_lib.make_plan(sc)
    stopped = plan.runs[3]
    assert stopped.steps >= 8

    def stop_half_way(c, d):
        if os.path.basename(d) == stopped.name:
            half = c.copy_and_resolve_references()
            half.train.steps = stopped.steps // 2
            real_train(half, d)
            raise Stop
        return real_train(c, d)

    monkeypatch.setattr(loop, "train_and_evaluate", stop_half_way)
    with pytest.raises(Stop):
        cli.run(args)
    finished = [
        open(os.path.join(run_lib.run_dir(workdir, r), "metrics.jsonl")).read()
        for r in plan.runs[:3]
    ]
    monkeypatch.setattr(loop, "train_and_evaluate", real_train)
    cli.run([*args, "--target_flops=1e10"])
    out = capsys.readouterr().out
    assert out.startswith("# Compute-scaling sweep") and "alpha =" in out
    for r, text in zip(plan.runs[:3], finished, strict=True):  # not rerun
        assert open(os.path.join(run_lib.run_dir(workdir, r), "metrics.jsonl")).read() == text
    steps = [m["step"] for m in read_metrics(run_lib.run_dir(workdir, stopped)) if "loss" in m]
    assert steps == list(range(1, stopped.steps + 1))  # resumed from its checkpoint at the half

    data = json.load(open(os.path.join(workdir, "sweep.json")))
    assert len(data["runs"]) == 6 and all(np.isfinite(r["eval_loss"]) for r in data["runs"])
    assert {b["budget"] for b in data["fits"]["per_budget"]} == {2e9, 4e9}
    for name in ("isoflop.png", "scaling.png", "loss_vs_compute.png", "samples_by_compute.png"):
        image = matplotlib.image.imread(os.path.join(workdir, name))
        assert image.ndim == 3 and image.shape[0] > 100, name
    grid = read_video(os.path.join(workdir, "samples_by_compute.mp4"))
    assert grid.shape[0] == 4  # frames of the grid samples; rows by budget, columns by prompt
    assert len(data["sample_grid"]["rows"]) == 2 and data["sample_grid"]["rows"][0].startswith(
        "C2.00e09"
    )
    assert "| run | C (FLOPs) |" in open(os.path.join(workdir, "report.md")).read()

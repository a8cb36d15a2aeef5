"""Two processes of four CPU devices each, joined by jax.distributed: `vdit train` on one 8-device mesh.

2 steps, stop, resume for 2 more == 4 steps straight, both as two-process runs: the same parameters,
the same losses on both processes, and the checkpoints hold one data-iterator state per process.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_cli import TINY_FLAGS
from tiny import ROOT, restore_state

from vdit.train.metrics import read_metrics

NUM_PROCESSES = 2
TIMEOUT_S = 900

pytestmark = pytest.mark.slow
GLOBAL_METRICS = (
    "loss",
    "grad_norm",
    "lr",
    "skipped_steps",
    "grid_color_accuracy",
    "grid_motion_accuracy",
)

FLAGS = [
    *TINY_FLAGS,
    "--config.mesh.data=2",
    "--config.mesh.fsdp=4",
    "--config.train.checkpoint_every=2",
    "--config.train.progress=False",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 3000) -> str:
    with open(path) as f:
        lines = [ln for ln in f if not ln.startswith("[Gloo]")]  # gloo's per-connection chatter
    return "".join(lines)[-n:]


def _train_two_processes(workdir: str, steps: int) -> list[dict]:
    """`vdit train` as two processes on 127.0.0.1; returns each process's final metrics and log."""
    port = _free_port()
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
    )
    os.makedirs(workdir, exist_ok=True)
    procs, logs = [], []
    try:
        for i in range(NUM_PROCESSES):
            out, err = (os.path.join(workdir, f"process_{i}.{x}") for x in ("out", "err"))
            logs.append((out, err))
            with open(out, "w") as fo, open(err, "w") as fe:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "vdit.cli",
                            "train",
                            *FLAGS,
                            f"--workdir={workdir}",
                            f"--config.train.steps={steps}",
                            f"--coordinator_address=127.0.0.1:{port}",
                            f"--num_processes={NUM_PROCESSES}",
                            f"--process_id={i}",
                        ],
                        cwd=ROOT,
                        env=env,
                        stdout=fo,
                        stderr=fe,
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:  # on a failure or timeout the other process would wait on its peer forever
            if p.poll() is None:
                p.kill()
                p.wait()
    report = "\n".join(
        f"--- process {i} (exit {p.returncode}) stderr:\n{_tail(logs[i][1])}"
        for i, p in enumerate(procs)
    )
    assert all(p.returncode == 0 for p in procs), f"two-process vdit train failed:\n{report}"
    results = []
    for out, err in logs:
        with open(out) as f:
            final = json.loads(f.read().strip().splitlines()[-1])
        with open(err) as f:
            results.append({"final": final, "stderr": f.read()})
    return results


def _state(workdir: str):
    return restore_state(workdir)


def test_two_processes_resume_equals_uninterrupted(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")

    first = _train_two_processes(resumed, 2)
    for r in first:
        assert "of 2 (4 of 8 devices local), mesh {'data': 2, 'fsdp': 4" in r["stderr"]
    assert "process 0 of 2" in first[0]["stderr"] and "process 1 of 2" in first[1]["stderr"]
    assert {k: first[0]["final"][k] for k in GLOBAL_METRICS} == {
        k: first[1]["final"][k] for k in GLOBAL_METRICS
    }  # one global loss, seen by both
    ckpt = os.path.join(resumed, "checkpoints", "2")
    data_states = sorted(os.listdir(os.path.join(ckpt, "data")))
    assert [f for f in data_states if f.startswith("process_")] == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    positions = [
        json.load(open(os.path.join(ckpt, "data", f)))
        for f in data_states
        if f.startswith("process_")
    ]
    assert (
        positions[0] != positions[1]
    )  # each process saved where its own share of the data stopped

    second = _train_two_processes(resumed, 4)
    whole = _train_two_processes(straight, 4)
    for r in second:
        assert "resumed from step 2" in r["stderr"]
    for run in (
        second,
        whole,
    ):  # global values agree; host statistics (packing fill) are per process
        assert {k: run[0]["final"][k] for k in GLOBAL_METRICS} == {
            k: run[1]["final"][k] for k in GLOBAL_METRICS
        }

    # Only process 0 wrote metrics and samples; the resumed run logged steps 1-2, then 3-4.
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if "loss" in r]
    assert [s for s, _ in losses(resumed)] == [1, 2, 3, 4]
    assert losses(resumed) == losses(straight)
    assert sorted(os.listdir(os.path.join(straight, "samples"))) == ["step_0000004.mp4"]
    assert "grid_color_accuracy" in whole[0]["final"]

    a, b = _state(straight), _state(resumed)
    assert int(a["step"]) == int(b["step"]) == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)

"""launch/: every launcher's dry run == its golden command list; the vdit commands in them parse;
bad flags are one-line errors; a run that does not fit is refused before anything is launched;
(slow) launch/local.sh trains two processes for real, resumes, and is timed against one process.

A change to a launcher or to a flag it passes shows up as a diff of tests/golden/launch_*.txt.
When it is intended, regenerate them and review the diff in version control:

    VDIT_UPDATE_GOLDEN=1 python -m pytest tests/test_launch.py
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
from test_cli import TINY_FLAGS
from tiny import ROOT

from vdit import cli, configlib
from vdit.cli import base
from vdit.train.metrics import read_metrics

B2 = ["--config=configs/default.py:B/2", "--config.model.dtype=bfloat16"]
DRY_RUNS = {
    "local": [
        "launch/local.sh",
        "--processes=2",
        "--devices_per_process=4",
        "--dry_run",
        "--",
        "train",
        *B2,
        "--config.data.batch_rows=8",
        "--workdir=runs/b2-local",
    ],
    "tpu_vm": [
        "launch/tpu_vm.sh",
        "--name=vdit-b2",
        "--zone=us-east5-a",
        "--accelerator=v5p-32",
        "--queued",
        "--spot",
        "--nfs=10.0.0.2:/vdit",
        "--delete",
        "--dry_run",
        "--",
        "train",
        *B2,
        "--config.data.batch_rows=64",
        "--workdir=/mnt/shared/runs/b2",
    ],
    "xpk": [
        "launch/xpk.sh",
        "--cluster=vdit-gke",
        "--zone=us-east5-a",
        "--project=my-project",
        "--tpu=v5p-32",
        "--slices=2",
        "--image=us-docker.pkg.dev/my-project/vdit/vdit",
        "--workload=vdit-b2",
        "--storage=vdit-shared",
        "--delete",
        "--dry_run",
        "--",
        "train",
        *B2,
        "--config.data.batch_rows=64",
        "--workdir=/mnt/shared/runs/b2",
    ],
    "slurm": [
        "launch/slurm.sbatch",
        "--nodes=2",
        "--gpus_per_node=8",
        "--partition=gpu",
        "--time=24:00:00",
        "--dry_run",
        "--",
        "train",
        *B2,
        "--config.data.batch_rows=64",
        "--workdir=/shared/runs/b2",
    ],
}


def _launch(args, *, env=None, timeout=600):
    """Runs a launcher with bash from the repository root in a plain environment."""
    base_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C"}
    base_env["PYTHON"] = "python3"
    return subprocess.run(
        ["bash", *args],
        cwd=ROOT,
        env={**base_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _golden(name: str) -> str:
    return os.path.join(ROOT, "tests", "golden", f"launch_{name}.txt")


@pytest.mark.parametrize("name", sorted(DRY_RUNS))
def test_dry_run_matches_golden(name):
    proc = _launch(DRY_RUNS[name])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    listing = proc.stdout
    path = _golden(name)
    if os.environ.get("VDIT_UPDATE_GOLDEN") == "1":
        with open(path, "w") as f:
            f.write(listing)
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing; create it with VDIT_UPDATE_GOLDEN=1 pytest {__file__}")
    with open(path) as f:
        golden = f.read()
    if listing != golden:
        diff = "".join(difflib.unified_diff(golden.splitlines(True), listing.splitlines(True)))
        pytest.fail(f"launch/{name} dry run differs from {path}:\n{diff}")


def _vdit_commands(listing: str) -> list[list[str]]:
    """Every vdit command line of a dry run: run directly, inside a remote --command, or checked
    by launch/fit.py (as `vdit compile`)."""
    found = []
    for line in listing.splitlines():
        if line.startswith(("#", "export ")):
            continue
        words = shlex.split(line)
        if "launch/fit.py" in words:  # its flags after -- go to `vdit compile`
            rest = words[words.index("--") + 1 :]
            own = words[words.index("launch/fit.py") + 1 : words.index("--")]
            topo = [w.replace("--topology=", "") for w in own if w.startswith("--topology=")]
            found.append(["compile", *rest, f"--topology={topo[0] if topo else 'local'}"])
            continue
        for w in words:
            if w.startswith("--command="):
                words = shlex.split(w[len("--command=") :])
        for i, w in enumerate(words):
            if w in ("vdit.cli", "vdit") or w.endswith("/bin/vdit"):
                cmd = []
                for arg in words[i + 1 :]:
                    if arg in (">", "&", "&&", "2>&1", "<"):
                        break
                    cmd.append(arg)
                found.append(cmd)
                break
    return found


@pytest.mark.parametrize("name", sorted(DRY_RUNS))
def test_dry_run_vdit_commands_parse(name, monkeypatch):
    """The commands the launchers would run are ones `vdit` accepts: their flags and config."""
    monkeypatch.chdir(ROOT)
    commands = _vdit_commands(_launch(DRY_RUNS[name]).stdout)
    names = [c[0] for c in commands]
    assert names.count("compile") == 1 and names.count("train") >= 1, commands
    for c in commands:
        try:
            fv = base.parse(cli.COMMANDS[c[0]], c[1:])
        except base.UsageError as e:
            pytest.fail(f"launch/{name}: vdit {shlex.join(c)}: {e}")
        configlib.load(fv.config, plan_only=True)
        if name in ("local", "slurm") and c[0] == "train":
            assert fv.workdir and (name != "local" or fv.num_processes == 2)


def _documented_launches() -> list[tuple[str, list[str]]]:
    """The launcher commands of BUILD.md's and README.md's code blocks, continuations joined."""
    import re

    found = []
    for name in ("BUILD.md", "README.md"):
        text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        for block in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
            logical = block.group(1).replace("\\\n", " ")
            for line in logical.splitlines():
                if not line.strip().startswith(("launch/", "bash launch/")):
                    continue  # prose, other commands, the file tree
                words = shlex.split(line, comments=True)
                if words and words[0] == "bash":
                    words = words[1:]
                if (
                    words
                    and words[0].startswith("launch/")
                    and words[0].endswith((".sh", ".sbatch"))
                ):
                    found.append((name, words))
    return found


def test_documented_launch_commands_dry_run():
    """Every launcher command in the docs runs as written (with --dry_run added before --)."""
    documented = _documented_launches()
    assert {w[0] for _, w in documented} >= {
        "launch/local.sh",
        "launch/tpu_vm.sh",
        "launch/xpk.sh",
        "launch/slurm.sbatch",
    }
    for where, words in documented:
        split = words.index("--")
        proc = _launch([*words[:split], "--dry_run", *words[split:]])
        assert proc.returncode == 0, f"{where}: {shlex.join(words)}: {proc.stderr}"


@pytest.mark.parametrize(
    "args,message",
    [
        (["launch/local.sh", "--bogus=1", "--", "train", "--config=c"], "unknown flag --bogus"),
        (["launch/local.sh", "--", "train", "--workdir=x"], "needs --config"),
        (["launch/local.sh", "--", "--config=configs/default.py"], "starts with its name"),
        (["launch/tpu_vm.sh", "--zone=z", "--", "train", "--config=c"], "--name=... is required"),
        (["launch/tpu_vm.sh", "--name=n", "--zone=z", "--accelerator=v9-8", "--", "train",
          "--config=c", "--workdir=w"], "--accelerator=v9-8"),
        (["launch/xpk.sh", "--cluster=c", "--zone=z", "--tpu=v5p-8", "--image=i", "--workload=w",
          "--slices=2", "--", "train", "--config=c", "--workdir=w", "--config.mesh.dcn_data=4"],
         "--config.mesh.dcn_data=4 but --slices=2"),
        (["launch/slurm.sbatch", "--per=socket", "--", "train", "--config=c", "--workdir=w"],
         "--per=socket"),
        (["launch/local.sh", "--dry_run=1", "--", "train", "--config=c"], "unknown flag"),
    ],
)  # fmt: skip
def test_bad_flags_are_one_line_errors(args, message):
    proc = _launch([*args, "--dry_run"] if "--dry_run" not in args[:-1] else args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_slurm_xla_flags_are_known_to_xla():
    """The XLA_FLAGS launch/slurm.sbatch exports parse in this jaxlib (XLA aborts on unknown flags;
    the GPU flags are XLA-wide options, parsed by the CPU client too)."""
    listing = _launch(DRY_RUNS["slurm"]).stdout
    (line,) = [ln for ln in listing.splitlines() if ln.startswith("export XLA_FLAGS=")]
    flags = shlex.split(line)[1].split("=", 1)[1]
    code = "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "3.0", proc.stderr[-2000:]


def test_run_that_does_not_fit_is_refused_before_launch(tmp_path):
    """slurm.sbatch with 1 MiB GPUs: launch/fit.py's estimate (XLA's CPU compile of the sharded
    step over 2 x 2 host devices) exceeds it, the launcher exits 3 naming both numbers, and
    sbatch is never reached (it is not installed here: that would exit 127)."""
    proc = _launch(
        [
            "launch/slurm.sbatch",
            "--nodes=2",
            "--gpus_per_node=2",
            "--gpu_memory_gib=0.001",
            "--memory_fraction=1",
            "--",
            "train",
            *TINY_FLAGS,
            f"--workdir={tmp_path}",
        ],
        env={"PYTHON": sys.executable, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 3, (proc.stdout, proc.stderr[-3000:])
    (verdict,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("does not fit")]
    assert "budget 0.001 GiB" in verdict and "4 devices, mesh data=4" in verdict, verdict
    needs = float(verdict.split("needs ")[1].split(" GiB")[0])
    assert needs > 0.001
    assert "not launching" in proc.stderr and "sbatch" not in proc.stderr.replace(
        "slurm.sbatch", ""
    )
    assert not os.path.exists(tmp_path / "logs")  # nothing after the check ran


def test_local_stops_every_process_when_one_fails(tmp_path):
    """launch/local.sh with a stand-in for python: process 1 fails at once, process 0 would wait
    on it for minutes (as a JAX peer would); the script stops process 0 and exits with 1's status."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in *--process_id=1*) echo "process 1 failed" >&2; exit 7 ;; esac\n'
        "echo waiting; exec sleep 313\n"
    )
    fake.chmod(0o755)
    workdir = tmp_path / "run"
    args = [
        "launch/local.sh",
        "--skip_fit_check",
        "--",
        "train",
        "--config=c",
        f"--workdir={workdir}",
    ]
    t0 = time.monotonic()
    proc = _launch(args, env={"PYTHON": str(fake)}, timeout=120)
    assert proc.returncode == 7, (proc.stdout, proc.stderr)
    assert time.monotonic() - t0 < 60
    assert "exited with status 7; stopping the others" in proc.stderr
    assert (workdir / "logs" / "process_1.log").read_text() == "process 1 failed\n"
    assert "waiting" in proc.stdout  # process 0's log was streamed
    alive = subprocess.run(["pgrep", "-f", "sleep 313"], capture_output=True, text=True).stdout
    assert not alive.strip(), "process 0 was left running"


# ----------------------------------------------------------------------------------------------
# launch/local.sh for real (slow)
# ----------------------------------------------------------------------------------------------


def _local(workdir, steps: int, processes: int, devices: int, *, fit_check: bool = False):
    proc = _launch(
        [
            "launch/local.sh",
            f"--processes={processes}",
            f"--devices_per_process={devices}",
            f"--port={_free_port()}",
            *([] if fit_check else ["--skip_fit_check"]),
            "--",
            "train",
            *TINY_FLAGS,
            "--config.train.checkpoint_every=3",
            "--config.train.progress=False",
            "--config.sample.grid_prompts=()",  # no sample grid: its compile is not what is tested
            f"--config.train.steps={steps}",
            f"--workdir={workdir}",
        ],
        env={"PYTHON": sys.executable, "PYTHONPATH": ROOT},
        timeout=900,
    )
    logs = ""
    for i in range(processes):
        path = os.path.join(workdir, "logs", f"process_{i}.log")
        if os.path.exists(path):
            with open(path) as f:
                logs += f"--- process {i}:\n" + f.read()[-3000:]
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{logs}"
    return proc, logs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps_per_s(workdir, compiled_at: set[int]) -> float:
    """Median steps/s of the logged steps (one a line), leaving out those that compiled."""
    rows = [r for r in read_metrics(workdir) if "steps_per_s" in r]
    return float(np.median([r["steps_per_s"] for r in rows if r["step"] not in compiled_at]))


@pytest.mark.slow
def test_local_two_processes_train_resume_and_rate(tmp_path):
    """launch/local.sh: 2 processes x 2 CPU devices train 3 steps (after the fit check), then
    resume to 6; one process of 4 devices trains the same 6 steps; prints both steps/s (medians
    over the logged steps, leaving out the first of each run, which compiles)."""
    two, one = tmp_path / "two", tmp_path / "one"
    first, _ = _local(two, 3, 2, 2, fit_check=True)
    assert first.stdout.startswith("fits: ") and "4 devices" in first.stdout, first.stdout
    _, logs = _local(two, 6, 2, 2)
    assert "resumed from step 3" in logs and "process 1 of 2" in logs, logs
    assert [r["step"] for r in read_metrics(two) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    data = sorted(os.listdir(two / "checkpoints" / "6" / "data"))
    assert [f for f in data if f.startswith("process_")] == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    finals = [json.loads(ln) for ln in logs.splitlines() if ln.startswith("{")]
    assert len(finals) == 2 and finals[0]["loss"] == finals[1]["loss"]  # one global loss
    _local(one, 6, 1, 4)
    rate2, rate1 = _steps_per_s(two, {1, 4}), _steps_per_s(one, {1})
    print(f"\nsteps/s: 2 processes x 2 devices {rate2:.3f}, 1 process x 4 devices {rate1:.3f}")
    print(f"ratio 2-process / 1-process = {rate2 / rate1:.3f}")
    assert rate2 > 0 and rate1 > 0

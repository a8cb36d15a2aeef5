"""Will this run fit? Every launcher asks before it spends anything; exit 0 = yes, 3 = no.

    python launch/fit.py --topology=v5p-8 -- --config=configs/default.py:B/2 [--config.FIELD=VALUE ...]
    python launch/fit.py --devices=16 --memory_gib=80 --memory_fraction=0.9 -- --config=...
    python launch/fit.py --devices=8 --memory_gib=host -- --config=...       # CPU devices of this host

TPU slices (``--topology``): `vdit compile --topology=... --json`, the real train step compiled for
the slice with libtpu (no TPU needed; multi-slice from ``mesh.dcn_data``); it fits when XLA's
per-device total is within the chip's HBM.

GPUs and CPU hosts (``--devices=N --memory_gib=M``): no compiler for the target runs here, so the
estimate is the same train step compiled by XLA's CPU backend over N host devices with the run's mesh
and shardings (`vdit compile --topology=local --json` under
``XLA_FLAGS=--xla_force_host_platform_device_count=N``): parameters, optimizer state, EMA and batch
per device from their shardings, plus XLA's temporaries for the step. The budget is
``memory_gib * memory_fraction`` per device (JAX on GPU allocates ``XLA_PYTHON_CLIENT_MEM_FRACTION``
of the memory, 0.75 unless set); for CPU devices (``--memory_gib=host``) this host's available
memory divided by the devices. It is an estimate: the GPU compiler fuses and schedules
differently, and the attention kernel's own buffers (Triton on GPU, the chunked loop on CPU, both
O(L * block)) are not XLA temporaries.

The verdict is one line naming the numbers, e.g.
``does not fit: needs 97.312 GiB per device, budget 72.000 GiB (80 GiB x 0.9 of NVIDIA GPU); try ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

GiB = 1024**3
FITS, NO_FIT, ERROR = 0, 3, 2


def _compile(vdit_args: list[str], topology: str, devices: int | None) -> dict:
    env = dict(os.environ)
    if devices is not None:  # host devices standing in for the run's accelerators
        env["JAX_PLATFORMS"] = "cpu"
        flags = [
            f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f
        ]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    else:
        env.setdefault("JAX_PLATFORMS", "cpu")  # TPU compiles need libtpu, not a TPU
    cmd = [sys.executable, "-m", "vdit.cli", "compile", *vdit_args, f"--topology={topology}"]
    proc = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        print(err[-1] if err else f"vdit compile exited {proc.returncode}", file=sys.stderr)
        sys.exit(proc.returncode or ERROR)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _host_available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: line.split()[1] for line in f if ":" in line}
    return int(info.get("MemAvailable", info["MemTotal"])) * 1024 / GiB


def check(args: argparse.Namespace, vdit_args: list[str]) -> tuple[bool, str]:
    """(fits, the verdict line)."""
    if args.topology:
        r = _compile(vdit_args, args.topology, None)
        total = r["bytes_per_device"]["total"]
        budget = r["chip"]["hbm_per_device"]
        where = f"HBM of {r['chip']['name']}, {r['topology']}"
        tries = r.get("try", [])
        fits = bool(r["fits"])
    else:
        r = _compile(vdit_args, "local", args.devices)
        total = r["bytes_per_device"]["total"]
        if args.memory_gib == "host":  # CPU devices share this host's memory
            gib = _host_available_gib() / args.devices
            where = f"this host's available memory / {args.devices} devices"
            budget = gib * GiB
        else:
            gib = float(args.memory_gib)
            budget = gib * args.memory_fraction * GiB
            where = f"{gib:g} GiB x {args.memory_fraction:g} of {args.device_name}"
        tries = ["a smaller data.batch_rows or data.row_len", "model.remat=full", "more devices"]
        fits = total <= budget
    mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
    notes = "".join(f"; {n}" for n in r.get("notes", []))
    if fits:
        line = (
            f"fits: {total / GiB:.3f} of {budget / GiB:.3f} GiB per device ({where}; "
            f"{r['devices']} devices, mesh {mesh}{notes})"
        )
    else:
        line = (
            f"does not fit: needs {total / GiB:.3f} GiB per device, budget {budget / GiB:.3f} GiB "
            f"({where}; {r['devices']} devices, mesh {mesh}{notes}); try {'; '.join(tries)}"
        )
    return fits, line


def main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        own, vdit_args = argv[:split], argv[split + 1 :]
    else:
        own, vdit_args = argv, []
    p = argparse.ArgumentParser(
        prog="launch/fit.py", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    p.add_argument("--topology", help="TPU slice for `vdit compile`, e.g. v5p-8")
    p.add_argument("--devices", type=int, help="accelerators of the run (GPUs, or CPU devices)")
    p.add_argument(
        "--memory_gib",
        help="memory per device, GiB (H100: 80), or 'host': this host's available memory shared "
        "by --devices CPU devices",
    )
    p.add_argument(
        "--memory_fraction", type=float, default=0.75, help="share of it JAX may allocate"
    )
    p.add_argument("--device_name", default="GPU", help="what the devices are, for the message")
    args = p.parse_args(own)
    if not any(a.startswith("--config=") for a in vdit_args):
        p.error("after --, the run's flags: --config=FILE[:VARIANT] [--config.FIELD=VALUE ...]")
    if bool(args.topology) == bool(args.devices):
        p.error("give either --topology=SLICE (TPU) or --devices=N --memory_gib=M (GPU, CPU)")
    if args.devices and not args.memory_gib:
        p.error("--devices needs --memory_gib (memory per device, GiB)")
    # only the config reaches `vdit compile` (not --workdir and the other train flags)
    vdit_args = [a for a in vdit_args if a.startswith("--config")]
    fits, line = check(args, vdit_args)
    print(line, file=sys.stdout if fits else sys.stderr)
    return FITS if fits else NO_FIT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Multi-process start-up: `jax.distributed.initialize` from flags, from the cluster, or not at all.

A multi-host run is one process per host (or per GPU), all running the same command. Before any of them
touches a device, `initialize` connects them through a coordinator so that `jax.devices()` lists the
devices of every process and jitted computations on global arrays span them all.

Where the process layout comes from, in order:

1. Flags: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (all three, or on a
   detected cluster any subset, the rest filled in by JAX), optionally `--local_device_ids=0,1`.
2. The environment, when it is one that JAX's cluster detection reads
   (`jax.distributed.initialize()` with no arguments then fills everything in):

   | cluster | detected by (all must be set) | JAX reads |
   |---|---|---|
   | SLURM (`srun`) | `SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_NTASKS` > 1, `SLURM_PROCID`, `SLURM_LOCALID` | coordinator = first node of `SLURM_STEP_NODELIST`, processes = `SLURM_NTASKS`, id = `SLURM_PROCID`, local device = `SLURM_LOCALID` (one GPU per task) |
   | Open MPI (`mpirun`) | `OMPI_MCA_orte_hnp_uri`, `OMPI_COMM_WORLD_SIZE` > 1 | coordinator from the URI, `OMPI_COMM_WORLD_SIZE`, `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_LOCAL_RANK` |
   | TPU slice on GKE | `TPU_WORKER_HOSTNAMES` (or `TPU_PROCESS_ADDRESSES`) with more than one host | the host list, `TPU_WORKER_ID` |
   | Cloud TPU VM | libtpu installed, TPU chips attached (`/dev/accel*` or `/dev/vfio/<n>`), no `TPU_SKIP_MDS_QUERY` | the VM metadata server (this worker's number, the network endpoints of all workers) |

   `JAX_COORDINATOR_ADDRESS` (and `JAX_COORDINATOR_PORT`) override the coordinator JAX derives; other
   environments JAX knows (Kubernetes JobSets, `mpi4py`) are used with `--distributed=on`.
3. Otherwise a single process: nothing is initialized.

On CPU, cross-process collectives need an implementation: `gloo` is selected (unless one is set
already) before the backend starts.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence

import jax

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `initialize` will do: the keyword arguments of `jax.distributed.initialize`, and why."""

    kwargs: dict
    source: str  # "flags", the detected cluster's name, or "forced"


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """Name of the multi-process cluster environment JAX would detect, or None (see the table above)."""
    env = os.environ if environ is None else environ

    def count(name: str) -> int:
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1

    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm) and count("SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "gke_tpu"
    if environ is None and _on_cloud_tpu_vm():
        return "cloud_tpu"
    return None


def _on_cloud_tpu_vm() -> bool:
    if importlib.util.find_spec("libtpu") is None or "TPU_SKIP_MDS_QUERY" in os.environ:
        return False  # JAX skips the metadata server when TPU_SKIP_MDS_QUERY is set
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _parse_device_ids(ids: str | Sequence[int] | None) -> list[int] | None:
    if ids is None or ids == "" or ids == []:
        return None
    if isinstance(ids, str):
        try:
            return [int(x) for x in ids.split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"--local_device_ids={ids!r}: expected comma-separated integers, e.g. 0,1"
            ) from None
    return [int(x) for x in ids]


def plan(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: str | Sequence[int] | None = None,
    mode: str = "auto",
    cluster: str | None = None,
) -> Plan | None:
    """Decide how to initialize (None: a single process). Raises ValueError naming the flag at fault.

    `cluster` is the detected environment (`detect_cluster()`); it lets a subset of the flags be given.
    """
    if mode not in MODES:
        raise ValueError(f"--distributed={mode!r}: expected one of {MODES}")
    ids = _parse_device_ids(local_device_ids)
    given = {
        "coordinator_address": coordinator_address or None,
        "num_processes": num_processes,
        "process_id": process_id,
        "local_device_ids": ids,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if mode == "off":
        if given:
            raise ValueError(f"--distributed=off contradicts --{', --'.join(given)}")
        return None
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be >= 1")
    if process_id is not None and process_id < 0:
        raise ValueError(f"--process_id={process_id} must be >= 0")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(
            f"--process_id={process_id} is out of range for --num_processes={num_processes} "
            f"(ids are 0..{num_processes - 1})"
        )
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"--coordinator_address={coordinator_address!r}: expected HOST:PORT, e.g. "
                "10.0.0.1:1234 (the address of process 0)"
            )
    layout = {k for k in given if k != "local_device_ids"}
    if layout and cluster is None and mode != "on":
        missing = {"coordinator_address", "num_processes", "process_id"} - layout
        if missing:
            raise ValueError(
                f"--{', --'.join(sorted(layout))} given without --{', --'.join(sorted(missing))}: "
                "outside a cluster JAX detects (SLURM, Open MPI, TPU), a multi-process run needs "
                "all of --coordinator_address, --num_processes and --process_id"
            )
    if layout:
        return Plan(given, "flags")
    if mode == "on":
        return Plan(given, "forced")
    if cluster is not None:
        return Plan(given, cluster)
    if ids is not None:
        raise ValueError(
            "--local_device_ids needs a multi-process run (--coordinator_address, "
            "--num_processes, --process_id, or a cluster JAX detects)"
        )
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: str | Sequence[int] | None = None,
    mode: str = "auto",
) -> Plan | None:
    """Initialize `jax.distributed` as `plan` decides (call before any device use); returns the plan.

    A no-op when `jax.distributed` is already initialized.
    """
    if jax.distributed.is_initialized():
        return None
    cluster = detect_cluster() if mode != "off" else None
    p = plan(coordinator_address, num_processes, process_id, local_device_ids, mode, cluster)
    if p is None:
        return None
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("jax.distributed.initialize(%s) from %s", p.kwargs, p.source)
    jax.distributed.initialize(**p.kwargs)
    return p


def describe() -> str:
    """One line on the process layout, e.g. for the start of a log."""
    return (
        f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local / {jax.device_count()} global "
        f"{jax.default_backend()} devices"
    )


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Block until every process has reached `name` (a no-op for one process).

    This is the coordinator's barrier (orbax's `get_barrier_sync_fn`), not a device collective: a peer
    that is still compiling makes the others wait here instead of timing out inside their first
    collective (CPU collectives give up on a peer after about 30 s). `name` must be unique in a run.
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)

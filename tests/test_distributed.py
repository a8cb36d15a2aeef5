"""Multi-process start-up decisions: flags, cluster detection, and the errors that name the problem."""

import pytest
from test_cli import DEFAULT_CONFIG, _vdit

from vdit.parallel.distributed import Plan, detect_cluster, plan

SLURM = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}


def test_single_process_initializes_nothing():
    assert plan() is None
    assert plan(mode="off") is None


def test_flags_give_the_layout():
    p = plan("10.0.0.1:1234", 4, 3, "0,1")
    assert p == Plan(
        {
            "coordinator_address": "10.0.0.1:1234",
            "num_processes": 4,
            "process_id": 3,
            "local_device_ids": [0, 1],
        },
        "flags",
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"process_id": 1}, "--process_id given without --coordinator_address, --num_processes"),
        ({"coordinator_address": "h:1", "num_processes": 2}, "without --process_id"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "out of range"),
        ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, "--num_processes=0"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": -1}, "--process_id=-1"),
        ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
        ({"local_device_ids": "0,x"}, "comma-separated integers"),
        ({"local_device_ids": "0"}, "--local_device_ids needs a multi-process run"),
        ({"process_id": 0, "mode": "off"}, "--distributed=off contradicts --process_id"),
        ({"mode": "sometimes"}, "--distributed='sometimes'"),
    ],
)
def test_bad_flags_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        plan(**kwargs)


@pytest.mark.parametrize(
    "environ, expected",
    [
        (SLURM, "slurm"),
        (dict(SLURM, SLURM_NTASKS="1"), None),  # a one-task job is a single process
        ({k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}, None),  # JAX needs all five
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
        ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "2"}, "gke_tpu"),
        ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, "gke_tpu"),
        ({"TPU_WORKER_HOSTNAMES": "w-0"}, None),  # a single-host slice
        ({}, None),
    ],
)
def test_cluster_detection_reads_what_jax_reads(environ, expected):
    assert detect_cluster(environ) == expected


def test_a_detected_cluster_fills_in_what_the_flags_leave_out():
    assert plan(cluster="slurm") == Plan({}, "slurm")
    # On a cluster, a subset of the flags is enough: JAX derives the rest from the environment.
    assert plan("10.0.0.1:1234", cluster="slurm") == Plan(
        {"coordinator_address": "10.0.0.1:1234"}, "flags"
    )
    assert plan(local_device_ids="0", cluster="slurm") == Plan({"local_device_ids": [0]}, "slurm")
    assert plan(mode="off", cluster="slurm") is None
    assert plan(mode="on") == Plan({}, "forced")


def test_cli_rejects_an_incomplete_layout(tmp_path):
    proc = _vdit(
        "train",
        f"--config={DEFAULT_CONFIG}:mu/4",
        f"--workdir={tmp_path}",
        "--process_id=1",
        check=False,
    )
    assert proc.returncode != 0
    assert "--process_id given without --coordinator_address, --num_processes" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()

"""Golden parameter tables: every parameter's path, shape and PartitionSpec of the standard variants
on a fixed mesh of the 8 test devices, from abstract shapes (nothing allocated): (fsdp=4, tensor=2),
or fsdp=8 for Ti, whose 3 heads do not split over two devices.

A change to a model's parameters or to the sharding rules shows up here as a diff. When it is
intended, regenerate the files and review the diff in version control:

    VDIT_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

import difflib
import os

import jax
import pytest
from tiny import ROOT, load_config_module

from vdit import configlib, plan

GOLDEN = os.path.join(ROOT, "tests", "golden")
# variant -> (fsdp, tensor)
VARIANTS = {"Ti/2": (8, 1), "B/2": (4, 2), "XL/2": (4, 2)}


def golden_path(variant: str) -> str:
    return os.path.join(GOLDEN, f"params_{variant.replace('/', '-')}.txt")


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_shardings_match_golden(variant):
    c = load_config_module().get_config(variant)
    fsdp, tensor = VARIANTS[variant]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.sequence = 1, fsdp, tensor, 1
    c.data.batch_rows = 8  # rows split over fsdp (the table does not depend on it)
    table = plan.param_table(configlib.load(c, 8), jax.devices()[:8]) + "\n"
    assert table.startswith(
        f"mesh {{'data': 1, 'fsdp': {fsdp}, 'tensor': {tensor}, 'sequence': 1}}"
    )
    path = golden_path(variant)
    if os.environ.get("VDIT_UPDATE_GOLDEN") == "1":
        with open(path, "w") as f:
            f.write(table)
    if not os.path.exists(path):
        pytest.fail(
            f"{path} is missing; create it with VDIT_UPDATE_GOLDEN=1 python -m pytest "
            "tests/test_golden.py"
        )
    with open(path) as f:
        golden = f.read()
    if table != golden:
        diff = "".join(
            difflib.unified_diff(
                golden.splitlines(True), table.splitlines(True), "golden", "now", n=1
            )
        )
        pytest.fail(
            f"parameters or shardings of {variant} differ from {path}:\n{diff}\nIf this is "
            "intended: VDIT_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py"
        )

"""The systemd lane runs only inside `vm/run --systemd`: it starts, kills and stops real
units under systemd as PID 1, which this host has not. Say so instead of skipping."""

import os

import pytest


def pytest_configure(config):
    if os.environ.get("XX_VM_SYSTEMD") != "1" or not os.path.isdir("/run/systemd/system"):
        raise pytest.UsageError(
            "tests/vm_systemd runs under systemd in the VM: "
            "vm/run --systemd -- python -m pytest tests/vm_systemd"
        )

"""The VM lane runs only inside vm/run: the host kernel cannot enforce what these tests check,
so running them here would fail for the wrong reason. Say so instead of skipping."""

import os

import pytest


def pytest_configure(config):
    if os.environ.get("XX_IN_VM") != "1":
        raise pytest.UsageError("tests/vm runs inside the VM: vm/run -- python -m pytest tests/vm")

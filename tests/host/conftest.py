"""Fixtures of the host lane."""

import pytest

from tests.support.harness import Daemon


@pytest.fixture
def daemon(tmp_path):
    """A throwaway xxnode with its own config, state dir, socket and cgroup subtree; when the
    test ends nothing of it may be left, not even the subtree."""
    d = Daemon(tmp_path / "node", max_running=4)
    d.start()
    yield d
    d.cleanup()
    assert not d.cgroup.exists()

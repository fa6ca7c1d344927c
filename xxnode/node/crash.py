"""The restart tests' seam: a node that dies as `kill -9` would, at the one instant a test
names ($XXNODE_TEST_CRASH = after-place | after-accept | after-finish: right after that
journal write). Unset, it costs one dict lookup per journal write."""

from __future__ import annotations

import os
import signal

CRASH_ENV = "XXNODE_TEST_CRASH"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)

"""Waiting for a state that nothing announces (a scrape landing, a file's contents): the
check is asked again until it holds, within a bound, so a test fails rather than hangs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(what: Callable[[], T], timeout: float, pause: float = 0.2) -> T:
    """what() until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(pause)

"""sd_notify(3) for the daemons: READY=1, STATUS=, WATCHDOG=1 and STOPPING=1 to systemd.

The protocol is one datagram per message on the AF_UNIX socket named by $NOTIFY_SOCKET
(a path, or `@name` for the abstract namespace), `KEY=VALUE` lines. Outside systemd
$NOTIFY_SOCKET is unset and every call is a no-op, so the daemons run the same either way.

The watchdog (`WatchdogSec=` in the unit) follows sd_watchdog_enabled(3): it is on when
$WATCHDOG_USEC is set and $WATCHDOG_PID is unset or names this process. `watchdog()` is a
task on the daemon's own event loop that pings every WATCHDOG_USEC / 2: a loop that hangs
(a blocking call, SIGSTOP) stops pinging, and systemd aborts and restarts the daemon.

The variables are taken out of the environment when read (sd_notify's unset_environment),
so the jobs and environments a daemon starts cannot speak for it.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), or None when the watchdog is off
    for process `pid` (sd_watchdog_enabled semantics; a malformed value counts as off)."""
    usec = env.get(ENV_WATCHDOG_USEC, "")
    owner = env.get(ENV_WATCHDOG_PID, "")
    if not usec:
        return None
    try:
        if owner and int(owner) != pid:
            return None
        n = int(usec)
    except ValueError:
        return None
    return n / 2e6 if n > 0 else None


class Notifier:
    """The daemon's line to systemd. Build it once with `from_environ()` at start."""

    def __init__(self, address: str | None, interval: float | None):
        self.address = address  # None: not under systemd (or NotifyAccess refuses)
        self.interval = interval  # seconds between WATCHDOG=1; None: no watchdog
        self.sent = 0

    @classmethod
    def from_environ(cls, env: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        address = env.pop(ENV_SOCKET, "") or None
        interval = watchdog_interval(env, os.getpid())
        env.pop(ENV_WATCHDOG_USEC, None)
        env.pop(ENV_WATCHDOG_PID, None)
        if interval is not None:
            # systemd's watchdog kills with SIGABRT: leave the Python stacks of every
            # thread in the journal, to show where the loop hung
            faulthandler.enable(all_threads=True)
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send `KEY=VALUE` lines as one datagram; False if there is no one to tell."""
        if self.address is None:
            return False
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        data = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(data, addr)
        except OSError as e:
            log.warning("sd_notify to %s: %s", self.address, e)
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    async def watchdog(self) -> None:
        """Ping from the event loop for as long as it runs (cancel to stop)."""
        if self.address is None or self.interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.interval)

    def start_watchdog(self) -> asyncio.Task | None:
        """The watchdog as a task on the running loop; None when systemd asked for none."""
        if self.address is None or self.interval is None:
            return None
        log.info("systemd watchdog: a ping every %.1f s", self.interval)
        return asyncio.get_running_loop().create_task(self.watchdog(), name="sd-watchdog")

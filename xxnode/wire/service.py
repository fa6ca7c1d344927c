"""What the daemons on one endpoint (the shard, the node's dispatcher) share of
starting and stopping."""

from __future__ import annotations

import asyncio
import signal

from xxnode.wire.endpoint import Endpoint


class Service:
    """A daemon on one endpoint with background tasks (the shard, the node's dispatcher):
    what they share of starting and stopping."""

    ep: Endpoint | None = None

    def _spawn(self, coro) -> asyncio.Task:
        tasks = self.__dict__.setdefault("_tasks", set())
        t = asyncio.ensure_future(coro)
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        return t

    def close(self) -> None:
        for t in list(self.__dict__.get("_tasks", ())):
            t.cancel()
        if self.ep is not None:
            self.ep.close()

    async def serve_until_signal(self) -> signal.Signals:
        """Run until SIGINT or SIGTERM, then close: the standalone daemons' main loop.
        Returns the signal, for the daemon's last log line."""
        got: asyncio.Future = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda s=sig: got.done() or got.set_result(s))
        sig = await got
        self.close()
        return signal.Signals(sig)

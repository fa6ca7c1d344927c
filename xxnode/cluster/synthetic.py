"""A stand-in machine for the dispatcher: tests, the benchmark and the demo run many
"nodes" without root or cgroups.  `python -m xxnode.cluster.synthetic --shards ... --key-file
...` is one such node as its own process."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import heapq
import os
import sys
import time

from xxnode import wire
from xxnode.cluster.dispatcher import ClusterJob, Dispatcher

OUTPUT_KEEP = 1 << 20  # per stream, as a node's default output_limit


class SyntheticExecutor:
    """A stand-in machine for tests and the benchmark: each job holds ``per_job_bytes``
    of a ``total_bytes`` machine for ``spec["sleep"]`` seconds (or runs ``spec["argv"]``
    as a real process), and -- when ``record`` is a path -- appends its job id to that
    file, so a test can count executions across processes."""

    def __init__(
        self,
        total_bytes: int = 16 << 30,
        per_job_bytes: int = 256 << 20,
        record: str | None = None,
        refuse_when_free_below: int = 0,
        slots: int = 0,
        ranks: dict[str, int] | None = None,
    ) -> None:
        self.total_bytes = total_bytes
        # slots > 0: at most that many jobs run at once and a waiting job of a higher
        # class (by ``ranks``) starts first -- the machine scheduler in miniature
        self.slots, self._free, self.ranks = slots, slots, ranks or {}
        self._waiting: list = []  # heap of (-rank, seq, future)
        self._seq = 0
        self.per_job = per_job_bytes
        self.running = 0
        self.refuse_below = refuse_when_free_below
        self._fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if record else -1

    def snapshot(self) -> tuple[int, int]:
        return self.total_bytes - self.running * self.per_job, self.running

    def admit(self, cls: str) -> str | None:
        free = self.total_bytes - self.running * self.per_job
        if free < self.refuse_below:
            return f"memory critically full ({free} bytes free)"
        return None

    async def _acquire(self, cls: str) -> None:
        if not self.slots:
            return
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._waiting, (-self.ranks.get(cls, 0), self._seq, fut))
        await fut  # the releasing job hands its slot over

    def _release(self) -> None:
        if not self.slots:
            return
        while self._waiting:
            fut = heapq.heappop(self._waiting)[2]
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1

    async def run(self, job: ClusterJob) -> dict:
        self.running += 1
        t0 = time.monotonic()
        await self._acquire(job.cls)
        try:
            if "spin" in job.spec:  # burn a CPU in a child, as a CPU-bound function would
                spin = float(job.spec["spin"])
                code = f"import time\ne=time.time()+{spin}\nwhile time.time()<e: pass"
                p = await asyncio.create_subprocess_exec(sys.executable, "-S", "-c", code)
                await p.wait()
            if self._fd >= 0:
                os.write(self._fd, job.id.hex().encode() + b"\n")
            argv = job.spec.get("argv")
            if argv:
                p = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, err = await p.communicate(job.payload)
                status = p.returncode
                keep = OUTPUT_KEEP
                extra = {
                    "stdout": out[:keep].decode(errors="replace"),
                    "stderr": err[:keep].decode(errors="replace"),
                    "stdout_dropped": max(len(out) - keep, 0),
                    "stderr_dropped": max(len(err) - keep, 0),
                }
            else:
                await asyncio.sleep(float(job.spec.get("sleep", 0.0)))
                status = 0
                extra = {
                    "input_bytes": len(job.payload),
                    "input_sha256": hashlib.sha256(job.payload).hexdigest(),
                }
        finally:
            self._release()
            self.running -= 1
        return {"status": status, "wall_s": round(time.monotonic() - t0, 6), **extra}


def _default_ranks() -> dict[str, int]:
    from xxnode.config import builtin_classes

    return builtin_classes().ranks()


# --- standalone process (tests, demo) ----------------------------------------------------


async def _serve(args) -> None:
    key = wire.load_key(args.key_file)
    ex = SyntheticExecutor(
        total_bytes=args.total_mb << 20,
        per_job_bytes=args.per_job_mb << 20,
        record=args.record,
        slots=args.slots,
        ranks=_default_ranks() if args.slots else None,
    )
    shards = [wire.parse_addr(s) for s in args.shards.split(",")]
    d = Dispatcher(args.node_id, shards, ex, k=args.k, heartbeat_s=args.heartbeat)
    drop, seed = wire.drop_from_env()
    addr = await d.start(wire.parse_addr(args.listen), wire.Codec(key), drop, seed)
    print(f"xxdispatch: {args.node_id} listening on {wire.fmt_addr(addr)}", flush=True)
    await d.serve_until_signal()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m xxnode.cluster.synthetic", description="a standalone node dispatcher"
    )
    ap.add_argument("--shards", required=True, metavar="HOST:PORT[,...]")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--key-file", required=True)
    ap.add_argument("--node-id", default=f"{os.uname().nodename}-{os.getpid()}")
    ap.add_argument("--record", help="synthetic: append each executed job id to FILE")
    ap.add_argument("--total-mb", type=int, default=16384)
    ap.add_argument("--per-job-mb", type=int, default=256)
    ap.add_argument("--slots", type=int, default=0, help="synthetic: jobs at once (0: any)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--heartbeat", type=float, default=0.25)
    args = ap.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except (ValueError, OSError) as e:
        print(f"xxdispatch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The node's side of the cluster: the dispatcher, run inside xxnode.

The dispatcher (xxnode/cluster/dispatcher.py) joins shard idle lists, answers probes and takes
placements; here its executor is this daemon itself — a placed job is admitted like a local
`xxctl run`, with its class's cgroup, SCHED_FIFO priority and OOM rank, and the free
memory and job count it publishes are the memory manager's, not a guess from /proc.
"""

from __future__ import annotations

from xxnode import wire
from xxnode.cluster.dispatcher import ClusterJob, Dispatcher
from xxnode.config import ClusterConfig
from xxnode.node.jobs import SpecError


class NodeExecutor:
    """Runs placed jobs on this node (the Executor the dispatcher drives)."""

    def __init__(self, node) -> None:
        self.node = node
        self.total_bytes = node.memory.sample().total

    def snapshot(self) -> tuple[int, int]:
        s = self.node.memory.last or self.node.memory.sample()
        return s.available, sum(1 for j in self.node.jobs.values() if j.state == "running")

    def admit(self, cls: str) -> str | None:
        """Refuse only when memory is critically short *and* work of this class or better
        holds it: lower classes would be swapped out for this job, equals and betters not."""
        node, mem = self.node, self.node.memory
        c = node.classes.get(cls)
        if c is None:
            return f"unknown class {cls!r}"
        s = mem.last or mem.sample()
        if s.available >= s.total * mem.cfg.low_free_fraction:
            return None
        if any(
            j.state == "running" and node.classes.get(j.cls).rank >= c.rank
            for j in node.jobs.values()
        ):
            return "memory critically short, held by equal or higher classes"
        return None

    async def run(self, job: ClusterJob) -> dict:
        import base64

        req = {"class": job.cls, "argv": job.spec.get("argv", [])}
        for k in ("env", "cwd", "timeout"):
            if k in job.spec:
                req[k] = job.spec[k]
        if job.payload:
            req["stdin"] = base64.b64encode(job.payload).decode()
        try:
            local = self.node.submit(req)
        except SpecError as e:
            return {"status": wire.FAILED_START, "error": f"job refused: {e}"}
        res = dict(await self.node.wait(local.id))
        code, sig = res.get("exit_code"), res.get("signal")
        res["status"] = code if code is not None else (128 + sig if sig else wire.FAILED_START)
        res["stdout"] = self.node.read_output(local.id, "stdout", 4096)
        return res


async def start(node, cfg: ClusterConfig) -> Dispatcher:
    key = wire.load_key(cfg.key_file)
    node_id = cfg.node_id or f"{__import__('os').uname().nodename}-{node.root.path.name}"
    d = Dispatcher(node_id, [wire.parse_addr(s) for s in cfg.shards], NodeExecutor(node))
    try:
        await d.start(wire.parse_addr(cfg.listen), wire.Codec(key))
    except OSError as e:
        raise RuntimeError(f"cluster.listen {cfg.listen}: {e.strerror}") from None
    return d

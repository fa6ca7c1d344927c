"""A job's leaf cgroup, ``<root>/<class>/<job>``: the one place that knows where a job's
cgroup lives and which of its files a job's life touches — made and limited before the
launch, read for accounting at the end, killed and removed (senpai's ``Cgroup`` is the
model). The daemon, recovery and the memory manager all hold this object; none rebuilds
the path."""

from __future__ import annotations

from dataclasses import dataclass

from xxnode.kernel.cgroup import Cgroup


@dataclass(frozen=True)
class JobCgroup(Cgroup):
    cls: str = ""
    job_id: str = ""

    @classmethod
    def of(cls, root: Cgroup, job_class: str, job_id: str) -> JobCgroup:
        return cls(root.child(job_class).child(job_id).path, job_class, job_id)

    @classmethod
    def present(cls, root: Cgroup, classes: list[str]) -> list[JobCgroup]:
        """Every job leaf in the tree now (recovery reaps those with no journal record)."""
        return [
            cls(leaf.path, c, leaf.path.name) for c in classes for leaf in root.child(c).children()
        ]

    def make(self, enabled: set[str], pids_max: int) -> None:
        """mkdir (never reuse a leaf: a stale one could hold an old job's processes), with
        the per-job limits the enabled controllers allow."""
        Cgroup(self.path.parent).create(self.job_id, exist_ok=False)
        if "pids" in enabled:
            self.write("pids.max", pids_max)
        if "memory" in enabled and self.has("memory.oom.group"):
            self.write("memory.oom.group", 1)  # an OOM kill takes the whole job

    def accounting(self) -> tuple[dict[str, int], int | None, int | None]:
        """(cpu.stat, memory.peak, OOM kills) — what the job's result bills and reports."""
        if not self.exists():
            return {}, None, None
        peak = self.read_int("memory.peak") if self.has("memory.peak") else None
        oom = self.memory_events().get("oom_kill") if self.has("memory.events") else None
        return self.cpu_stat(), peak, oom

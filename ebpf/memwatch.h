/* SPDX-License-Identifier: GPL-2.0 */
/*
 * memwatch: what the kernel side (memwatch.bpf.c) and the loader (xxnode/kernel/bpf.py)
 * share. The loader mirrors struct memwatch_counters field by field, in this order; a host
 * test (tests/host/test_bpf.py) parses this file and fails if the two drift apart.
 */
#ifndef MEMWATCH_H
#define MEMWATCH_H

/* Cgroups tracked at once. The map is an LRU: a node that churns through more jobs than this
 * between two daemon reads loses the counters of the least recently touched cgroups. */
#define MEMWATCH_MAX_CGROUPS 16384

/* Tasks that can be inside a reclaim episode at the same moment (start-time scratch map). */
#define MEMWATCH_MAX_STALLS 8192

/* Key 0 collects what cannot be attributed to a cgroup (OOM victims on kernels whose
 * mark_victim tracepoint only passes a pid). */
#define MEMWATCH_UNATTRIBUTED 0

/* Value of the per-CPU "counters" map, keyed by cgroup v2 id (__u64, the inode number of the
 * cgroup's directory). User space sums the per-CPU copies. Every field is a monotonically
 * increasing __u64 so the per-CPU layout needs no padding. */
struct memwatch_counters {
	__u64 page_faults;       /* user-mode page faults taken by tasks in this cgroup */
	__u64 write_faults;      /* ... of which on a write access */
	__u64 reclaim_events;    /* memcg reclaim passes aimed at this cgroup (limit hit,
				    memory.high, memory.max or memory.reclaim write) */
	__u64 pages_reclaimed;   /* pages those passes reclaimed */
	__u64 reclaim_stalls;    /* reclaim episodes (memcg or global direct) that tasks of this
				    cgroup sat in */
	__u64 reclaim_stall_ns;  /* time they spent there */
	__u64 stall_reclaimed;   /* pages reclaimed during those episodes */
	__u64 direct_reclaims;   /* of reclaim_stalls, global direct reclaim (the node, not a
				    cgroup limit, was short of memory) */
	__u64 oom_kills;         /* OOM victims whose cgroup this was */
};

#endif /* MEMWATCH_H */

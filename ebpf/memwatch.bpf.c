// SPDX-License-Identifier: GPL-2.0
/*
 * memwatch: per-cgroup memory events for the XX memory manager.
 *
 * One CO-RE object for every kernel we run on (Debian 6.1 in the VM lane, 6.18 on the build
 * hosts). Only tp_btf and fexit programs: their context is the tracepoint's or function's
 * argument list from the running kernel's BTF, so we never name a trace_event_raw_* context
 * struct (those differ: trace_event_raw_x86_exceptions in 6.1, _exceptions in 6.18). Every
 * struct field is read with CO-RE relocations.
 *
 * Hooks (see docs/ebpf.md):
 *   tp_btf/page_fault_user                  page_faults, write_faults       (current cgroup)
 *   fexit/try_to_free_mem_cgroup_pages      reclaim_events, pages_reclaimed (target memcg)
 *   tp_btf/mm_vmscan_memcg_reclaim_begin/end  reclaim_stall*                (current cgroup)
 *   tp_btf/mm_vmscan_direct_reclaim_begin/end reclaim_stall*, direct_reclaims (current)
 *   tp_btf/mark_victim                      oom_kills                       (victim's cgroup)
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "memwatch.h"

char LICENSE[] SEC("license") = "GPL";

#define X86_PF_WRITE 0x2 /* error_code bit: the access was a write */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, MEMWATCH_MAX_CGROUPS);
	__type(key, __u64);
	__type(value, struct memwatch_counters);
} counters SEC(".maps");

/* tid -> ktime at the start of the reclaim episode that task is in */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MEMWATCH_MAX_STALLS);
	__type(key, __u32);
	__type(value, __u64);
} stall_start SEC(".maps");

static __always_inline struct memwatch_counters *slot(__u64 cgid)
{
	struct memwatch_counters *c, zero = {};

	c = bpf_map_lookup_elem(&counters, &cgid);
	if (c)
		return c;
	bpf_map_update_elem(&counters, &cgid, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&counters, &cgid);
}

/* The cgroup v2 id of a cgroup: its kernfs node id, which is also the inode number user
 * space sees for the directory and what bpf_get_current_cgroup_id() returns. */
static __always_inline __u64 task_cgroup_id(struct task_struct *t)
{
	return BPF_CORE_READ(t, cgroups, dfl_cgrp, kn, id);
}

/* -- memory growth: page faults --------------------------------------------------------- */

SEC("tp_btf/page_fault_user")
int BPF_PROG(on_page_fault, unsigned long address, struct pt_regs *regs,
	     unsigned long error_code)
{
	struct memwatch_counters *c = slot(bpf_get_current_cgroup_id());

	if (!c)
		return 0;
	__sync_fetch_and_add(&c->page_faults, 1);
	if (error_code & X86_PF_WRITE)
		__sync_fetch_and_add(&c->write_faults, 1);
	return 0;
}

/* -- reclaim aimed at a cgroup ---------------------------------------------------------------
 * try_to_free_mem_cgroup_pages(memcg, nr_pages, gfp, reclaim_options[, swappiness]) is the one
 * entry to memcg reclaim: charge over memory.max, memory.high at return to user, and writes to
 * memory.max / memory.reclaim. The task doing it is often not in memcg (the daemon writing
 * memory.reclaim), so attribute by the argument, not by current. Its argument count differs
 * between kernels (4 in 6.1, 5 in 6.18): take the return value with bpf_get_func_ret(). */

SEC("fexit/try_to_free_mem_cgroup_pages")
int BPF_PROG(on_memcg_reclaimed, struct mem_cgroup *memcg)
{
	struct memwatch_counters *c;
	__u64 nr_reclaimed = 0;

	bpf_get_func_ret(ctx, &nr_reclaimed);
	c = slot(BPF_CORE_READ(memcg, css.cgroup, kn, id));
	if (!c)
		return 0;
	__sync_fetch_and_add(&c->reclaim_events, 1);
	__sync_fetch_and_add(&c->pages_reclaimed, nr_reclaimed);
	return 0;
}

/* -- reclaim stalls suffered by a cgroup's tasks ----------------------------------------- */

static __always_inline void stall_begin(void)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 now = bpf_ktime_get_ns();

	bpf_map_update_elem(&stall_start, &tid, &now, BPF_ANY);
}

static __always_inline void stall_end(unsigned long nr_reclaimed, int direct)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct memwatch_counters *c;
	__u64 *start, delta;

	start = bpf_map_lookup_elem(&stall_start, &tid);
	if (!start)
		return; /* attached in the middle of this episode */
	delta = bpf_ktime_get_ns() - *start;
	bpf_map_delete_elem(&stall_start, &tid);
	c = slot(bpf_get_current_cgroup_id());
	if (!c)
		return;
	__sync_fetch_and_add(&c->reclaim_stalls, 1);
	__sync_fetch_and_add(&c->reclaim_stall_ns, delta);
	__sync_fetch_and_add(&c->stall_reclaimed, nr_reclaimed);
	if (direct)
		__sync_fetch_and_add(&c->direct_reclaims, 1);
}

SEC("tp_btf/mm_vmscan_memcg_reclaim_begin")
int BPF_PROG(on_memcg_reclaim_begin)
{
	stall_begin();
	return 0;
}

SEC("tp_btf/mm_vmscan_memcg_reclaim_end")
int BPF_PROG(on_memcg_reclaim_end, unsigned long nr_reclaimed)
{
	stall_end(nr_reclaimed, 0);
	return 0;
}

SEC("tp_btf/mm_vmscan_direct_reclaim_begin")
int BPF_PROG(on_direct_reclaim_begin)
{
	stall_begin();
	return 0;
}

SEC("tp_btf/mm_vmscan_direct_reclaim_end")
int BPF_PROG(on_direct_reclaim_end, unsigned long nr_reclaimed)
{
	stall_end(nr_reclaimed, 1);
	return 0;
}

/* -- OOM victims ------------------------------------------------------------------------------
 * mark_victim fires once per victim in __oom_kill_process (memory.events oom_kill counts the
 * same event). The current task is the one that ran the OOM killer, not the victim.
 * Since the change that added uid and rss fields to the event (upstream 6.8, backported into
 * Debian's 6.1.0-56) the tracepoint passes (struct task_struct *victim, uid_t uid); before it,
 * only (int pid). The uid field of the event's record struct tells the two apart at load time;
 * with the old form the kill is counted under MEMWATCH_UNATTRIBUTED. */

struct trace_event_raw_mark_victim___xx {
	uid_t uid;
} __attribute__((preserve_access_index));

SEC("tp_btf/mark_victim")
int on_mark_victim(__u64 *ctx)
{
	struct memwatch_counters *c;
	__u64 cgid = MEMWATCH_UNATTRIBUTED;

	if (bpf_core_field_exists(struct trace_event_raw_mark_victim___xx, uid))
		cgid = task_cgroup_id((struct task_struct *)ctx[0]);
	c = slot(cgid);
	if (c)
		__sync_fetch_and_add(&c->oom_kills, 1);
	return 0;
}

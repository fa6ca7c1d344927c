/* xxnode clone3 shim: built by _clone3_build.py (cffi, out-of-line API mode).
   See that file for why this is raw-syscall C and for the process tree. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <fcntl.h>
#include <signal.h>
#include <poll.h>
#include <sched.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/sched.h>

#if !defined(__x86_64__)
#error "xxnode clone3 shim: only x86_64 inline syscalls are written (add your arch's asm)"
#endif

#ifndef CLONE_CLEAR_SIGHAND
#define CLONE_CLEAR_SIGHAND 0x100000000ULL
#endif
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif
#ifndef __NR_clone3
#define __NR_clone3 435
#endif
#ifndef __NR_close_range
#define __NR_close_range 436
#endif

#include "clone3.h"

/* ---- raw syscalls: never touch errno/TLS, return -errno ---------------------------- */
static inline long rs6(long n, long a, long b, long c, long d, long e, long f)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#define RS0(n) rs6((n), 0, 0, 0, 0, 0, 0)
#define RS1(n, a) rs6((n), (long)(a), 0, 0, 0, 0, 0)
#define RS2(n, a, b) rs6((n), (long)(a), (long)(b), 0, 0, 0, 0)
#define RS3(n, a, b, c) rs6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define RS4(n, a, b, c, d) rs6((n), (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define RS5(n, a, b, c, d, e) rs6((n), (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)

/* clone3 that runs fn(arg) on the new stack in the child and exit_group()s with its result.
   rdi=clone_args rsi=size rdx=fn rcx=arg. syscall keeps every register but rax/rcx/r11, so
   fn and arg survive in r8/r9 into the child. */
long xx_clone3_call(struct clone_args *ca, unsigned long size, int (*fn)(void *), void *arg);
__asm__(
    ".text\n"
    ".globl xx_clone3_call\n"
    ".hidden xx_clone3_call\n"
    ".type xx_clone3_call,@function\n"
    "xx_clone3_call:\n"
    "  mov %rdx, %r8\n"
    "  mov %rcx, %r9\n"
    "  mov $435, %eax\n"
    "  syscall\n"
    "  test %rax, %rax\n"
    "  jnz 1f\n"
    "  xor %ebp, %ebp\n"
    "  and $-16, %rsp\n"
    "  mov %r9, %rdi\n"
    "  call *%r8\n"
    "  mov %eax, %edi\n"
    "  mov $231, %eax\n"
    "  syscall\n"
    "  hlt\n"
    "1:\n"
    "  ret\n"
    ".size xx_clone3_call, .-xx_clone3_call\n");

/* ---- tiny helpers (no libc) ----------------------------------------------------------- */
static void zero(void *p, unsigned long n) { volatile char *c = p; while (n--) *c++ = 0; }

static int64_t now_ns(int clock)
{
    struct timespec ts;
    RS2(SYS_clock_gettime, clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void write_all(int fd, const char *p, long n)
{
    while (n > 0) {
        long r = RS3(SYS_write, fd, p, n);
        if (r == -EINTR) continue;
        if (r <= 0) return;
        p += r; n -= r;
    }
}

/* append "key value\n" to buf at *len */
static void put_kv(char *buf, int *len, const char *key, int64_t v)
{
    char tmp[24]; int n = 0; int neg = v < 0; uint64_t u = neg ? (uint64_t)(-v) : (uint64_t)v;
    while (*key) buf[(*len)++] = *key++;
    buf[(*len)++] = ' ';
    do { tmp[n++] = (char)('0' + u % 10); u /= 10; } while (u);
    if (neg) buf[(*len)++] = '-';
    while (n) buf[(*len)++] = tmp[--n];
    buf[(*len)++] = '\n';
}

static void cgroup_kill(int cgfd)
{
    long fd = RS4(SYS_openat, cgfd, "cgroup.kill", O_WRONLY | O_CLOEXEC, 0);
    if (fd >= 0) { write_all((int)fd, "1", 1); RS1(SYS_close, fd); }
}

/* close every fd >= 3 except keep[0..n): close_range over the gaps */
static void close_others(int *keep, int n)
{
    int i, j;
    for (i = 1; i < n; i++)  /* insertion sort */
        for (j = i; j > 0 && keep[j - 1] > keep[j]; j--) { int t = keep[j]; keep[j] = keep[j - 1]; keep[j - 1] = t; }
    unsigned int lo = 3;
    for (i = 0; i < n; i++) {
        if (keep[i] < 3) continue;
        if ((unsigned)keep[i] > lo) RS3(__NR_close_range, lo, keep[i] - 1, 0);
        if ((unsigned)keep[i] + 1 > lo) lo = keep[i] + 1;
    }
    RS3(__NR_close_range, lo, ~0U, 0);
}

#define STACK_GUARD 4096UL
#define JOB_STACK (32UL * 1024)
#define SHIM_STACK (96UL * 1024)
#define BLOCK_SIZE (STACK_GUARD + JOB_STACK + STACK_GUARD + SHIM_STACK)

void *xx_stack_alloc(void)
{
    void *p = mmap(NULL, BLOCK_SIZE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (p == MAP_FAILED) return NULL;
    mprotect(p, STACK_GUARD, PROT_NONE);
    mprotect((char *)p + STACK_GUARD + JOB_STACK, STACK_GUARD, PROT_NONE);
    return p;
}

void xx_stack_free(void *block) { if (block) munmap(block, BLOCK_SIZE); }

/* ---- J: runs on its own stack, sharing memory with S until execve ---------------------- */
static int job_fail(struct xx_spawn *a, int stage, long err)
{
    a->fail_stage = stage;
    a->fail_errno = (int)-err;
    return 127;
}

static int job_main(void *p)
{
    struct xx_spawn *a = p;
    long r;
    a->j_started = 1;  /* S tells "never ran" (SIGKILL at birth) from any later failure */
    struct sched_param sp;
    sp.sched_priority = a->job_prio;
    /* policy first, while root: after setuid with RLIMIT_RTPRIO 0 it could only be lowered */
    r = RS3(SYS_sched_setscheduler, 0, a->job_policy, &sp);
    if (r < 0) return job_fail(a, XX_STAGE_SCHED, r);
    struct rlimit rl = {0, 0};
    r = RS4(SYS_prlimit64, 0, RLIMIT_RTPRIO, &rl, 0);
    if (r < 0) return job_fail(a, XX_STAGE_RLIMIT, r);
    r = RS5(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    if (r < 0) return job_fail(a, XX_STAGE_NO_NEW_PRIVS, r);
    if (a->oom_score_adj >= -1000 && a->oom_score_adj <= 1000) {
        /* the class's OOM rank, while root (lowering it later needs CAP_SYS_RESOURCE);
           every process the job forks inherits it */
        char num[8];
        int v = a->oom_score_adj, len = 0, neg = v < 0;
        unsigned u = neg ? -v : v;
        char rev[8];
        do { rev[len++] = '0' + u % 10; u /= 10; } while (u);
        int k = 0;
        if (neg) num[k++] = '-';
        while (len) num[k++] = rev[--len];
        long fd = RS4(SYS_openat, AT_FDCWD, "/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC, 0);
        if (fd < 0) return job_fail(a, XX_STAGE_OOM_ADJ, fd);
        r = RS3(SYS_write, fd, num, k);
        RS1(SYS_close, fd);
        if (r < 0) return job_fail(a, XX_STAGE_OOM_ADJ, r);
    }
    RS0(SYS_setsid);  /* its own session: no terminal, its own autogroup, not the daemon's */
    /* CPython ignores SIGPIPE/SIGXFSZ; a job expects defaults and an empty mask */
    struct { void *h; unsigned long flags; void *restorer; uint64_t mask; } sa;
    zero(&sa, sizeof sa);
    for (int s = 1; s <= 64; s++)
        if (s != SIGKILL && s != SIGSTOP) RS4(SYS_rt_sigaction, s, &sa, 0, 8);
    uint64_t empty = 0;
    RS4(SYS_rt_sigprocmask, SIG_SETMASK, &empty, 0, 8);
    if ((r = RS3(SYS_dup3, a->stdin_fd, 0, 0)) < 0) return job_fail(a, XX_STAGE_STDIO, r);
    if ((r = RS3(SYS_dup3, a->j_out, 1, 0)) < 0) return job_fail(a, XX_STAGE_STDIO, r);
    if ((r = RS3(SYS_dup3, a->j_err, 2, 0)) < 0) return job_fail(a, XX_STAGE_STDIO, r);
    RS3(__NR_close_range, 3, ~0U, 0);
    if (a->set_user) {
        r = RS2(SYS_setgroups, a->ngroups, a->groups);
        if (r < 0) return job_fail(a, XX_STAGE_SETGROUPS, r);
        r = RS3(SYS_setresgid, a->gid, a->gid, a->gid);
        if (r < 0) return job_fail(a, XX_STAGE_SETGID, r);
        r = RS3(SYS_setresuid, a->uid, a->uid, a->uid);
        if (r < 0) return job_fail(a, XX_STAGE_SETUID, r);
    }
    if (a->cwd) {
        r = RS1(SYS_chdir, a->cwd);   /* as the job user: it may not enter what it could not */
        if (r < 0) return job_fail(a, XX_STAGE_CHDIR, r);
    }
    r = RS3(SYS_execve, a->path, a->argv, a->envp);
    return job_fail(a, XX_STAGE_EXEC, r);
}

/* ---- S: the per-job shim --------------------------------------------------------------- */
struct relay { int in; int out; int64_t kept; int64_t dropped; };

static void relay_once(struct relay *rl, int64_t limit, char *buf, unsigned long bufsz)
{
    long n = RS3(SYS_read, rl->in, buf, bufsz);
    if (n == -EINTR || n == -EAGAIN) return;
    if (n <= 0) { RS1(SYS_close, rl->in); rl->in = -1; return; }
    long keep = n;
    if (rl->kept + keep > limit) keep = limit - rl->kept > 0 ? (long)(limit - rl->kept) : 0;
    if (keep > 0 && rl->out >= 0) write_all(rl->out, buf, keep);
    rl->kept += keep;
    rl->dropped += n - keep;
}

static int shim_report(int fd, int32_t jpid, int stage, long err, int64_t start)
{
    struct xx_report rep;
    rep.shim_pid = (int32_t)RS0(SYS_getpid);
    rep.job_pid = jpid;
    rep.stage = stage;
    rep.err = (int32_t)(err < 0 ? -err : err);
    rep.start_ns = start;
    write_all(fd, (const char *)&rep, sizeof rep);
    RS1(SYS_close, fd);
    return 0;
}

static int shim_main(void *p)
{
    struct xx_spawn *a = p;
    uint64_t all = ~0ULL;
    RS4(SYS_rt_sigprocmask, SIG_SETMASK, &all, 0, 8);  /* only SIGKILL can stop S */
    RS5(SYS_prctl, PR_SET_NAME, "xx-shim", 0, 0, 0);
    int dirfd = a->job_dir_fd, cgfd = a->job_cgroup_fd, report = a->report_wr;
    int64_t limit = a->out_limit, timeout = a->timeout_ns;
    int keep[4] = {dirfd, cgfd, a->stdin_fd, report};
    close_others(keep, 4);
    long r;
    /* the daemon's stdio (maybe a pipe someone waits on) must not live on in S */
    long devnull = RS4(SYS_openat, AT_FDCWD, "/dev/null", O_RDWR | O_CLOEXEC, 0);
    if (devnull >= 0) {
        for (int i = 0; i < 3; i++) if (devnull != i) RS3(SYS_dup3, devnull, i, 0);
        if (devnull > 2) RS1(SYS_close, devnull);
    }

    /* claim: whoever creates "shim" first owns the job; a restarted daemon claims a job it
       finds unclaimed the same way, so a late shim can never start a job twice */
    /* The pid and the lock are in place before the file gets its name (linkat fails with
       EEXIST if a restarted daemon claimed the job first), so a reader never sees a
       half-written claim. */
    char tmpname[40]; int tl = 0;
    {
        const char *pre = "shim.tmp"; char num[32]; int nl = 0;
        while (*pre) tmpname[tl++] = *pre++;
        put_kv(num, &nl, "", RS0(SYS_getpid));   /* " N\n" */
        tmpname[tl++] = '.';
        for (int i = 1; i < nl - 1; i++) tmpname[tl++] = num[i];
        tmpname[tl] = 0;
    }
    long lock = RS4(SYS_openat, dirfd, tmpname, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (lock < 0) return shim_report(report, 0, XX_STAGE_SHIM_SETUP, lock, 0), 3;
    RS2(SYS_flock, lock, LOCK_EX);  /* held until S dies: "is the shim alive?" without pids */
    {
        char buf[32]; int len = 0;
        put_kv(buf, &len, "pid", RS0(SYS_getpid));
        write_all((int)lock, buf, len);
    }
    r = RS5(SYS_linkat, dirfd, tmpname, dirfd, "shim", 0);
    RS3(SYS_unlinkat, dirfd, tmpname, 0);
    if (r < 0) return shim_report(report, 0, XX_STAGE_CLAIM, r, 0), 3;
    int outp[2], errp[2];
    long fo = RS4(SYS_openat, dirfd, "stdout", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    long fe = RS4(SYS_openat, dirfd, "stderr", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fo < 0 || fe < 0) return shim_report(report, 0, XX_STAGE_SHIM_SETUP, fo < 0 ? fo : fe, 0), 3;
    if ((r = RS2(SYS_pipe2, outp, O_CLOEXEC)) < 0 || (r = RS2(SYS_pipe2, errp, O_CLOEXEC)) < 0)
        return shim_report(report, 0, XX_STAGE_SHIM_SETUP, r, 0), 3;
    a->j_out = outp[1];
    a->j_err = errp[1];
    struct sched_param sp;
    sp.sched_priority = a->shim_prio;
    r = RS3(SYS_sched_setscheduler, 0, a->shim_policy, &sp);
    if (r < 0) return shim_report(report, 0, XX_STAGE_SHIM_SCHED, r, 0), 3;

    /* orphans of the job are reparented to S, not to init: S reaps them, so once S has
       written its record nothing of the job is left, not even a zombie */
    RS5(SYS_prctl, PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    int64_t start = now_ns(CLOCK_REALTIME), mono_start = now_ns(CLOCK_MONOTONIC);
    int jpidfd = -1;
    struct clone_args ca;
    zero(&ca, sizeof ca);
    ca.flags = CLONE_VM | CLONE_VFORK | CLONE_PIDFD | CLONE_INTO_CGROUP;
    ca.pidfd = (uint64_t)(uintptr_t)&jpidfd;
    ca.exit_signal = SIGCHLD;
    ca.stack = (uint64_t)(uintptr_t)a->job_stack;
    ca.stack_size = JOB_STACK;
    ca.cgroup = (uint64_t)cgfd;
    long jpid = xx_clone3_call(&ca, sizeof ca, job_main, a);
    if (jpid < 0) {
        shim_report(report, 0, XX_STAGE_CLONE_JOB, jpid, start);
        a->fail_stage = XX_STAGE_CLONE_JOB;
        a->fail_errno = (int)-jpid;
    }
    /* J has exec'd or died (CLONE_VFORK): its failure, if any, is in a->fail_*. A child
       that never reached job_main was SIGKILLed at birth: since 6.14 (and stable
       backports) a CLONE_INTO_CGROUP child is killed when the target cgroup's kill_seq
       differs from that of the parent's own cgroup, i.e. whenever either was ever
       cgroup.kill'ed. The daemon then moves the shims to a fresh cgroup. */
    if (jpid > 0 && !a->j_started && !a->fail_stage) a->fail_stage = XX_STAGE_JOB_KILLED_AT_BIRTH;
    int fail_stage = a->fail_stage, fail_errno = a->fail_errno;
    RS1(SYS_close, outp[1]);
    RS1(SYS_close, errp[1]);
    RS1(SYS_close, a->stdin_fd);
    if (jpid > 0) shim_report(report, (int32_t)jpid, fail_stage, fail_errno, start);
    /* from here on `a` may be freed by the daemon: use only locals */

    struct relay ro = {outp[0], (int)fo, 0, 0}, re = {errp[0], (int)fe, 0, 0};
    int job_alive = jpid > 0, timed_out = 0, status = 0;
    int64_t end = start, drain_deadline = 0;
    struct rusage ru;
    zero(&ru, sizeof ru);
    char buf[16384];
    while (ro.in >= 0 || re.in >= 0 || job_alive) {
        struct pollfd pf[3]; int n = 0, io = -1, ie = -1, ij = -1;
        if (ro.in >= 0) { io = n; pf[n].fd = ro.in; pf[n].events = POLLIN; pf[n++].revents = 0; }
        if (re.in >= 0) { ie = n; pf[n].fd = re.in; pf[n].events = POLLIN; pf[n++].revents = 0; }
        if (job_alive) { ij = n; pf[n].fd = jpidfd; pf[n].events = POLLIN; pf[n++].revents = 0; }
        int64_t mono = now_ns(CLOCK_MONOTONIC), wait = -1;
        if (job_alive && timeout > 0 && !timed_out) {
            wait = mono_start + timeout - mono;
            if (wait < 0) wait = 0;
        }
        if (!job_alive) {  /* pipes still open after J died: stragglers get 5 s to die */
            if (!drain_deadline) drain_deadline = mono + 5000000000LL;
            wait = drain_deadline - mono;
            if (wait <= 0) break;
        }
        struct timespec ts, *tsp = 0;
        if (wait >= 0) { ts.tv_sec = wait / 1000000000LL; ts.tv_nsec = wait % 1000000000LL; tsp = &ts; }
        r = RS5(SYS_ppoll, pf, n, tsp, 0, 8);
        if (r == -EINTR) continue;
        if (r == 0) {
            if (job_alive && timeout > 0 && !timed_out) { timed_out = 1; cgroup_kill(cgfd); }
            continue;
        }
        if (io >= 0 && pf[io].revents) relay_once(&ro, limit, buf, sizeof buf);
        if (ie >= 0 && pf[ie].revents) relay_once(&re, limit, buf, sizeof buf);
        if (ij >= 0 && pf[ij].revents) {
            end = now_ns(CLOCK_REALTIME);
            RS4(SYS_wait4, jpid, &status, 0, &ru);
            job_alive = 0;
            cgroup_kill(cgfd);  /* the job is its main process: stragglers die with it */
        }
    }
    if (ro.in >= 0) RS1(SYS_close, ro.in);
    if (re.in >= 0) RS1(SYS_close, re.in);
    if (jpid > 0 && job_alive) { RS4(SYS_wait4, jpid, &status, 0, &ru); end = now_ns(CLOCK_REALTIME); }
    if (jpid > 0) {
        int st2;
        cgroup_kill(cgfd);
        while (RS4(SYS_wait4, -1, &st2, __WALL, 0) != -ECHILD) {}
    }

    char rec[1024]; int len = 0;
    const char *hdr = "xx_exit 1\n";
    while (*hdr) rec[len++] = *hdr++;
    put_kv(rec, &len, "shim_pid", RS0(SYS_getpid));
    put_kv(rec, &len, "job_pid", jpid);
    put_kv(rec, &len, "wait_status", status);
    put_kv(rec, &len, "timed_out", timed_out);
    put_kv(rec, &len, "start_ns", start);
    put_kv(rec, &len, "end_ns", end);
    put_kv(rec, &len, "stdout_bytes", ro.kept);
    put_kv(rec, &len, "stdout_dropped", ro.dropped);
    put_kv(rec, &len, "stderr_bytes", re.kept);
    put_kv(rec, &len, "stderr_dropped", re.dropped);
    put_kv(rec, &len, "fail_stage", fail_stage);
    put_kv(rec, &len, "fail_errno", fail_errno);
    put_kv(rec, &len, "utime_us", (int64_t)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec);
    put_kv(rec, &len, "stime_us", (int64_t)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec);
    put_kv(rec, &len, "maxrss_kb", ru.ru_maxrss);
    long fd = RS4(SYS_openat, dirfd, "exit.tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd >= 0) {
        write_all((int)fd, rec, len);
        RS1(SYS_fsync, fd);
        RS1(SYS_close, fd);
        RS4(SYS_renameat, dirfd, "exit.tmp", dirfd, "exit");
    }
    return 0;
}

/* Start S (which starts J) and wait until J has exec'd or failed. The block from
   xx_stack_alloc must stay mapped until S has exited; `a` only until this returns. */
int xx_spawn(struct xx_spawn *a, void *block, int *shim_pidfd, struct xx_report *rep)
{
    a->job_stack = (char *)block + STACK_GUARD;
    a->fail_stage = 0;
    a->fail_errno = 0;
    a->j_started = 0;
    struct clone_args ca;
    zero(&ca, sizeof ca);
    *shim_pidfd = -1;
    ca.flags = CLONE_VM | CLONE_PIDFD | CLONE_CLEAR_SIGHAND;
    if (a->shim_cgroup_fd >= 0) {
        ca.flags |= CLONE_INTO_CGROUP;
        ca.cgroup = (uint64_t)a->shim_cgroup_fd;
    }
    ca.pidfd = (uint64_t)(uintptr_t)shim_pidfd;
    ca.exit_signal = SIGCHLD;
    ca.stack = (uint64_t)(uintptr_t)((char *)block + STACK_GUARD + JOB_STACK + STACK_GUARD);
    ca.stack_size = SHIM_STACK;
    long pid = xx_clone3_call(&ca, sizeof ca, shim_main, a);
    RS1(SYS_close, a->report_wr);
    zero(rep, sizeof *rep);
    if (pid < 0) {
        RS1(SYS_close, a->report_rd);
        rep->stage = XX_STAGE_CLONE_SHIM;
        rep->err = (int32_t)-pid;
        return -1;
    }
    long got = 0;
    while (got < (long)sizeof *rep) {
        long n = RS3(SYS_read, a->report_rd, (char *)rep + got, sizeof *rep - got);
        if (n == -EINTR) continue;
        if (n <= 0) break;
        got += n;
    }
    RS1(SYS_close, a->report_rd);
    if (got != (long)sizeof *rep) {  /* S died before reporting: only SIGKILL can do that */
        rep->shim_pid = (int32_t)pid;
        rep->stage = XX_STAGE_SHIM_KILLED;
        rep->err = 0;
    }
    return (int)pid;
}

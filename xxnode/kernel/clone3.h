/* Shared between clone3.c and cffi: _clone3_build.py hands the text between the
   XX_CDEF markers to ffibuilder.cdef() verbatim, so Python sees exactly these
   declarations and stage codes (clone3.py reads them as lib.XX_STAGE_*). Keep that
   region to what cffi's parser accepts: plain #defines of integers, structs, prototypes. */
#ifndef XX_CLONE3_H
#define XX_CLONE3_H

#include <stdint.h>

/* XX_CDEF_BEGIN */
#define XX_STAGE_OK 0
#define XX_STAGE_CLAIM 1
#define XX_STAGE_SHIM_SETUP 2
#define XX_STAGE_SHIM_SCHED 3
#define XX_STAGE_CLONE_JOB 4
#define XX_STAGE_SCHED 5
#define XX_STAGE_RLIMIT 6
#define XX_STAGE_NO_NEW_PRIVS 7
#define XX_STAGE_STDIO 8
#define XX_STAGE_SETGROUPS 9
#define XX_STAGE_SETGID 10
#define XX_STAGE_SETUID 11
#define XX_STAGE_CHDIR 12
#define XX_STAGE_EXEC 13
#define XX_STAGE_CLONE_SHIM 14
#define XX_STAGE_JOB_KILLED_AT_BIRTH 15
#define XX_STAGE_SHIM_KILLED 16
#define XX_STAGE_OOM_ADJ 17

struct xx_spawn {
    int shim_cgroup_fd;   /* CLONE_INTO_CGROUP target for S, -1: the caller's cgroup */
    int job_cgroup_fd;    /* the job's leaf (O_DIRECTORY): J is born in it, S kills it */
    int job_dir_fd;       /* state dir of this job: shim, stdout, stderr, exit */
    int stdin_fd;         /* J's stdin */
    int report_rd;        /* pipe S -> caller: struct xx_report once J has exec'd */
    int report_wr;
    int shim_policy;
    int shim_prio;
    int job_policy;
    int job_prio;
    int oom_score_adj;
    int set_user;
    uint32_t uid;
    uint32_t gid;
    int ngroups;
    uint32_t groups[64];
    int64_t out_limit;    /* bytes kept of stdout and of stderr, each */
    int64_t timeout_ns;   /* wall clock from J's clone; 0: none */
    const char *path;
    char **argv;
    char **envp;
    const char *cwd;
    void *job_stack;      /* set by xx_spawn: J's stack inside the block */
    int j_out;
    int j_err;
    int fail_stage;
    int fail_errno;
    int j_started;
};

struct xx_report {
    int32_t shim_pid;
    int32_t job_pid;
    int32_t stage;
    int32_t err;
    int64_t start_ns;
};

void *xx_stack_alloc(void);
void xx_stack_free(void *block);
int xx_spawn(struct xx_spawn *a, void *block, int *shim_pidfd, struct xx_report *rep);
/* XX_CDEF_END */

#endif

/* SPDX-License-Identifier: GPL-2.0 */
/* restrackfs: what crosses between restrack.bpf.c and user space (loader.py).
 *
 * Every map value, ring record and SEC("syscall") context user space packs or
 * unpacks, and the numbers both sides read in them. Declared once, here;
 * loader.py's LAYOUTS and enums repeat them in Python, and tests/test_bpf.py
 * compares those with the object's BTF and with this file, so neither side can
 * drift in silence. Only <linux/types.h>: it builds under clang -target bpf
 * and under gcc alike.
 */
#ifndef RESTRACK_SHARED_H
#define RESTRACK_SHARED_H

#include <linux/types.h>

#define NONE (~0ULL)		/* a limit or soft limit that is not set */
#define WATCHED_MAX 65536	/* max_entries of `watched`: the processes watched at once */
#define CLOCK_TICK_NS 10000000ULL /* USER_HZ = 100: /proc/PID/stat start time */

enum action { ACT_KILL = 0, ACT_DENY = 1, ACT_NOTIFY = 2 };
enum kind {
	EV_EXCEEDED = 1, EV_KILLED = 2, EV_NOTIFIED = 3, EV_RAISED = 4, EV_EXITED = 5,
	EV_KILL_FAILED = 6, EV_DENIED = 7, EV_EXEC = 8, EV_SHRUNK = 9, EV_FORKED = 10,
	EV_TREE_KILLED = 11, EV_TREE_NOTIFIED = 12, EV_TREE_ENDED = 13, EV_WARNED = 14,
	EV_TREE_WARNED = 15,
};
enum which { W_NONE = 0, W_HEAP = 1, W_FILES = 2 };
enum flag {
	F_HEAP_OVER = 1, F_FILES_OVER = 2, F_KILLED = 4, F_KILL_FAILED = 8, F_LOST = 16,
	F_HEAP_WARNED = 32, F_FILES_WARNED = 64,	/* usage > the warn threshold */
};

/* One watched thread group. Limits are absolute (baseline + quota), NONE if unset;
 * "over" means usage > limit. */
struct watch {
	__u64 start_time;	/* clock ticks since boot, /proc/PID/stat field 22 */
	__u64 heap_limit_pages;	/* mm->data_vm pages */
	__u64 fd_limit;		/* open descriptors */
	__u64 heap_peak_pages;	/* watermarks, raised at every check */
	__u64 fd_peak;
	__u64 data_soft;	/* deny: the soft RLIMIT_DATA set, bytes */
	__u64 nofile_soft;	/* deny: the soft RLIMIT_NOFILE set */
	__u32 action;
	__u32 flags;		/* enum flag */
	__u64 mm;		/* its mm_struct and files_struct (bind, sched_process_exec): */
	__u64 files;		/* another thread group sharing them grows this process */
	__u32 host_tgid;	/* its tgid in the initial namespace, to signal it */
	__u32 pending;		/* 1: an event for this entry is in the ring, not yet taken */
	/* What happened, kept until the daemon takes it (take_counts): so a process
	 * that flips over and back floods nothing, and a full ring loses no count. */
	__u64 crossings[2];	/* [which - 1]: crossings over a notify or deny limit */
	__u64 usage_at[2];	/* [which - 1]: the usage at the last crossing or kill */
	__u64 denied[2];	/* [which - 1], deny: calls the kernel refused (ENOMEM, EMFILE) */
	__u64 raised;		/* deny: soft limits raised above the ones set */
	__u64 kills;		/* 1 once killed (kept in flags too) */
	__u64 kill_failed;
	__u64 heap_base_pages;	/* data_vm at the baseline: limit - base is the quota */
	__u64 execs;		/* execs that lowered the heap baseline */
	__u64 fd_last;		/* deny: the descriptor count at the last check */
	__u64 shrunk;		/* deny: checks that found fewer descriptors than the last */
	/* A tree member: what it adds to its tree's sums, exchanged at each check
	 * (the sums move by the difference), taken back at its exit. */
	__u64 seen_heap_pages;
	__u64 seen_fds;
	__u32 tree;		/* the key of its tree's root, 0: none */
	__u32 pad;
	/* warn=N%: absolute thresholds (baseline + limit * N / 100), NONE if unset;
	 * usage > threshold is warned of once (F_*_WARNED) until it falls back. */
	__u64 heap_warn_pages;
	__u64 fd_warn;
	__u64 warnings[2];	/* [which - 1]: upward crossings of a threshold */
	__u64 warned_at[2];	/* [which - 1]: the usage at the last one */
};

/* A tree quota (scope=tree), by the key of its root: one quota on the sum over
 * its live members (the root and every process forked from a member since).
 * Limits are absolute (base + quota), NONE if unset; over means sum > limit. */
struct tree {
	__u64 start_time;	/* the root's, as in struct watch */
	__u64 heap_limit_pages;
	__u64 fd_limit;
	__u64 heap_base_pages;	/* the root's usage at the baseline: usage = sum - base */
	__u64 fd_base;
	__u64 heap_pages;	/* the sums of the members' seen values, atomically moved */
	__u64 fds;
	__u32 members;		/* live members; the tree ends (is deleted) at 0 */
	__u32 action;		/* kill or notify: a sum cannot be denied */
	__u32 flags;		/* F_HEAP_OVER, F_FILES_OVER, F_KILLED; F_LOST: a member not added */
	__u32 pending;		/* 1: an event for this tree is in the ring, not yet taken */
	__u32 killer;		/* the member killed in its crossing call */
	__u32 lost;		/* children not made members (`watched` full) */
	__u64 crossings[2];	/* notify: crossings, heap and files */
	__u64 usage_at[2];	/* the sums at the last crossing or the kill */
	__u64 kills;		/* 1 once killed */
	/* warn=N%: absolute thresholds of the sums (base + quota * N / 100), NONE if
	 * unset; a sum over one is warned of once (F_*_WARNED) until it falls back. */
	__u64 heap_warn_pages;
	__u64 fd_warn;
	__u64 warnings[2];
	__u64 warned_at[2];
};

/* Counts kept in the kernel: ring events dropped (a full ring). */
struct stats { __u64 dropped; };

struct event {
	__u32 tgid;
	__u32 kind;
	__u32 which;
	__u32 member;	/* tree events: the member whose call crossed (else 0) */
	__u64 usage;
	__u64 limit;
	__u64 time_ns;	/* CLOCK_MONOTONIC when it happened */
};

/* The last word on an entry removed in the kernel (its group exited): the counts
 * no take_counts collected, which would go with the entry. */
struct exit_event {
	struct event head;	/* kind EV_EXITED */
	__u64 crossings[2];
	__u64 denied[2];
	__u64 raised;
	__u64 kills;
	__u64 kill_failed;
	__u64 usage_at[2];
	__u64 execs;
	__u64 heap_base_pages;
	__u64 warnings[2];
	__u64 warned_at[2];
};

/* The tree's last word (EV_TREE_ENDED, tgid: the root's key): its last member
 * exited and the kernel deleted it, with what no take_tree collected. */
struct tree_end_event {
	struct event head;	/* kind EV_TREE_ENDED */
	__u64 crossings[2];
	__u64 usage_at[2];
	__u64 kills;
	__u32 killer;
	__u32 lost;
	__u64 warnings[2];
	__u64 warned_at[2];
};

/* --track-children with a default quota: the processes whose new children are
 * watched from their first instruction, with this quota over their usage at
 * fork. A child inherits the rule, so it holds at any depth. */
struct inherit {
	__u64 start_time;	/* of the process this rule is for, as in struct watch */
	__u64 heap_quota_pages;	/* NONE: no heap quota */
	__u64 fd_quota;		/* NONE: no descriptor quota */
	__u32 action;
	__u32 pad;
};

/* In and out of take_counts: key in, what w held out (and zeroed in w). */
struct take {
	__u32 key;
	__u32 found;
	__u64 crossings[2];
	__u64 usage_at[2];
	__u64 denied[2];
	__u64 raised;
	__u64 kills;
	__u64 kill_failed;
	__u64 execs;
	__u64 heap_base_pages;
	__u64 shrunk;
	__u64 warnings[2];
	__u64 warned_at[2];
};

/* In to set_tree: create or update the tree of `key` (its settings only: the
 * sums and members stay) and make `key` its first member. */
struct tree_args {
	__u32 key;
	__u32 action;
	__u64 start_time;
	__u64 heap_limit_pages;
	__u64 fd_limit;
	__u64 heap_base_pages;
	__u64 fd_base;
	__u64 heap_warn_pages;
	__u64 fd_warn;
};

/* In and out of take_tree: key in, what the tree held out (and zeroed in it). */
struct tree_take {
	__u32 key;
	__u32 found;
	__u64 crossings[2];
	__u64 usage_at[2];
	__u64 kills;
	__u64 warnings[2];
	__u64 warned_at[2];
};

/* In and out of rewatch: a member's entry rewritten with w's settings (as a
 * write of the whole entry would, counts restarted) but its tree kept. */
struct rewatch {
	__u32 key;
	__u32 found;
	struct watch w;
};

/* In and out of set_peaks: key and the new watermarks in, found out. */
struct peaks_args { __u32 key; __u32 found; __u64 heap_pages; __u64 fds; };

/* In to bind_process: the key of the entry to index. */
struct bind_args { __u32 key; };

#endif /* RESTRACK_SHARED_H */

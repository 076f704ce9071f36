// SPDX-License-Identifier: GPL-2.0
/* restrackfs kernel side: check a watched thread group's VmData (mm->data_vm)
 * and open-descriptor count at the exit of every syscall that can grow them,
 * and at the entry of the calls that would populate pages past the quota.
 *
 * One program per kind of check; user space (loader.py) attaches each one to
 * the list of syscall tracepoints it covers, so the hook set lives there.
 * All sys_enter_* / sys_exit_* tracepoints share one record layout. Beside
 * them: ia32 calls (compat_exit), io_uring completions (uring_files), another
 * thread group sharing the address space or table (by_mm, by_files), exec
 * (group_exec), fork under an inherit rule (group_fork), exit (group_exit);
 * and the SEC("syscall") programs user space runs: learn_namespace,
 * bind_process, take_counts, set_peaks.
 *
 * "The process" is found from the task, never from a number given by user
 * space alone: keys are pids in the daemon's PID namespace (key_of).
 * Events only say that an entry changed; what happened is counted in the
 * entry and taken by the daemon (take_counts), so no process can flood them.
 *
 * Kernel types are declared here by hand, only the fields read, with
 * preserve_access_index: libbpf relocates each access against the running
 * kernel's BTF (CO-RE), so no vmlinux.h is needed. What user space reads or
 * writes (map values, ring records, the syscall programs' contexts, the enums
 * in them) is declared in restrack_shared.h.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "restrack_shared.h"

#define PAI __attribute__((preserve_access_index))

struct rlimit { __u64 rlim_cur; __u64 rlim_max; } PAI;
struct ns_common { unsigned int inum; } PAI;
struct pid_namespace { struct ns_common ns; } PAI;
struct upid { int nr; struct pid_namespace *ns; } PAI;
struct pid { unsigned int level; struct upid numbers[]; } PAI;
struct signal_struct {
	struct { int counter; } live;
	struct rlimit rlim[16];
	struct pid *pids[4];
} PAI;
struct fdtable { unsigned int max_fds; unsigned long *open_fds; } PAI;
struct files_struct { struct fdtable *fdt; } PAI;
struct mm_struct { unsigned long data_vm; unsigned long def_flags; unsigned long brk; } PAI;
struct vm_area_struct { unsigned long vm_flags; } PAI;
struct thread_info { __u32 status; } PAI;
struct pt_regs { unsigned long bx; unsigned long cx; unsigned long dx; unsigned long orig_ax; } PAI;
struct task_struct {
	struct thread_info thread_info;
	int pid;
	int tgid;
	struct pid *thread_pid;
	unsigned long long start_boottime;
	struct task_struct *group_leader;
	struct mm_struct *mm;
	struct files_struct *files;
	struct signal_struct *signal;
} PAI;

/* The shared layout of syscalls/sys_enter_* and sys_exit_* records. */
struct sys_enter { __u64 common; int nr; unsigned long args[6]; };
struct sys_exit { __u64 common; int nr; long ret; };

extern struct task_struct *bpf_task_from_vpid(__s32 vpid) __ksym;
extern struct task_struct *bpf_task_from_pid(__s32 pid) __ksym;
enum pid_type { PIDTYPE_PID, PIDTYPE_TGID };
extern int bpf_send_signal_task(struct task_struct *task, int sig, enum pid_type type,
				__u64 value) __ksym;
extern void bpf_task_release(struct task_struct *p) __ksym;

#define PAGE_SHIFT 12
#define SIGKILL 9
#define RLIMIT_DATA 2
#define RLIMIT_NOFILE 7
#define PROT_WRITE 0x2
#define MAP_SHARED 0x1
#define MAP_GROWSDOWN 0x100
#define MAP_LOCKED 0x2000
#define MAP_POPULATE 0x8000
#define VM_WRITE 0x2
#define VM_SHARED 0x8
#define VM_STACK 0x100
#define VM_LOCKED 0x2000
#define VM_LOCKONFAULT 0x80000
#define MAX_FD_WORDS (1 << 20) /* 64 Mi descriptors */
#define TS_COMPAT 0x0002	/* thread_info.status: an ia32 syscall is under way */
#define IA32_PRLIMIT64 340

/* The daemon's PID namespace (learn_namespace fills them): keys are the pids
 * the daemon sees, whichever namespace it runs in. Level 0 is the host. */
__u32 ns_level;
__u32 ns_inum;

/* The ring's records in the object's BTF, for the test that compares them with
 * user space's layouts (the libbpf-bootstrap habit). */
const struct event *unused_event __attribute__((unused));
const struct exit_event *unused_exit_event __attribute__((unused));
const struct tree_end_event *unused_tree_end_event __attribute__((unused));

/* The address space and descriptor table of each watched process -> its key:
 * whoever shares them (CLONE_VM without CLONE_THREAD, vfork, CLONE_FILES) is
 * checked against the owner's quota. The entry's own mm/files confirm a hit. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} by_mm SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} by_files SEC(".maps");

/* --track-children's rules (struct inherit), by the key of the process they are for. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct inherit);
} inherit SEC(".maps");

/* A setrlimit/prlimit64 that raises a deny limit, between its entry and exit. */
struct raise {
	__u32 tgid;
	__u32 which;
	__u64 value;
	__u64 wanted;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WATCHED_MAX);
	__type(key, __u32);
	__type(value, struct watch);
} watched SEC(".maps");

/* Tree quotas (struct tree), by the key of their root; members are `watched`
 * entries whose `tree` names it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WATCHED_MAX);
	__type(key, __u32);
	__type(value, struct tree);
} trees SEC(".maps");

/* At most one event per entry is in the ring (pending), plus exits: 4 MiB holds
 * one for each of the 65,536 entries. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 * 1024 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct stats);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);	/* tid */
	__type(value, struct raise);
} raises SEC(".maps");

static void forget_shared(struct watch *w)
{
	__u64 mm = w->mm, files = w->files;

	if (mm)
		bpf_map_delete_elem(&by_mm, &mm);
	if (files)
		bpf_map_delete_elem(&by_files, &files);
}

/* The ring is full (the daemon is gone or behind): the counts stay in the map,
 * and the daemon, seeing the drop count move, takes them from there. */
static void count_dropped(void)
{
	__u32 zero = 0;
	struct stats *st = bpf_map_lookup_elem(&stats, &zero);

	if (st)
		__sync_fetch_and_add(&st->dropped, 1);
}

static __always_inline int emit_member(__u32 tgid, __u32 kind, __u32 which, __u32 member,
				       __u64 usage, __u64 limit)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		count_dropped();
		return 0;
	}
	e->tgid = tgid;
	e->kind = kind;
	e->which = which;
	e->member = member;
	e->usage = usage;
	e->limit = limit;
	e->time_ns = bpf_ktime_get_ns();
	bpf_ringbuf_submit(e, 0);
	return 1;
}

static __always_inline int emit(__u32 tgid, __u32 kind, __u32 which, __u64 usage, __u64 limit)
{
	return emit_member(tgid, kind, which, 0, usage, limit);
}

/* The entry is being deleted: hand over what it still holds. */
static void emit_exit(__u32 tgid, struct watch *w)
{
	struct exit_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		count_dropped();
		return;
	}
	e->head.tgid = tgid;
	e->head.kind = EV_EXITED;
	e->head.which = W_NONE;
	e->head.member = 0;
	e->head.usage = 0;
	e->head.limit = 0;
	e->head.time_ns = bpf_ktime_get_ns();
	e->crossings[0] = w->crossings[0];
	e->crossings[1] = w->crossings[1];
	e->denied[0] = w->denied[0];
	e->denied[1] = w->denied[1];
	e->raised = w->raised;
	e->kills = w->kills;
	e->kill_failed = w->kill_failed;
	e->usage_at[0] = w->usage_at[0];
	e->usage_at[1] = w->usage_at[1];
	e->execs = w->execs;
	e->heap_base_pages = w->heap_base_pages;
	e->warnings[0] = w->warnings[0];
	e->warnings[1] = w->warnings[1];
	e->warned_at[0] = w->warned_at[0];
	e->warned_at[1] = w->warned_at[1];
	bpf_ringbuf_submit(e, 0);
}

/* Tell the daemon that w changed, unless an event for it already waits: the
 * counts themselves are in w, taken by the daemon with take_counts. */
static __always_inline void signal_change(struct watch *w, __u32 tgid, __u32 kind, __u32 which,
					  __u64 usage, __u64 limit)
{
	if (__sync_fetch_and_or(&w->pending, 1) & 1)
		return;
	if (!emit(tgid, kind, which, usage, limit))
		w->pending = 0;	/* a later change tries again; the reconcile finds this one */
}

static __always_inline void note_usage(struct watch *w, __u32 which, __u64 usage)
{
	if (which == W_HEAP)
		w->usage_at[0] = usage;
	else if (which == W_FILES)
		w->usage_at[1] = usage;
}

/* --- trees: one quota on the sum over a root and everything forked from it ---
 * Each member's entry holds what it adds to the sums (seen_*), exchanged at
 * each of its checks: the sums move by the difference, so they always equal
 * the members' seen values added up, whichever CPUs check at once. */

/* Move *sum by what changed since *seen, which becomes `now`; the new sum. */
static __always_inline __u64 move_sum(__u64 *sum, __u64 *seen, __u64 now)
{
	__u64 delta = now - __sync_lock_test_and_set(seen, now);

	return __sync_fetch_and_add(sum, delta) + delta;
}

/* The member's seen values out of its tree's sums (it exits, or a join is
 * undone); the tree ends with its last member, deleted with a last event. */
static void leave_tree(struct watch *w)
{
	__u32 root = w->tree;
	struct tree *t = root ? bpf_map_lookup_elem(&trees, &root) : 0;
	struct tree_end_event *e;

	if (!t)
		return;
	move_sum(&t->heap_pages, &w->seen_heap_pages, 0);
	move_sum(&t->fds, &w->seen_fds, 0);
	if (__sync_fetch_and_add(&t->members, -1) != 1)
		return;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (e) {
		e->head.tgid = root;
		e->head.kind = EV_TREE_ENDED;
		e->head.which = W_NONE;
		e->head.member = 0;
		e->head.usage = t->heap_pages;
		e->head.limit = t->fds;
		e->head.time_ns = bpf_ktime_get_ns();
		e->crossings[0] = t->crossings[0];
		e->crossings[1] = t->crossings[1];
		e->usage_at[0] = t->usage_at[0];
		e->usage_at[1] = t->usage_at[1];
		e->kills = t->kills;
		e->killer = t->killer;
		e->lost = t->lost;
		e->warnings[0] = t->warnings[0];
		e->warnings[1] = t->warnings[1];
		e->warned_at[0] = t->warned_at[0];
		e->warned_at[1] = t->warned_at[1];
		bpf_ringbuf_submit(e, 0);
	} else {
		count_dropped();
	}
	bpf_map_delete_elem(&trees, &root);
}

/* A tree-only member (no quota of its own, not the root): the daemon knows it
 * only as a member, so its exit says nothing to the daemon but the tree's. */
static __always_inline int only_member(struct watch *w, __u32 key)
{
	return w->tree && w->tree != key && w->heap_limit_pages == NONE && w->fd_limit == NONE &&
	       w->data_soft == NONE && w->nofile_soft == NONE;
}

/* The key of task's thread group: its pid in the daemon's PID namespace, 0 if
 * the daemon cannot see it. A tid resolves to its group (pids[PIDTYPE_TGID]
 * stays the group's across an exec by a non-leader thread). */
static __u32 key_of(struct task_struct *task)
{
	struct pid *pid;
	struct upid upid;
	__u32 level = ns_level;

	if (!level)
		return BPF_CORE_READ(task, tgid);
	pid = BPF_CORE_READ(task, signal, pids[PIDTYPE_TGID]);
	if (!pid || BPF_CORE_READ(pid, level) < level || level > 32)
		return 0;
	if (bpf_probe_read_kernel(&upid, sizeof(upid),
				  (void *)pid + bpf_core_field_offset(struct pid, numbers) +
					  level * bpf_core_type_size(struct upid)))
		return 0;
	if (BPF_CORE_READ(upid.ns, ns.inum) != ns_inum)
		return 0;	/* a sibling namespace: the same level, other numbers */
	return upid.nr;
}

static __u32 current_key(void)
{
	if (!ns_level)
		return bpf_get_current_pid_tgid() >> 32;
	return key_of((void *)bpf_get_current_task());
}

/* The entry for the current thread group, if it is the process that was watched. */
static struct watch *current_watch(__u32 *tgid)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	struct watch *w;
	__u64 start;

	*tgid = current_key();
	if (!*tgid)
		return 0;
	w = bpf_map_lookup_elem(&watched, tgid);
	if (!w)
		return 0;
	start = BPF_CORE_READ(task, group_leader, start_boottime) / CLOCK_TICK_NS;
	if (start != w->start_time) {
		/* A recycled pid whose old owner's entry was never removed. */
		forget_shared(w);
		leave_tree(w);
		emit_exit(*tgid, w);
		bpf_map_delete_elem(&watched, tgid);
		return 0;
	}
	return w;
}

/* The entry whose address space (by_mm) or descriptor table (by_files) the current
 * task shares without being of its thread group. */
static struct watch *sharer_watch(void *by, __u64 shared, __u32 *key, int mm)
{
	struct watch *w;
	__u32 *k;

	if (!shared)
		return 0;
	k = bpf_map_lookup_elem(by, &shared);
	if (!k)
		return 0;
	w = bpf_map_lookup_elem(&watched, k);
	if (!w || (mm ? w->mm : w->files) != shared)
		return 0;	/* a stale pointer: the owner exec'd or is gone */
	*key = *k;
	return w;
}

/* The entry a check of the current task is for: its own thread group's, else
 * (*sharer set) the one whose address space (mm) or descriptor table it shares. */
static __always_inline struct watch *checked_watch(int mm, __u32 *tgid, int *sharer)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	struct watch *w = current_watch(tgid);

	*sharer = !w;
	if (w)
		return w;
	if (mm)
		return sharer_watch(&by_mm, (__u64)BPF_CORE_READ(task, mm), tgid, 1);
	return sharer_watch(&by_files, (__u64)BPF_CORE_READ(task, files), tgid, 0);
}

/* SIGKILL to the watched thread group itself, from a sharer's call. */
static void kill_owner(struct watch *w)
{
	struct task_struct *task = bpf_task_from_pid(w->host_tgid);

	if (!task)
		return;
	if (BPF_CORE_READ(task, group_leader, start_boottime) / CLOCK_TICK_NS == w->start_time)
		bpf_send_signal_task(task, SIGKILL, PIDTYPE_TGID, 0);
	bpf_task_release(task);
}

static __always_inline void kill_group(struct watch *w, __u32 tgid, __u32 which,
				       __u64 usage, __u64 limit)
{
	if (bpf_send_signal(SIGKILL)) {	/* the whole thread group */
		/* Refused (an exiting task): the daemon kills it through its pidfd. */
		if (!(__sync_fetch_and_or(&w->flags, F_KILL_FAILED) & F_KILL_FAILED)) {
			note_usage(w, which, usage);
			w->kill_failed = 1;
			signal_change(w, tgid, EV_KILL_FAILED, which, usage, limit);
		}
		return;
	}
	if (!(__sync_fetch_and_or(&w->flags, F_KILLED) & F_KILLED)) {
		note_usage(w, which, usage);
		w->kills = 1;
		signal_change(w, tgid, EV_KILLED, which, usage, limit);
	}
}

static __always_inline void judge(struct watch *w, __u32 tgid, __u32 which, __u32 over,
				  __u64 usage, __u64 limit)
{
	if (usage <= limit) {
		if (w->flags & over)
			__sync_fetch_and_and(&w->flags, ~over);
		return;
	}
	if (w->action == ACT_KILL) {
		kill_group(w, tgid, which, usage, limit);
		return;
	}
	if (w->flags & over || (__sync_fetch_and_or(&w->flags, over) & over))
		return;
	note_usage(w, which, usage);
	__sync_fetch_and_add(&w->crossings[which == W_HEAP ? 0 : 1], 1);
	signal_change(w, tgid, w->action == ACT_NOTIFY ? EV_NOTIFIED : EV_EXCEEDED, which, usage,
		      limit);
}

/* warn=N%: usage over the threshold, once per crossing (counted, one event); back
 * at or under it, re-armed. Judged before the limit: the warning comes first. */
static __always_inline void judge_warn(struct watch *w, __u32 tgid, __u32 which, __u32 bit,
				       __u64 usage, __u64 threshold)
{
	__u32 i = which == W_HEAP ? 0 : 1;

	if (usage <= threshold) {	/* NONE: never over */
		if (w->flags & bit)
			__sync_fetch_and_and(&w->flags, ~bit);
		return;
	}
	if (w->flags & bit || (__sync_fetch_and_or(&w->flags, bit) & bit))
		return;
	w->warned_at[i] = usage;
	__sync_fetch_and_add(&w->warnings[i], 1);
	signal_change(w, tgid, EV_WARNED, which, usage, threshold);
}

/* judge(), for a check made in a call of a sharer (another thread group with
 * the watched address space or table): it is killed in its call, and the
 * watched process with it. */
static __always_inline void judge_shared(struct watch *w, __u32 tgid, __u32 which, __u32 over,
					 __u64 usage, __u64 limit, int sharer)
{
	if (sharer && usage > limit && w->action == ACT_KILL)
		kill_owner(w);
	judge(w, tgid, which, over, usage, limit);
}

static __always_inline void signal_tree(struct tree *t, __u32 root, __u32 kind, __u32 which,
					__u32 member, __u64 usage, __u64 limit)
{
	if (__sync_fetch_and_or(&t->pending, 1) & 1)
		return;
	if (!emit_member(root, kind, which, member, usage, limit))
		t->pending = 0;
}

/* warn=N% of a tree: its sum over the threshold, once per crossing (counted, one
 * event); back at or under it, re-armed. Judged before the limit, as a process's. */
static __always_inline void judge_tree_warn(struct tree *t, __u32 root, __u32 member,
					    __u32 which, __u32 bit, __u64 sum, __u64 threshold)
{
	__u32 i = which == W_HEAP ? 0 : 1;

	if (sum <= threshold) {	/* NONE: never over */
		if (t->flags & bit)
			__sync_fetch_and_and(&t->flags, ~bit);
		return;
	}
	if (t->flags & bit || (__sync_fetch_and_or(&t->flags, bit) & bit))
		return;
	t->warned_at[i] = sum;
	__sync_fetch_and_add(&t->warnings[i], 1);
	signal_tree(t, root, EV_TREE_WARNED, which, member, sum, threshold);
}

/* The tree's quota over its new sum, in the call of `member` (or of a sharer of
 * its address space or table): over a kill limit, the caller is killed in that
 * call and the tree flagged (the daemon kills the rest); a member of a killed
 * tree dies at its next checked call. notify: once per crossing. */
static __always_inline void judge_tree(struct tree *t, __u32 root, __u32 member, __u32 which,
				       __u32 over, __u64 sum, __u64 limit, struct watch *w,
				       int sharer)
{
	__u32 i = which == W_HEAP ? 0 : 1;

	if (!(t->flags & F_KILLED)) {
		if (sum <= limit) {
			if (t->flags & over)
				__sync_fetch_and_and(&t->flags, ~over);
			return;
		}
		if (t->action != ACT_KILL) {
			if (t->flags & over || (__sync_fetch_and_or(&t->flags, over) & over))
				return;
			t->usage_at[i] = sum;
			__sync_fetch_and_add(&t->crossings[i], 1);
			signal_tree(t, root, EV_TREE_NOTIFIED, which, member, sum, limit);
			return;
		}
	}
	bpf_send_signal(SIGKILL);
	if (sharer)
		kill_owner(w);
	if (__sync_fetch_and_or(&t->flags, F_KILLED) & F_KILLED)
		return;
	t->killer = member;
	t->usage_at[i] = sum;
	t->kills = 1;
	signal_tree(t, root, EV_TREE_KILLED, which, member, sum, limit);
}

/* A member's check: its usage `now` into its tree's sum, then the tree judged. */
static __always_inline void check_tree(struct watch *w, __u32 key, __u32 which, __u64 now,
				       int sharer)
{
	__u32 root = w->tree;
	struct tree *t;

	if (!root)
		return;
	t = bpf_map_lookup_elem(&trees, &root);
	if (!t)
		return;
	if (which == W_HEAP) {
		__u64 sum = move_sum(&t->heap_pages, &w->seen_heap_pages, now);

		judge_tree_warn(t, root, key, W_HEAP, F_HEAP_WARNED, sum, t->heap_warn_pages);
		judge_tree(t, root, key, W_HEAP, F_HEAP_OVER, sum, t->heap_limit_pages, w, sharer);
	} else {
		__u64 sum = move_sum(&t->fds, &w->seen_fds, now);

		judge_tree_warn(t, root, key, W_FILES, F_FILES_WARNED, sum, t->fd_warn);
		judge_tree(t, root, key, W_FILES, F_FILES_OVER, sum, t->fd_limit, w, sharer);
	}
}

/* Raise a watermark; two CPUs racing never lose the higher value. */
static __always_inline void raise_peak(__u64 *peak, __u64 value)
{
	__u64 seen = *peak;

	for (int i = 0; i < 8 && value > seen; i++) {
		__u64 was = __sync_val_compare_and_swap(peak, seen, value);

		if (was == seen)
			return;
		seen = was;
	}
}

static __u64 data_vm_pages(void)
{
	struct task_struct *task = (void *)bpf_get_current_task();

	return BPF_CORE_READ(task, mm, data_vm);
}

#define ENOMEM 12
#define EMFILE 24

/* A deny quota's limit refused the call: counted (the daemon logs and counts it). */
static __always_inline void count_denied(struct watch *w, __u32 tgid, __u32 which, __u64 usage,
					 __u64 limit)
{
	if (w->action != ACT_DENY)
		return;
	__sync_fetch_and_add(&w->denied[which == W_HEAP ? 0 : 1], 1);
	signal_change(w, tgid, EV_DENIED, which, usage, limit);
}

SEC("tracepoint")
int heap_exit(struct sys_exit *ctx)
{
	int sharer;
	__u32 tgid;
	struct watch *w = checked_watch(1, &tgid, &sharer);
	__u64 pages;

	if (!w)
		return 0;
	pages = data_vm_pages();
	raise_peak(&w->heap_peak_pages, pages);
	judge_warn(w, tgid, W_HEAP, F_HEAP_WARNED, pages, w->heap_warn_pages);
	judge_shared(w, tgid, W_HEAP, F_HEAP_OVER, pages, w->heap_limit_pages, sharer);
	check_tree(w, tgid, W_HEAP, pages, sharer);
	if (ctx->ret == -ENOMEM && w->data_soft != NONE)
		count_denied(w, tgid, W_HEAP, pages, w->heap_limit_pages);
	return 0;
}

struct fd_count {
	unsigned long *words;
	__u64 count;
};

static long count_word(__u32 i, struct fd_count *c)
{
	unsigned long word = 0;

	bpf_probe_read_kernel(&word, sizeof(word), c->words + i);
	c->count += __builtin_popcountl(word);
	return 0;
}

/* Exactly the bits set in the descriptor table's open_fds bitmap. */
static __u64 open_fds_of(struct task_struct *task)
{
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct fd_count c = { .words = BPF_CORE_READ(fdt, open_fds), .count = 0 };
	__u32 words = BPF_CORE_READ(fdt, max_fds) / (8 * sizeof(unsigned long));

	if (words > MAX_FD_WORDS)
		words = MAX_FD_WORDS;
	bpf_loop(words, count_word, &c, 0);
	return c.count;
}

static __u64 open_fds(void)
{
	return open_fds_of((void *)bpf_get_current_task());
}

/* The descriptor check; ret is the call's result (0 where there is none). */
static __always_inline void check_files(long ret)
{
	int sharer;
	__u32 tgid;
	struct watch *w = checked_watch(0, &tgid, &sharer);
	__u64 fds;

	if (!w)
		return;
	fds = open_fds();
	raise_peak(&w->fd_peak, fds);
	judge_warn(w, tgid, W_FILES, F_FILES_WARNED, fds, w->fd_warn);
	judge_shared(w, tgid, W_FILES, F_FILES_OVER, fds, w->fd_limit, sharer);
	check_tree(w, tgid, W_FILES, fds, sharer);
	if (ret == -EMFILE && w->nofile_soft != NONE)
		count_denied(w, tgid, W_FILES, fds, w->fd_limit);
	if (w->action == ACT_DENY && w->nofile_soft != NONE && !sharer) {
		/* The soft RLIMIT_NOFILE counts fd numbers: a closed descriptor
		 * changes how many opens it lets through, so the daemon sets it anew. */
		if (fds < w->fd_last) {
			__sync_fetch_and_add(&w->shrunk, 1);
			signal_change(w, tgid, EV_SHRUNK, W_FILES, fds, w->fd_limit);
		}
		w->fd_last = fds;
	}
}

SEC("tracepoint")
int files_exit(struct sys_exit *ctx)
{
	check_files(ctx->ret);
	return 0;
}

/* io_uring work completed by an io-wq worker or the SQ thread (threads of the
 * submitter's group), checked where it completes. */
SEC("tracepoint")
int uring_files(void *ctx)
{
	check_files(0);
	return 0;
}

/* The same for a member: the sum with this member at `pages`, over a kill limit. */
static void stop_tree_populate(struct watch *w, __u32 key, __u64 pages)
{
	__u32 root = w->tree;
	struct tree *t = bpf_map_lookup_elem(&trees, &root);
	__u64 sum;

	if (!t || t->action != ACT_KILL || t->heap_limit_pages == NONE)
		return;
	sum = t->heap_pages - w->seen_heap_pages + pages;
	if (sum > t->heap_limit_pages)
		judge_tree(t, root, key, W_HEAP, F_HEAP_OVER, sum, t->heap_limit_pages, w, 0);
}

/* Kill before a call that populates `grow` bytes of data mapping past the quota. */
static void stop_populate(__u64 grow)
{
	struct watch *w;
	__u32 tgid;
	__u64 pages;

	w = current_watch(&tgid);
	if (!w)
		return;
	pages = data_vm_pages() + ((grow + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT);
	if (w->action == ACT_KILL && w->heap_limit_pages != NONE && pages > w->heap_limit_pages)
		kill_group(w, tgid, W_HEAP, pages, w->heap_limit_pages);
	if (w->tree)
		stop_tree_populate(w, tgid, pages);
}

/* mlockall(MCL_FUTURE) without MCL_ONFAULT: every new mapping is populated. */
static int locked_future(void)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	unsigned long def = BPF_CORE_READ(task, mm, def_flags);

	return (def & (VM_LOCKED | VM_LOCKONFAULT)) == VM_LOCKED;
}

SEC("tracepoint")
int mmap_enter(struct sys_enter *ctx)
{
	unsigned long prot = ctx->args[2], flags = ctx->args[3];

	if (!(prot & PROT_WRITE) || (flags & (MAP_SHARED | MAP_GROWSDOWN)))
		return 0;	/* not a data mapping: data_vm does not grow */
	if ((flags & (MAP_POPULATE | MAP_LOCKED)) || locked_future())
		stop_populate(ctx->args[1]);
	return 0;
}

SEC("tracepoint")
int brk_enter(struct sys_enter *ctx)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	unsigned long old = BPF_CORE_READ(task, mm, brk), new = ctx->args[0];

	if (new > old && locked_future())
		stop_populate(new - old);
	return 0;
}

/* A cheap first test before the costlier mapping lookup. */
static int watched_now(void)
{
	__u32 tgid = current_key();

	return tgid && bpf_map_lookup_elem(&watched, &tgid) != 0;
}

struct vma_probe {
	unsigned long flags;
	int found;
};

static long read_vma_flags(struct task_struct *task, struct vm_area_struct *vma,
			   struct vma_probe *p)
{
	p->flags = BPF_CORE_READ(vma, vm_flags);
	p->found = 1;
	return 0;
}

/* The vm_flags of the mapping at addr, or 0 when none (or mmap_lock is busy). */
static unsigned long vma_flags(unsigned long addr)
{
	struct vma_probe p = {};

	bpf_find_vma(bpf_get_current_task_btf(), addr, read_vma_flags, &p, 0);
	return p.found ? p.flags : 0;
}

SEC("tracepoint")
int mremap_enter(struct sys_enter *ctx)
{
	unsigned long old_len = ctx->args[1], new_len = ctx->args[2], flags;

	if (new_len <= old_len || !watched_now())
		return 0;
	flags = vma_flags(ctx->args[0]);
	/* The grown part of a locked data mapping is populated. */
	if ((flags & (VM_WRITE | VM_SHARED | VM_STACK)) == VM_WRITE &&
	    (flags & (VM_LOCKED | VM_LOCKONFAULT)) == VM_LOCKED)
		stop_populate(new_len - old_len);
	return 0;
}

SEC("tracepoint")
int mprotect_enter(struct sys_enter *ctx)
{
	unsigned long flags;

	if (!(ctx->args[2] & PROT_WRITE) || !watched_now())
		return 0;
	flags = vma_flags(ctx->args[0]);
	/* Making a locked private mapping writable populates it (mprotect_fixup). */
	if ((flags & (VM_WRITE | VM_SHARED | VM_STACK | VM_LOCKED | VM_LOCKONFAULT)) == VM_LOCKED)
		stop_populate(ctx->args[1]);
	return 0;
}

/* A deny quota's soft limit raised by (resource, new) on thread group tgid. */
static void note_raise(__u32 tgid, unsigned long resource, const struct rlimit *new)
{
	struct watch *w = bpf_map_lookup_elem(&watched, &tgid);
	struct raise r = { .tgid = tgid };
	__u32 tid = bpf_get_current_pid_tgid();
	__u64 cur = 0;

	if (!w || w->action != ACT_DENY || !new)
		return;
	if (resource == RLIMIT_DATA) {
		r.which = W_HEAP;
		r.wanted = w->data_soft;
	} else if (resource == RLIMIT_NOFILE) {
		r.which = W_FILES;
		r.wanted = w->nofile_soft;
	} else {
		return;
	}
	bpf_probe_read_user(&cur, sizeof(cur), &new->rlim_cur);
	if (r.wanted == NONE || cur <= r.wanted)
		return;
	r.value = cur;
	bpf_map_update_elem(&raises, &tid, &r, BPF_ANY);
}

SEC("tracepoint")
int setrlimit_enter(struct sys_enter *ctx)
{
	note_raise(current_key(), ctx->args[0], (void *)ctx->args[1]);
	return 0;
}

/* The key of the thread group that `vpid` (a pid or any tid, in the caller's PID
 * namespace, as the kernel reads it) names; 0 for the caller. */
static __u32 key_of_vpid(__s32 vpid)
{
	struct task_struct *task;
	__u32 key;

	if (!vpid)
		return current_key();
	task = bpf_task_from_vpid(vpid);
	if (!task)
		return 0;
	key = key_of(task);
	bpf_task_release(task);
	return key;
}

SEC("tracepoint")
int prlimit_enter(struct sys_enter *ctx)
{
	__u32 key = key_of_vpid(ctx->args[0]);

	if (key)
		note_raise(key, ctx->args[1], (void *)ctx->args[2]);
	return 0;
}

static void count_raise(__u32 key, __u32 which, __u64 value, __u64 wanted)
{
	struct watch *w = bpf_map_lookup_elem(&watched, &key);

	if (!w)
		return;
	__sync_fetch_and_add(&w->raised, 1);
	signal_change(w, key, EV_RAISED, which, value, wanted);
}

SEC("tracepoint")
int rlimit_exit(struct sys_exit *ctx)
{
	__u32 tid = bpf_get_current_pid_tgid();
	struct raise *r = bpf_map_lookup_elem(&raises, &tid);

	if (!r)
		return 0;
	if (ctx->ret == 0)
		count_raise(r->tgid, r->which, r->value, r->wanted);
	bpf_map_delete_elem(&raises, &tid);
	return 0;
}

/* Index the address space and descriptor table of `task` (watched as `w`). */
static void index_shared(struct task_struct *task, struct watch *w, __u32 key)
{
	__u64 mm = (__u64)BPF_CORE_READ(task, mm), files = (__u64)BPF_CORE_READ(task, files);

	forget_shared(w);
	w->mm = mm;
	w->files = files;
	w->host_tgid = BPF_CORE_READ(task, tgid);
	if (mm)
		bpf_map_update_elem(&by_mm, &mm, &key, BPF_ANY);
	if (files)
		bpf_map_update_elem(&by_files, &files, &key, BPF_ANY);
}

/* The old image's memory is gone with its address space: the heap baseline
 * becomes the new image's data_vm if that is lower, so an exec never lets a
 * process take more than its quota beyond where it started (it never raises
 * the baseline either). The watermark restarts there. */
static void rebase_heap(struct task_struct *task, struct watch *w, __u32 key)
{
	__u64 now = BPF_CORE_READ(task, mm, data_vm), base = w->heap_base_pages;

	if (w->heap_limit_pages == NONE || now >= base)
		return;
	w->heap_limit_pages = now + (w->heap_limit_pages - base);
	if (w->heap_warn_pages != NONE)
		w->heap_warn_pages = now + (w->heap_warn_pages - base);
	w->heap_base_pages = now;
	__sync_lock_test_and_set(&w->heap_peak_pages, now);
	__sync_fetch_and_add(&w->execs, 1);
	signal_change(w, key, EV_EXEC, W_HEAP, now, w->heap_limit_pages);
}

/* exec gives the process a new address space (and a table of its own if it was
 * shared): index the new ones, drop the old. */
SEC("tp_btf/sched_process_exec")
int BPF_PROG(group_exec, struct task_struct *task, int old_pid, void *bprm)
{
	__u32 key = key_of(task);
	struct watch *w = key ? bpf_map_lookup_elem(&watched, &key) : 0;

	if (!w)
		return 0;
	index_shared(task, w, key);
	rebase_heap(task, w, key);
	return 0;
}

/* A child of a tree member joins the tree before it runs: its usage now (a
 * copy of its parent's) is added to the sums. A child forked into a killed
 * tree is killed before its first instruction. The tree removed meanwhile
 * (unwatch_tree deletes it, then sweeps its members): the join is undone. */
static __always_inline void join_at_fork(struct task_struct *child, struct watch *in,
					 struct tree *t, __u32 root, __u64 pages, __u64 fds)
{
	__sync_fetch_and_add(&t->members, 1);
	__sync_fetch_and_add(&t->heap_pages, pages);
	__sync_fetch_and_add(&t->fds, fds);
	if (!bpf_map_lookup_elem(&trees, &root)) {
		in->tree = 0;
		return;
	}
	if (t->flags & F_KILLED)
		bpf_send_signal_task(child, SIGKILL, PIDTYPE_TGID, 0);
}

/* A new thread group watched before it runs (the tracepoint fires before
 * wake_up_new_task) when its parent's group has an inherit rule (its own
 * quota over its usage now, a copy of the parent's, and the rule passed on)
 * or is a tree member (a member too). */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(group_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 parent_key = key_of(parent), key, root = 0;
	struct inherit *rule, passed;
	struct watch w = {}, *parent_w, *in;
	struct tree *t = 0;
	__u64 pages, fds, parent_start;

	if (!parent_key || BPF_CORE_READ(child, tgid) != BPF_CORE_READ(child, pid))
		return 0;	/* a thread, not a new group */
	rule = bpf_map_lookup_elem(&inherit, &parent_key);
	parent_w = bpf_map_lookup_elem(&watched, &parent_key);
	if (parent_w)
		root = parent_w->tree;
	if (!root && !rule)
		return 0;
	parent_start = BPF_CORE_READ(parent, group_leader, start_boottime) / CLOCK_TICK_NS;
	if (rule && rule->start_time != parent_start)
		rule = 0;
	if (parent_w && root && parent_w->start_time == parent_start)
		t = bpf_map_lookup_elem(&trees, &root);
	if (!t)
		root = 0;
	if (!root && !rule)
		return 0;
	key = key_of(child);
	if (!key)
		return 0;
	pages = BPF_CORE_READ(child, mm, data_vm);
	fds = open_fds_of(child);
	w.start_time = BPF_CORE_READ(child, start_boottime) / CLOCK_TICK_NS;
	w.heap_base_pages = pages;
	w.heap_limit_pages = NONE;
	w.fd_limit = NONE;
	w.heap_peak_pages = pages;
	w.fd_peak = fds;
	w.data_soft = NONE;
	w.nofile_soft = NONE;
	w.heap_warn_pages = NONE;	/* the daemon sets a warning when it registers it */
	w.fd_warn = NONE;
	if (rule) {
		passed = *rule;
		passed.start_time = w.start_time;
		bpf_map_update_elem(&inherit, &key, &passed, BPF_ANY);
		if (rule->heap_quota_pages != NONE)
			w.heap_limit_pages = pages + rule->heap_quota_pages;
		if (rule->fd_quota != NONE)
			w.fd_limit = fds + rule->fd_quota;
		w.action = rule->action;
		w.pending = 1;	/* the FORKED event below, which carries the baseline */
	} else {
		w.action = t->action;
	}
	if (t) {
		w.tree = root;
		w.seen_heap_pages = pages;
		w.seen_fds = fds;
	}
	if (bpf_map_update_elem(&watched, &key, &w, BPF_NOEXIST)) {
		if (t) {	/* full (or already there): the tree misses this one */
			__sync_fetch_and_add(&t->lost, 1);
			__sync_fetch_and_or(&t->flags, F_LOST);
		}
		return 0;
	}
	in = bpf_map_lookup_elem(&watched, &key);
	if (!in)
		return 0;
	index_shared(child, in, key);
	if (t)
		join_at_fork(child, in, t, root, pages, fds);
	if (rule && !emit(key, EV_FORKED, W_NONE, pages, fds))
		in->pending = 0;
	return 0;
}

/* Run by the daemon to set a tree quota on the process `key` (watched already):
 * the tree made, or its settings replaced (its sums and members kept), and the
 * process made its first member with its usage now. -EBUSY: the process is a
 * member of another tree, or its pid still names the tree of an earlier process
 * with live members; -ENOENT/-ESRCH: not that process (any more). */
SEC("syscall")
int set_tree(struct tree_args *a)
{
	__u32 key = a->key;
	struct watch *w = bpf_map_lookup_elem(&watched, &key);
	struct tree *t, fresh = {};
	struct task_struct *task;
	int error = 0;

	if (!w || w->start_time != a->start_time)
		return -2;	/* ENOENT */
	if (w->tree && w->tree != key)
		return -16;	/* EBUSY */
	t = bpf_map_lookup_elem(&trees, &key);
	if (t && t->start_time != a->start_time)
		return -16;
	if (!t) {
		fresh.start_time = a->start_time;
		if (bpf_map_update_elem(&trees, &key, &fresh, BPF_NOEXIST))
			return -28;	/* ENOSPC */
		t = bpf_map_lookup_elem(&trees, &key);
		if (!t)
			return -28;
	}
	t->heap_limit_pages = a->heap_limit_pages;
	t->fd_limit = a->fd_limit;
	t->heap_base_pages = a->heap_base_pages;
	t->fd_base = a->fd_base;
	t->heap_warn_pages = a->heap_warn_pages;
	t->fd_warn = a->fd_warn;
	t->action = a->action;
	task = bpf_task_from_vpid(key);
	if (!task)
		return -3;	/* ESRCH */
	if (BPF_CORE_READ(task, group_leader, start_boottime) / CLOCK_TICK_NS != a->start_time) {
		bpf_task_release(task);
		return -3;
	}
	if (!w->tree) {
		__sync_fetch_and_add(&t->members, 1);
		w->tree = key;
	}
	move_sum(&t->heap_pages, &w->seen_heap_pages, BPF_CORE_READ(task, mm, data_vm));
	move_sum(&t->fds, &w->seen_fds, open_fds_of(task));
	if (BPF_CORE_READ(task, signal, live.counter) == 0) {
		/* Exiting: its exit may have taken its values out already. */
		move_sum(&t->heap_pages, &w->seen_heap_pages, 0);
		move_sum(&t->fds, &w->seen_fds, 0);
		error = -3;
	}
	bpf_task_release(task);
	return error;
}

/* Run by the daemon for a tree's event: clear pending first, then take each
 * count exactly once (as take_counts for an entry). */
SEC("syscall")
int take_tree(struct tree_take *a)
{
	__u32 key = a->key;
	struct tree *t = bpf_map_lookup_elem(&trees, &key);

	a->found = 0;
	if (!t)
		return 0;
	__sync_lock_test_and_set(&t->pending, 0);
	a->found = 1;
	a->crossings[0] = __sync_lock_test_and_set(&t->crossings[0], 0);
	a->crossings[1] = __sync_lock_test_and_set(&t->crossings[1], 0);
	a->usage_at[0] = t->usage_at[0];
	a->usage_at[1] = t->usage_at[1];
	a->kills = __sync_lock_test_and_set(&t->kills, 0);
	a->warnings[0] = __sync_lock_test_and_set(&t->warnings[0], 0);
	a->warnings[1] = __sync_lock_test_and_set(&t->warnings[1], 0);
	a->warned_at[0] = t->warned_at[0];
	a->warned_at[1] = t->warned_at[1];
	return 0;
}

/* Run by the daemon instead of writing a tree member's entry whole (a quota of
 * its own set or reset): the settings replaced, the counts restarted, its
 * membership and its share of the sums kept. found: 0 if not such a member. */
SEC("syscall")
int rewatch(struct rewatch *a)
{
	__u32 key = a->key;
	struct watch *w = bpf_map_lookup_elem(&watched, &key);

	a->found = 0;
	if (!w || !w->tree || w->start_time != a->w.start_time)
		return 0;
	w->heap_limit_pages = a->w.heap_limit_pages;
	w->fd_limit = a->w.fd_limit;
	w->heap_peak_pages = a->w.heap_peak_pages;
	w->fd_peak = a->w.fd_peak;
	w->data_soft = a->w.data_soft;
	w->nofile_soft = a->w.nofile_soft;
	w->action = a->w.action;
	w->flags = a->w.flags;
	w->heap_base_pages = a->w.heap_base_pages;
	w->heap_warn_pages = a->w.heap_warn_pages;
	w->fd_warn = a->w.fd_warn;
	w->pending = 0;
	for (int i = 0; i < 2; i++) {
		w->crossings[i] = 0;
		w->usage_at[i] = 0;
		w->denied[i] = 0;
		w->warnings[i] = 0;
		w->warned_at[i] = 0;
	}
	w->raised = 0;
	w->kills = 0;
	w->kill_failed = 0;
	w->execs = 0;
	w->fd_last = 0;
	w->shrunk = 0;
	a->found = 1;
	return 0;
}

/* Run by the daemon on each member of a tree it removed (unwatch_tree) that has
 * a quota of its own: it stays watched, no longer a member. */
SEC("syscall")
int drop_member(struct bind_args *args)
{
	__u32 key = args->key;
	struct watch *w = bpf_map_lookup_elem(&watched, &key);

	if (!w)
		return -2;	/* ENOENT */
	w->tree = 0;
	__sync_lock_test_and_set(&w->seen_heap_pages, 0);
	__sync_lock_test_and_set(&w->seen_fds, 0);
	return 0;
}

/* Run by the daemon for each event (and at a reconcile): clear pending first,
 * so a change after it sends a new event, then take each count exactly once. */
SEC("syscall")
int take_counts(struct take *t)
{
	__u32 key = t->key;
	struct watch *w = bpf_map_lookup_elem(&watched, &key);

	t->found = 0;
	if (!w)
		return 0;
	__sync_lock_test_and_set(&w->pending, 0);
	t->found = 1;
	t->crossings[0] = __sync_lock_test_and_set(&w->crossings[0], 0);
	t->crossings[1] = __sync_lock_test_and_set(&w->crossings[1], 0);
	t->usage_at[0] = w->usage_at[0];
	t->usage_at[1] = w->usage_at[1];
	t->denied[0] = __sync_lock_test_and_set(&w->denied[0], 0);
	t->denied[1] = __sync_lock_test_and_set(&w->denied[1], 0);
	t->raised = __sync_lock_test_and_set(&w->raised, 0);
	t->kills = __sync_lock_test_and_set(&w->kills, 0);
	t->kill_failed = __sync_lock_test_and_set(&w->kill_failed, 0);
	t->execs = __sync_lock_test_and_set(&w->execs, 0);
	t->heap_base_pages = w->heap_base_pages;
	t->shrunk = __sync_lock_test_and_set(&w->shrunk, 0);
	t->warnings[0] = __sync_lock_test_and_set(&w->warnings[0], 0);
	t->warnings[1] = __sync_lock_test_and_set(&w->warnings[1], 0);
	t->warned_at[0] = w->warned_at[0];
	t->warned_at[1] = w->warned_at[1];
	return 0;
}

/* Restart the watermarks from the given values (a usage reset) without rewriting
 * the entry: flags and counts the kernel changes meanwhile stay. */
SEC("syscall")
int set_peaks(struct peaks_args *a)
{
	__u32 key = a->key;
	struct watch *w = bpf_map_lookup_elem(&watched, &key);

	a->found = w != 0;
	if (w) {
		__sync_lock_test_and_set(&w->heap_peak_pages, a->heap_pages);
		__sync_lock_test_and_set(&w->fd_peak, a->fds);
	}
	return 0;
}

/* Run by the daemon (BPF_PROG_TEST_RUN) after it writes an entry: index the
 * process's address space and descriptor table. key is a pid in the daemon's
 * namespace, which is the one bpf_task_from_vpid reads here. */
SEC("syscall")
int bind_process(struct bind_args *args)
{
	__u32 key = args->key;
	struct watch *w = bpf_map_lookup_elem(&watched, &key);
	struct task_struct *task;
	int found;

	if (!w)
		return -2;	/* ENOENT */
	task = bpf_task_from_vpid(key);
	if (!task)
		return -3;	/* ESRCH */
	found = BPF_CORE_READ(task, group_leader, start_boottime) / CLOCK_TICK_NS == w->start_time;
	if (found)
		index_shared(task, w, key);
	bpf_task_release(task);
	return found ? 0 : -3;
}

/* The last thread of a group is gone: the entry goes with it, so a recycled
 * pid never inherits a quota. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(group_exit, struct task_struct *task)
{
	__u32 tgid = key_of(task);
	struct watch *w;

	/* Whatever its start time: a pid is never held by two live processes. */
	if (!tgid || BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;
	bpf_map_delete_elem(&inherit, &tgid);	/* a --track-children root's too */
	w = bpf_map_lookup_elem(&watched, &tgid);
	if (!w)
		return 0;
	forget_shared(w);
	if (!only_member(w, tgid))
		emit_exit(tgid, w);
	leave_tree(w);
	bpf_map_delete_elem(&watched, &tgid);
	return 0;
}

/* A deny limit raised on the group of `task` (watched as `w`) whatever the call:
 * the soft limits in force compared with the ones set. */
static void check_raised(struct task_struct *task, __u32 key, struct watch *w)
{
	__u64 data = BPF_CORE_READ(task, signal, rlim[RLIMIT_DATA].rlim_cur);
	__u64 nofile = BPF_CORE_READ(task, signal, rlim[RLIMIT_NOFILE].rlim_cur);

	if (w->action != ACT_DENY)
		return;
	if (w->data_soft != NONE && data > w->data_soft)
		count_raise(key, W_HEAP, data, w->data_soft);
	if (w->nofile_soft != NONE && nofile > w->nofile_soft)
		count_raise(key, W_FILES, nofile, w->nofile_soft);
}

/* The ia32 compat calls (int $0x80), which the syscalls:sys_* tracepoints do not
 * report on x86: one program on every syscall exit that returns at once unless
 * the call was a compat one. A watched compat process is checked whole at each
 * of its calls (heap, descriptors, deny limits): no syscall table to keep. */
SEC("tp_btf/sys_exit")
int BPF_PROG(compat_exit, struct pt_regs *regs, long ret)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct watch *w;
	__u32 key;

	if (!(task->thread_info.status & TS_COMPAT))
		return 0;
	if (BPF_CORE_READ(regs, orig_ax) == IA32_PRLIMIT64 && ret == 0 && BPF_CORE_READ(regs, bx)) {
		struct task_struct *target = bpf_task_from_vpid(BPF_CORE_READ(regs, bx));

		if (target) {
			key = key_of(target);
			w = key ? bpf_map_lookup_elem(&watched, &key) : 0;
			if (w)
				check_raised(target, key, w);
			bpf_task_release(target);
		}
	}
	w = current_watch(&key);
	if (!w)
		return 0;
	__u64 pages = data_vm_pages(), fds = open_fds();

	raise_peak(&w->heap_peak_pages, pages);
	raise_peak(&w->fd_peak, fds);
	judge_warn(w, key, W_HEAP, F_HEAP_WARNED, pages, w->heap_warn_pages);
	judge_warn(w, key, W_FILES, F_FILES_WARNED, fds, w->fd_warn);
	judge(w, key, W_HEAP, F_HEAP_OVER, pages, w->heap_limit_pages);
	judge(w, key, W_FILES, F_FILES_OVER, fds, w->fd_limit);
	check_tree(w, key, W_HEAP, pages, 0);
	check_tree(w, key, W_FILES, fds, 0);
	check_raised(task, key, w);
	return 0;
}

/* Run once by the daemon (BPF_PROG_TEST_RUN) before it attaches anything:
 * the level and inode of the PID namespace the daemon lives in. */
SEC("syscall")
int learn_namespace(void *ctx)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct pid *pid = BPF_CORE_READ(task, thread_pid);
	__u32 level = BPF_CORE_READ(pid, level);
	struct upid upid;

	if (level > 32 ||
	    bpf_probe_read_kernel(&upid, sizeof(upid),
				  (void *)pid + bpf_core_field_offset(struct pid, numbers) +
					  level * bpf_core_type_size(struct upid)))
		return -1;
	ns_level = level;
	ns_inum = BPF_CORE_READ(upid.ns, ns.inum);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";

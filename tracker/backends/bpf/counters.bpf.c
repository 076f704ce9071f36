// SPDX-License-Identifier: GPL-2.0
/* restrackfs: read one tracked process's VmData and name on demand, for reads of
 * the mount.
 *
 * A BPF_PROG_TYPE_SYSCALL program, attached to nothing: user space runs it with
 * BPF_PROG_TEST_RUN (counters.py), one bpf() call instead of opening,
 * formatting, reading and parsing /proc/PID/status. It reads the counter that
 * VmData shows, mm->data_vm, and the name that Name shows (comm, unescaped), of
 * the task the caller's pid namespace numbers
 * `pid` (the daemon's namespace, which its /proc shows), and only if that task
 * is the process of the caller's pidfd: its struct pid's pidfs inode number,
 * unique per process since boot, is the pidfd's st_ino. A number now held by
 * another process (or one of another namespace) is never read.
 *
 * Kept apart from restrack.bpf.o: it needs the bpf_task_from_vpid kfunc
 * (Linux 6.13) and pidfs, and a kernel without them must still load the engine.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "counters_shared.h"

#define PAI __attribute__((preserve_access_index))

struct mm_struct { unsigned long data_vm; } PAI;
struct pid { __u64 ino; } PAI;
struct task_struct { struct pid *thread_pid; struct mm_struct *mm; char comm[COMM_LEN]; } PAI;

extern struct task_struct *bpf_task_from_vpid(__s32 vpid) __ksym;
extern void bpf_task_release(struct task_struct *p) __ksym;

#define ESRCH 3
#define ENODATA 61

SEC("syscall")
int data_vm(struct query *query)
{
	struct task_struct *task = bpf_task_from_vpid(query->pid);
	struct mm_struct *mm;
	char comm[COMM_LEN] = {};
	int ret = -ESRCH;

	if (!task)
		return -ESRCH;
	if (BPF_CORE_READ(task, thread_pid, ino) == query->ino) {
		mm = BPF_CORE_READ(task, mm);
		ret = -ENODATA;
		if (mm) {
			query->data_vm_pages = BPF_CORE_READ(mm, data_vm);
			/* helpers may not write the context: through the stack */
			BPF_CORE_READ_STR_INTO(&comm, task, comm);
			__builtin_memcpy(query->comm, comm, sizeof(comm));
			ret = 0;
		}
	}
	bpf_task_release(task);
	return ret;
}

char LICENSE[] SEC("license") = "GPL";

/* SPDX-License-Identifier: GPL-2.0 */
/* restrackfs: what crosses between counters.bpf.c and _counters.c.
 *
 * Declared once, here, and included by both: the program's context under clang
 * -target bpf, the extension's buffer under gcc. Only <linux/types.h>, which
 * both have. tests/test_bpf.py compares the layout the extension was built with
 * (_counters.QUERY_LAYOUT) with counters.bpf.o's BTF.
 */
#ifndef COUNTERS_SHARED_H
#define COUNTERS_SHARED_H

#include <linux/types.h>

#define COMM_LEN 16	/* TASK_COMM_LEN: comm with its NUL */

/* In: pid, ino (the pidfd's st_ino). Out: data_vm in pages, comm (NUL-terminated).
 * data_vm returns 0; -ESRCH: no task of that number is that process; -ENODATA: it
 * has no address space (a zombie leader, an exiting task). */
struct query {
	__s32 pid;
	__u32 pad;
	__u64 ino;
	__u64 data_vm_pages;
	char comm[COMM_LEN];
};

#endif /* COUNTERS_SHARED_H */

// SPDX-License-Identifier: GPL-2.0
/* The cheapest program a single-hook design (tp_btf/sys_exit, every syscall of
 * every process) would run: look the caller up in a hash. bench/bpf_cost.py
 * --compare attaches it alone to price that design against per-syscall hooks. */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} watched SEC(".maps");

SEC("tp_btf/sys_exit")
int sys_exit_probe(__u64 *ctx)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	bpf_map_lookup_elem(&watched, &tgid);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";

"""Linux's own interfaces: every /proc read and parse, the pidfd-pinned
process, name escaping. Knows nothing of quotas."""

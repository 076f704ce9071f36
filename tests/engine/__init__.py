"""The tracking engine in-process, without FUSE: real processes, real /proc, real rlimits.

Every test drives a real workload process (see tests/support/c/workload.c) and checks
the engine against what the kernel says, read independently of `tracker`.
Synchronisation is by polling with a deadline, never by sleeping a guess.
"""

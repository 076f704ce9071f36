"""Deny mode: soft rlimits lowered, verified in /proc, kept and given back,
through prlimit(2) or a helper run with the owner's ids."""

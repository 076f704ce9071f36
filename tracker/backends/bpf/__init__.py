"""The BPF engine's kernel side (restrack.bpf.c) and its loader; see README.md."""

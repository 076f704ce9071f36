"""How usage reaches the engine: the seam (`base`), the polling backend
(`polling`, --engine procfs) and the kernel-pushed one (`bpf`)."""

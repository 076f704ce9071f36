"""The BPF engine against the real kernel: programs, counters, pins, every path to a resource."""

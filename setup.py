"""The one C extension: tracker.backends.bpf._counters (see its source). Everything else
about the package is in pyproject.toml.

Optional: where it cannot be compiled, the package still installs, and the
daemon says at start that it reads heapsize through /proc instead
(tracker/backends/bpf/counters.py). On the machines scripts/setup prepares it always
compiles, and the test suite fails if it does not load."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tracker.backends.bpf._counters",
            ["tracker/backends/bpf/_counters.c"],
            depends=["tracker/backends/bpf/counters_shared.h"],  # struct query, with the BPF side
            optional=True,
        ),
    ]
)

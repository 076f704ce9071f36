"""The one C extension: tracker.bpf._counters (see its source). Everything else
about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tracker.bpf._counters", ["tracker/bpf/_counters.c"])])

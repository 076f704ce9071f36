"""Fixtures of the BPF layer's tree tests: one attached kernel watch, treegrow."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bpf import prerequisites_missing
from tests.support.build import compile_c
from tests.support.paths import C_SOURCES
from tracker.backends.bpf import loader
from tracker.backends.bpf.loader import BpfUnavailable, KernelWatch


@pytest.fixture(scope="module")
def tree_watch() -> Iterator[KernelWatch]:
    """A kernel watch of its own, attached for the module (detaching costs seconds),
    its pins removed at the end; skipped only where BPF cannot run at all."""
    path = loader.BPFFS / f"restrackfs-test-{uuid.uuid4().hex[:12]}"
    try:
        watch = KernelWatch.open(path)
    except BpfUnavailable as error:
        missing = prerequisites_missing()
        if missing:
            pytest.skip(f"BPF unavailable: {missing}")
        pytest.fail(f"BPF prerequisites present but the engine does not load: {error}")
    try:
        watch.attach()
        yield watch
    finally:
        watch.close(unpin=True)
        loader.remove_tree(path)


@pytest.fixture(scope="session")
def treegrow_binary(bin_dir: Path) -> Path:
    """c/treegrow.c: a process tree that forks and grows on command."""
    return compile_c(C_SOURCES / "treegrow.c", bin_dir / "treegrow")

"""What the BPF tests share: whether this machine can load BPF, and the daemons' pins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, DaemonFactory
from tracker.backends.bpf import backend as bpf_backend
from tracker.backends.bpf import loader
from tracker.backends.bpf.loader import BpfUnavailable

SLOW = "2000"  # ms: the polling alone could not hold anything below
BPF = ("--engine", "bpf", "--interval", SLOW)


def prerequisites_missing() -> str | None:
    """Why this machine cannot run BPF at all (then skipping is right)."""
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "no /sys/kernel/btf/vmlinux"
    if os.geteuid() != 0:
        return "not root (needs CAP_BPF and CAP_PERFMON)"
    try:
        loader.library()
    except BpfUnavailable as error:
        return str(error)
    return None


needs_bpf = pytest.mark.skipif(
    prerequisites_missing() is not None, reason=f"BPF unavailable: {prerequisites_missing()}"
)


def pin_dir(daemon: Daemon) -> Path:
    return bpf_backend.pin_dir_of(daemon.state)


def scrub(path: Path) -> None:
    """Unpinning detaches a dead daemon's links and frees its maps."""
    loader.remove_tree(path)


def scrub_all(factory: DaemonFactory) -> None:
    """Stop the factory's daemons and remove their pin directories."""
    factory.stop_all()
    for daemon in factory.daemons:
        scrub(pin_dir(daemon))


def pin_dirs() -> set[Path]:
    """Every daemon's pin directory on this machine (none where bpffs is absent)."""
    try:
        return set(bpf_backend.PIN_ROOT.iterdir())
    except OSError:
        return set()

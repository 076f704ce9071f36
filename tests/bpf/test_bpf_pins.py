"""Pins only root made: an unprivileged user who can write in bpffs
(mounted 1777, as bpffs is without `mode=`) pre-creates the daemon's pin
directory, a directory in place of a map, or a symlink to another daemon's pins.
Each attack runs in a private mount namespace with a private bpffs, against a
real `restrackfs --engine bpf`, which must refuse to start with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.bpf import needs_bpf
from tests.support.paths import CHECKOUT
from tests.support.users import NOBODY
from tracker.backends.bpf import backend as bpf_backend

pytestmark = needs_bpf

AS_NOBODY = f"setpriv --reuid {NOBODY} --regid {NOBODY} --clear-groups"


def start_after(attack: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Mount a private 1777 bpffs, run `attack` (shell; $PINS is the daemon's pin
    directory), then start a bpf daemon on a mount point of its own."""
    state = tmp_path / "state.json"
    mount = tmp_path / "mnt"
    mount.mkdir()
    daemon = [sys.executable, "-m", "restrackfs.daemon", "--foreground", "--engine", "bpf"]
    daemon += ["--state", str(state), str(mount)]
    script = (
        "set -e; mount -t bpf -o mode=1777 bpf /sys/fs/bpf; "
        f"{attack}; exec timeout 20 {' '.join(daemon)}"
    )
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT), "AS_NOBODY": AS_NOBODY}
    env["PINS"] = str(bpf_backend.pin_dir_of(state))
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=40)


ATTACKS = {  # the shell that plants it, and the reason the daemon must give
    "pre-created by a user": ("$AS_NOBODY mkdir -p $PINS/watched", "not root: refused"),
    "root's, left open to all": ("mkdir -p -m 1777 $PINS", "writable by others: refused"),
    # a user cannot plant these inside root's 0700 directories; a root mistake or an
    # older version's leftovers can: each is still refused
    "a directory for a map": ("mkdir -p -m 0700 $PINS/watched", "is a directory: refused"),
    "a symlink to other pins": (
        "mkdir -m 0700 /sys/fs/bpf/restrackfs /sys/fs/bpf/other; ln -s /sys/fs/bpf/other $PINS",
        "is a symlink: refused",
    ),
    "a name not ours": ("mkdir -p -m 0700 $PINS/extra", "extra was not made by restrackfs"),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_planted_pins_are_refused_with_the_reason(tmp_path: Path, attack: str) -> None:
    shell, reason = ATTACKS[attack]
    result = start_after(shell, tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert reason in result.stderr, result.stderr[-2000:]


def test_a_bpffs_the_daemon_mounts_is_root_only(tmp_path: Path) -> None:
    """Where no bpffs is mounted, the daemon mounts it 0700, and its pins are 0700."""
    probe = (
        "import os, stat, sys; from pathlib import Path; from tracker.backends.bpf import loader; "
        "loader.check_prerequisites(); w = loader.KernelWatch.open(Path(sys.argv[1])); "
        "print(oct(os.stat('/sys/fs/bpf').st_mode & 0o777), "
        "oct(os.stat(sys.argv[1]).st_mode & 0o7777)); w.close(unpin=True)"
    )
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'umount /sys/fs/bpf 2>/dev/null || true; exec "$@"', "sh",
            sys.executable, "-c", probe, "/sys/fs/bpf/restrackfs/probe"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0o700", "0o700"]

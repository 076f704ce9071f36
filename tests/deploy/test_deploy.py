"""What deployments rely on, checked without a container runtime (tests/deploy/container
runs the pod)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from restrackfs.daemon import fuse_mounted


def top_fstype(path: Path) -> str:
    result = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--mountpoint", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.split()[-1]


def test_mounts_over_a_volume_and_leaves_it_when_it_stops(daemon_factory):
    """A pod's volume (emptyDir, hostPath) is a mount at the mount point: with
    --over-volume the daemon mounts on top of it, so the mount propagates through the
    volume to the pod. (Without it, such a mount is refused: tests/commands/test_daemon.py.)"""
    daemon = daemon_factory(start=False)
    subprocess.run(["mount", "-t", "tmpfs", "volume", str(daemon.mountpoint)], check=True)
    try:
        assert not fuse_mounted(daemon.mountpoint)
        daemon.start("--over-volume")
        assert fuse_mounted(daemon.mountpoint)
        assert top_fstype(daemon.mountpoint) == "fuse.restrackfs"
        assert "restrack_tracked_processes" in daemon.read("metrics")
        assert daemon.stop() == 0
        assert os.path.ismount(daemon.mountpoint)
        assert top_fstype(daemon.mountpoint) == "tmpfs"  # the volume is left as it was
    finally:
        if daemon.proc is not None:
            daemon.stop()
        subprocess.run(["umount", "-l", str(daemon.mountpoint)], check=False)


def test_over_volume_never_mounts_over_a_live_daemon(daemon, tmp_path):
    argv = [sys.executable, "-m", "restrackfs.daemon", "--foreground", "--over-volume"]
    argv += ["--state", str(tmp_path / "other.json"), str(daemon.mountpoint)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    assert result.returncode == 1, result.stderr
    assert "already mounted (fuse.restrackfs, served by pid " in result.stderr
    assert "restrack_tracked_processes" in daemon.read("metrics")

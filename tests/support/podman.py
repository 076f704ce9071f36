"""podman for `scripts/test --container`: runc, a private store, the image built here.

The fixtures are in tests/deploy/container/conftest.py.

Everything podman makes lives in one temp dir (its store, run and tmp dirs,
the shared mounts), so the teardown can remove every container, pod, volume,
image and mount of the run, even after a failure, and touches nothing else
podman may hold on this machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.paths import CHECKOUT

REPO = CHECKOUT
SETUP = CHECKOUT / "tests" / "deploy" / "container" / "setup"
ENABLED = os.environ.get("RESTRACK_CONTAINER_TEST") == "1"
IMAGE = "localhost/restrackfs-test:latest"
BASE = "localhost/restrackfs-test-base:latest"
# MACHINE.md: crun refuses this cgroup hybrid; default ulimits need CAP_SYS_RESOURCE.
CONTAINERS_CONF = """\
[containers]
default_ulimits = []
[engine]
runtime = "runc"
events_logger = "file"
"""

needs_container_flag = pytest.mark.skipif(
    not ENABLED, reason="minutes, and installs podman: run with scripts/test --container"
)


class Podman:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        conf = workdir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.argv = ["podman", "--root", str(workdir / "root"), "--runroot", str(workdir / "run")]
        self.argv += ["--tmpdir", str(workdir / "tmp")]

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 300, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.argv, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {result.returncode}\n{result.stderr}")
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*self.argv, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )

    def remove_everything(self) -> None:
        """Pods, containers, volumes, images, then the store itself."""
        for args in (
            ["pod", "rm", "--all", "--force", "--time", "5"],
            ["rm", "--all", "--force", "--time", "5"],
            ["volume", "rm", "--all", "--force"],
            ["rmi", "--all", "--force"],
            ["system", "reset", "--force"],
        ):
            self(*args, check=False, timeout=120)


def mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    with open("/proc/self/mountinfo") as mounts:
        points = [line.split()[4] for line in mounts]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def unmount_under(path: Path) -> None:
    """Every mount at or below `path`, deepest first, stacked ones too (a FUSE mount
    propagated onto a shared bind mount is a second mount at the same point)."""
    for _ in range(10):
        points = mounts_under(path)
        if not points:
            return
        for point in sorted(set(points), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def shared_mount(path: Path) -> Path:
    """A directory made a shared mount, as Bidirectional propagation needs of its source
    (Kubernetes nodes have / shared; this machine's is private)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "--make-shared", str(path)], check=True)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

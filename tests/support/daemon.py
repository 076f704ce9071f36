"""A restrackfs daemon serving a real mount: the one harness of the tests and the bench.

No pytest here: `bench/harness.py` builds its daemon on `Daemon`, and the tests'
`DaemonFactory` hands out fresh ones per test and removes all they leave.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from restrackfs import daemon as restrackfs_daemon
from tests.support.tempdirs import shared_tempdir
from tracker.backends.bpf import backend as bpf_backend

DAEMON_MODULE = (sys.executable, "-m", "restrackfs.daemon")


class DaemonStartError(RuntimeError):
    """The daemon exited, or did not mount, at start; the message ends with its log."""


def is_mounted(path: Path) -> bool:
    """From the mount table: a dead FUSE mount fails stat(), so os.path.ismount misses it."""
    target = os.fsencode(os.path.abspath(path))
    try:
        with open("/proc/self/mounts", "rb") as mounts:
            return any(line.split()[1] == target for line in mounts if len(line.split()) > 1)
    except OSError:
        return os.path.ismount(path)


def unmount(path: Path) -> None:
    """Lazily unmount `path` if anything is mounted there (a dead FUSE mount too)."""
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def end_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM if it still runs, up to `grace` seconds to exit, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def release(state: Path) -> None:
    """Lift what a stopped daemon left enforcing (soft limits, BPF pins): a stop
    keeps every quota, and the machine is shared with the rest of the suite."""
    if state.exists() or os.path.lexists(bpf_backend.pin_dir_of(state)):
        restrackfs_daemon.release(state)


class Daemon:
    """A restrackfs daemon serving `mountpoint`, its state in `state`, its output in `log`.

    `options` are given at every start, before the ones `start` is given; the engine
    is procfs unless an option names one: a bpf daemon that had a quota takes ~3 s to
    stop (detaching waits for RCU), so only the tests and benchmarks of bpf ask for it.
    """

    def __init__(
        self,
        mountpoint: Path,
        state: Path,
        log: Path,
        *options: str,
        command: Sequence[str] = DAEMON_MODULE,
        env: dict[str, str] | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.mountpoint = mountpoint
        self.state = state
        self.log = log
        self.options = list(options)
        self.command = list(command)
        self.env = env
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *options: str) -> Daemon:
        """Start and wait until the mount answers; DaemonStartError if it never does."""
        every = [*self.options, *options]
        argv = [*self.command, "--foreground", "--state", str(self.state), *every]
        if not any(option.startswith("--engine") for option in every):
            argv += ["--engine", "procfs"]
        argv.append(str(self.mountpoint))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
            )
        deadline = time.monotonic() + self.start_timeout
        while not self._serving():
            if self.proc.poll() is not None:
                raise DaemonStartError(f"restrackfs exited at start:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise DaemonStartError(f"restrackfs did not mount within {self.start_timeout} s")
            time.sleep(0.002)
        return self

    def _serving(self) -> bool:
        """Mounted and answering (a stale mount of a killed daemon is not)."""
        try:
            return "restrack_tracked_processes" in self.path("metrics").read_text()
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send `sig` and wait for the exit; its status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def path(self, *parts: object) -> Path:
        return self.mountpoint.joinpath(*map(str, parts))

    def read(self, *parts: object) -> str:
        return self.path(*parts).read_text()

    def write(self, text: str, *parts: object) -> None:
        """One write() of `text`, as `echo` does; raises OSError with the errno."""
        fd = os.open(self.path(*parts), os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def register(self, pid: int) -> None:
        self.write(f"{pid}\n", "register")

    def deregister(self, pid: int) -> None:
        self.write(f"{pid}\n", "deregister")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class DaemonFactory:
    """Starts daemons on fresh mount points; `cleanup` stops and removes them all."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.daemons: list[Daemon] = []

    def __call__(self, *options: str, start: bool = True) -> Daemon:
        mountpoint = shared_tempdir("restrack-mnt-")
        state = self.tmp_path / f"state{len(self.daemons)}.json"
        daemon = Daemon(mountpoint, state, self.tmp_path / "daemon.log", "--log-level", "debug")
        self.daemons.append(daemon)
        if start:
            daemon.start(*options)
        return daemon

    def stop_all(self) -> None:
        """Stop every daemon still running (one that outlived a fixture's directory
        would write its state file there anew, recreating the directory)."""
        for daemon in self.daemons:
            if daemon.proc is None:
                continue
            try:
                daemon.stop()
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()
                daemon.proc = None

    def cleanup(self) -> None:
        self.stop_all()
        for daemon in self.daemons:
            release(daemon.state)
            unmount(daemon.mountpoint)
            shutil.rmtree(daemon.mountpoint, ignore_errors=True)

"""A shell the tests run jobs in, to be a tree quota's root (c/fanout.c its job)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import trio

from tests.support.build import compile_c
from tests.support.paths import C_SOURCES


def build_fanout(bin_dir: Path) -> Path:
    return compile_c(C_SOURCES / "fanout.c", bin_dir / "fanout", threads=False)


class ShellRoot:
    """`sh` reading commands from a pipe, in a session of its own: the root of a
    tree; everything it starts (background jobs, their children) writes to one
    pipe the test reads, and `stop` kills the whole session."""

    def __init__(self, fanout: Path, **env: str) -> None:
        self.fanout = fanout
        self.proc = subprocess.Popen(
            ["sh"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, **env},
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []

    def run(self, command: str) -> None:
        """One line of shell; `{fanout}` names the fan-out program."""
        assert self.proc.stdin
        self.proc.stdin.write(command.format(fanout=self.fanout) + "\n")
        self.proc.stdin.flush()

    async def line(self, prefix: str, timeout: float = 10.0) -> list[str]:
        """The words of the next line starting with `prefix` (read in a thread: an
        in-process engine's checks go on meanwhile)."""
        with trio.fail_after(timeout):
            return await trio.to_thread.run_sync(self.read_line, prefix, abandon_on_cancel=True)

    def read_line(self, prefix: str) -> list[str]:
        """The words of the next line starting with `prefix` (blocks: for a daemon's tests)."""
        assert self.proc.stdout
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise EOFError(f"no line starting {prefix!r}: {self.lines}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line.split()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                with contextlib.suppress(OSError):
                    stream.close()


def is_dead(pid: int) -> bool:
    """Gone, or a zombie (killed, not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except FileNotFoundError:
        return True
    return raw[raw.rindex(b")") + 2 :].split()[0] in (b"Z", b"X")

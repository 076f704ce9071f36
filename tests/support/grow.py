"""c/grow.c, the BPF tests' growing process (the `grower` fixture: tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from tests.support.build import compile_c
from tests.support.paths import C_SOURCES


def build_grow(bin_dir: Path) -> Path:
    return compile_c(C_SOURCES / "grow.c", bin_dir / "grow")


class Grower:
    """c/grow.c: waits for "go", then grows step by step, reporting each step.

    `pid` is the growing process; its parent (our child) reaps it and reports
    how it ended and its own max RSS (not inherited from this big parent)."""

    def __init__(self, binary: Path, mode: str, step: int, count: int) -> None:
        argv = [str(binary), mode, str(step), str(count)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout and self.proc.stdin
        self.pid = int(self.proc.stdout.readline().split()[1])
        self.maxrss_kib = 0

    def go(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 20) -> tuple[int, int]:
        """(the signal that ended it or 0, the number of steps it reported)."""
        assert self.proc.stdout
        lines = self.proc.stdout.read().split("\n")
        self.proc.wait(timeout)
        end = [line.split() for line in lines if line.startswith("end ")]
        assert end, f"grower {self.pid} not reaped: {lines}"
        sig, self.maxrss_kib = int(end[0][1]), int(end[0][2])
        return sig, sum(1 for line in lines if line.startswith("step "))

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()

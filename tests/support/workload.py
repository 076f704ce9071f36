"""The workload: a C process (c/workload.c) that maps memory and opens files when told."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.build import compile_c
from tests.support.paths import C_SOURCES
from tests.support.users import as_user


def build_workload(bin_dir: Path) -> Path:
    return compile_c(C_SOURCES / "workload.c", bin_dir / "workload")


class Workload:
    """A child process that maps memory and opens files when told to."""

    def __init__(self, binary: Path, uid: int | None = None) -> None:
        argv = [str(binary)]
        if uid is not None:
            argv = as_user(uid, argv)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.pid = int(self.ask("pid").split()[1])
        assert self.pid == self.proc.pid

    def ask(self, *words: object) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        if not reply:
            raise ProcessLookupError(f"workload {self.pid} died (status {self.proc.poll()})")
        return reply

    def do(self, *words: object) -> str:
        reply = self.ask(*words)
        assert reply.startswith("ok"), f"{words}: {reply}"
        return reply

    def thread(self) -> int:
        return int(self.do("thread").split()[1])

    def wait(self, timeout: float = 5.0) -> int:
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()

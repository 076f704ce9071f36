"""A process whose name (comm) a test sets, as a user can: NAMER writes /proc/self/comm."""

from __future__ import annotations

import subprocess
import textwrap

from tests.support.users import NOBODY, as_user

# A process that takes names on stdin, as hex, and gives itself each (prctl's
# PR_SET_NAME through /proc/self/comm), answering "ok" once it is its name.
NAMER = textwrap.dedent(
    """
    import sys
    print("ready", flush=True)
    for line in sys.stdin:
        with open("/proc/self/comm", "wb") as comm:
            comm.write(bytes.fromhex(line.strip()))
        print("ok", flush=True)
    """
)


class Named:
    """A process of ours whose name we set: its comm is what we last told it."""

    def __init__(self, uid: int | None = None) -> None:
        argv = ["/usr/bin/python3", "-c", NAMER]
        self.proc = subprocess.Popen(
            as_user(NOBODY, argv) if uid == NOBODY else argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline() == "ready\n"
        self.pid = self.proc.pid

    def name(self, raw: bytes) -> None:
        self.proc.stdin.write(raw.hex() + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "ok\n"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()

"""A real terminal for full-screen commands: a pty, and pyte reading what is drawn on it.

The command runs on the pty's secondary side as its controlling terminal (its
own session), so it gets SIGWINCH from the kernel when the window size is set,
exactly as under a terminal emulator; pyte plays the emulator's part.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Sequence

import pyte


def _take_terminal() -> None:
    """In the child, a session leader by now: make its stdin, the pty, its controlling
    terminal (an inherited descriptor is not one by itself), so the kernel's SIGWINCH
    reaches it."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`argv` running in a `columns` x `lines` terminal; `screen` is what it shows."""

    def __init__(
        self,
        argv: Sequence[str],
        columns: int,
        lines: int,
        env: dict[str, str],
        term: str = "xterm-256color",
    ) -> None:
        self.primary, secondary = os.openpty()
        self._set_size(secondary, columns, lines)
        self.screen = pyte.Screen(columns, lines)
        self.stream = pyte.ByteStream(self.screen)
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=secondary,
                stdout=secondary,
                stderr=secondary,
                env={**env, "TERM": term, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
                start_new_session=True,
                preexec_fn=_take_terminal,
                close_fds=True,
            )
        finally:
            os.close(secondary)

    @staticmethod
    def _set_size(fd: int, columns: int, lines: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))

    @property
    def lines(self) -> list[str]:
        return list(self.screen.display)

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.lines)

    def pump(self, timeout: float) -> bool:
        """Feed what the command drew within `timeout` s to the screen; False at its end."""
        ready, _, _ = select.select([self.primary], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.primary, 65536)
        except OSError:  # EIO: the command closed the terminal
            return False
        if not data:
            return False
        self.stream.feed(data)
        return True

    def wait_for(self, condition: Callable[[Terminal], bool], timeout: float = 20) -> None:
        """Until `condition(self)` holds of what is on the screen."""
        deadline = time.monotonic() + timeout
        while not condition(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed it; it shows:\n{self.text()}")
            if not self.pump(0.05) and not condition(self):
                raise AssertionError(
                    f"the command ended (status {self.proc.poll()}); last screen:\n{self.text()}"
                )

    def send(self, keys: str) -> None:
        os.write(self.primary, keys.encode())

    def resize(self, columns: int, lines: int) -> None:
        """The window size changed, as a terminal emulator changes it: the kernel sends
        SIGWINCH to the terminal's foreground process group."""
        self._set_size(self.primary, columns, lines)
        self.screen.resize(lines, columns)

    def wait_exit(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump(0.05)
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.primary)

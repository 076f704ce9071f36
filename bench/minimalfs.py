"""The floor of pyfuse3 + trio: a filesystem whose one file returns a constant.

Read side by side with `PID/heapsize`, it shows what the request round trips
cost before restrackfs does any work of its own. Its pyfuse3 loop runs with
restrackfs's options (`restrackfs.daemon.main_options()`: the patched build's
busy polling), so the two differ only by that work. Run as
`python -m bench.minimalfs MOUNTPOINT`; `MinimalFs` mounts it for a benchmark.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import end_process, unmount

FILE = b"value"


def serve(mountpoint: str) -> None:
    import pyfuse3
    import trio

    from restrackfs.daemon import main_options

    class Operations(pyfuse3.Operations):
        async def getattr(self, inode, ctx=None):
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = inode
            attr.entry_timeout = attr.attr_timeout = 300
            attr.st_mode = (stat.S_IFDIR | 0o755) if inode == 1 else (stat.S_IFREG | 0o444)
            attr.st_nlink = 1
            return attr

        async def lookup(self, parent_inode, name, ctx=None):
            if parent_inode != 1 or name != FILE:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.getattr(2)

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

        async def read(self, fh, off, size):
            return b"20971520\n"[off : off + size]

        async def release(self, fh):
            pass

    pyfuse3.init(Operations(), mountpoint, {"fsname=minimal", "noatime"})
    try:
        trio.run(functools.partial(pyfuse3.main, **main_options()))
    finally:
        pyfuse3.close()


class MinimalFs:
    """The floor filesystem mounted in a temp dir, for as long as the block lasts."""

    def __init__(self, work: Path) -> None:
        self.mountpoint = Path(tempfile.mkdtemp(prefix="minimalfs-", dir=work))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def file(self) -> Path:
        return self.mountpoint / FILE.decode()

    def __enter__(self) -> MinimalFs:
        argv = [sys.executable, "-m", "bench.minimalfs", str(self.mountpoint)]
        self.proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        try:
            self._wait_serving()
        except BaseException:  # a start cut short (a signal, a timeout) leaves nothing
            self.__exit__()
            raise
        return self

    def _wait_serving(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 20
        while not self._serving():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the minimal pyfuse3 filesystem did not mount")
            time.sleep(0.02)

    def _serving(self) -> bool:
        with contextlib.suppress(OSError):
            return self.file.read_bytes() != b""
        return False

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)  # the unmount ends its loop
            end_process(self.proc, 5)
        # A stop that came while the daemon was still mounting found nothing to unmount
        # at first: whatever it mounted since (dead, once it is gone) goes now.
        unmount(self.mountpoint)
        with contextlib.suppress(OSError):
            os.rmdir(self.mountpoint)


if __name__ == "__main__":
    serve(sys.argv[1])

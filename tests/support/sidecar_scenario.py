"""Runs inside `unshare --pid --fork --mount-proc`: a pod's PID namespace in small.

Starts the daemon with the options given on the command line, then the
"application" processes, and prints what the mount shows as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from restrackfs.daemon import release
from tests.support.procs import tracked


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def main() -> None:
    mount = Path(tempfile.mkdtemp(prefix="sidecar-"))
    # a directory of root's only: the daemon refuses a state file in /tmp itself
    state_dir = Path(tempfile.mkdtemp(prefix="sidecar-state-"))
    try:
        scenario(mount, state_dir / "state.json", sys.argv[1:])
    finally:  # the namespace's processes die with it; the files in /tmp and the
        # pins in the host's bpffs (the daemon stopped with quotas: kept) do not
        release(state_dir / "state.json")
        with contextlib.suppress(OSError):  # still mounted: the test sees it left
            mount.rmdir()
        shutil.rmtree(state_dir, ignore_errors=True)


def scenario(mount: Path, state: Path, options: list[str]) -> None:
    before = subprocess.Popen(["sleep", "60"])  # started before the daemon
    daemon = subprocess.Popen(
        [sys.executable, "-m", "restrackfs.daemon", "--foreground", "--state", str(state)]
        + options
        + [str(mount)],
        stderr=subprocess.DEVNULL,
    )
    try:
        report(mount, daemon, before)
    finally:
        daemon.terminate()
        daemon.wait(10)
        before.kill()


def report(mount: Path, daemon: subprocess.Popen[bytes], before: subprocess.Popen[bytes]) -> None:
    assert wait_for(lambda: os.path.ismount(mount) and (mount / "metrics").exists())
    assert wait_for(lambda: before.pid in tracked(mount))
    parent = subprocess.Popen(["bash", "-c", "sleep 60 & exec -a appmain sleep 61"])
    assert wait_for(lambda: len(Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
                                .read_text().split()) == 1)  # fmt: skip
    (child,) = map(int, Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split())
    started = time.monotonic()
    wait_for(lambda: parent.pid in tracked(mount) or child in tracked(mount), timeout=3)
    seen_after = time.monotonic() - started
    time.sleep(0.6)  # two more scans: whatever is not tracked by now is left out on purpose
    pids = tracked(mount)
    quotas = {pid: (mount / str(pid) / "quota").read_text().strip() for pid in pids}
    # a process deregistered by hand is not taken back by the next scans
    undone = None
    if before.pid in pids:
        (mount / "deregister").write_text(str(before.pid))
        time.sleep(0.6)
        undone = before.pid not in tracked(mount)
    print(
        json.dumps(
            {
                "me": os.getpid(),
                "daemon": daemon.pid,
                "before": before.pid,
                "parent": parent.pid,
                "child": child,
                "tracked": pids,
                "quotas": {str(k): v for k, v in quotas.items()},
                "seen_after": seen_after,
                "stays_deregistered": undone,
                "mount": str(mount),
                "state": str(mount.with_suffix(".json")),
            }
        )
    )
    parent.kill()


if __name__ == "__main__":
    main()

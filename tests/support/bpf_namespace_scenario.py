"""Runs inside `unshare --pid --fork --mount-proc`: the sidecar of deploy/overlays/sidecar
in small, under the bpf engine.

    bpf_namespace_scenario.py GROW_BINARY MODE STEP COUNT QUOTA

Starts a bpf daemon polling every 2 s, a c/grow.c process in the same PID
namespace, registers it and sets QUOTA, lets it grow, and prints as JSON how the
grower ended, the steps it reported, and the mount's `events`. The grower's pid
here is not its pid on the host: the kernel programs must find it by the
namespace's number.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from restrackfs.daemon import release
from tests.support.sidecar_scenario import wait_for


def main() -> None:
    grow, mode, step, count, quota = sys.argv[1:6]
    mount = Path(tempfile.mkdtemp(prefix="bpfns-"))
    state_dir = Path(tempfile.mkdtemp(prefix="bpfns-state-"))
    state = state_dir / "state.json"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "restrackfs.daemon", "--foreground", "--engine", "bpf"]
        + ["--interval", "2000", "--state", str(state), str(mount)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if not wait_for(lambda: os.path.ismount(mount) and (mount / "engine").exists()):
            raise SystemExit(f"daemon did not mount: {daemon.stderr and daemon.stderr.read()}")
        print(json.dumps(run(mount, [grow, mode, step, count], quota)))
    finally:
        daemon.terminate()
        _, log = daemon.communicate(timeout=20)
        sys.stderr.write(log)
        release(state)  # the pins a stopped daemon keeps
        with contextlib.suppress(OSError):
            mount.rmdir()
        shutil.rmtree(state_dir, ignore_errors=True)


def run(mount: Path, argv: list[str], quota: str) -> dict:
    grower = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert grower.stdin and grower.stdout
    pid = int(grower.stdout.readline().split()[1])
    (mount / "register").write_text(str(pid))
    (mount / str(pid) / "quota").write_text(quota)
    engine = (mount / "engine").read_text().strip()
    grower.stdin.write("go\n")
    grower.stdin.flush()
    lines = grower.stdout.read().splitlines()
    grower.wait(20)
    end = [line.split() for line in lines if line.startswith("end ")]
    events = {}
    if wait_for(lambda: "killed 0" not in (mount / "events").read_text(), timeout=2):
        pass
    for line in (mount / "events").read_text().splitlines():
        key, value = line.split()
        events[key] = int(value)
    return {
        "pid": pid,
        "engine": engine,
        "signal": int(end[0][1]) if end else None,
        "steps": sum(1 for line in lines if line.startswith("step ")),
        "events": events,
    }


if __name__ == "__main__":
    main()

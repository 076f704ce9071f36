"""The bpf engine's kill quota on every way to the resource (SPEC §3.1): a daemon
in a PID namespace, ia32 calls, io_uring work, batches. Each test runs a real
daemon (`--interval 2000`: whatever holds within the call is the kernel's doing)
and a tests/c/grow.c process; where BPF cannot load, they skip with the reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HERE, MiB
from tests.test_bpf import _prerequisites_missing

pytestmark = pytest.mark.skipif(
    _prerequisites_missing() is not None, reason=f"BPF unavailable: {_prerequisites_missing()}"
)


def in_pid_namespace(grow: Path, mode: str, step: int, count: int, quota: str) -> dict:
    """The daemon and the grower in a new PID namespace, as the sidecar runs."""
    argv = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable]
    argv += [str(HERE / "bpf_namespace_scenario.py"), str(grow), mode, str(step), str(count)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    result = subprocess.run([*argv, quota], capture_output=True, text=True, timeout=90, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    ("mode", "step", "quota", "per_call", "limit"),
    [("touch", MiB, "heap=64M action=kill", MiB, 64 * MiB), ("dup", 0, "files=100", 1, 100)],
    ids=["heap", "files"],
)
def test_a_daemon_in_a_pid_namespace_enforces_in_the_crossing_call(
    grow_binary: Path, mode: str, step: int, quota: str, per_call: int, limit: int
) -> None:
    seen = in_pid_namespace(grow_binary, mode, step, 300, quota)
    assert seen["engine"] == "bpf"
    assert seen["signal"] == signal.SIGKILL, seen
    assert seen["steps"] * per_call <= limit, "a call that crossed the quota returned"
    assert seen["events"]["killed"] == 1, seen["events"]

"""Running `restrack run` against a daemon's mount."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from tests.support.daemon import Daemon
from tests.support.users import as_user


def restrack_run(
    daemon: Daemon,
    *program: object,
    uid: int | None = None,
    options: Sequence[str] = (),
    **kw,
):
    """`restrack run [OPTIONS] -- PROGRAM` (as `uid` if given); its stderr is echoed
    for failures."""
    argv = [sys.executable, "-m", "restrackfs.cli", "--mount", str(daemon.mountpoint), "run"]
    argv += [*options, "--", *map(str, program)]
    if uid is not None:
        argv = as_user(uid, argv)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)
    print(result.stderr, file=sys.stderr)  # shown when a test fails
    return result

"""Fixtures shared by the command tests: the runquota program, a daemon of each engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.bpf import needs_bpf
from tests.support.build import compile_c
from tests.support.daemon import Daemon
from tests.support.paths import C_SOURCES


@pytest.fixture(scope="session")
def runquota(bin_dir: Path) -> Path:
    return compile_c(C_SOURCES / "runquota.c", bin_dir / "runquota")


@pytest.fixture(params=["procfs", pytest.param("bpf", marks=needs_bpf)])
def engine_daemon(request: pytest.FixtureRequest) -> Daemon:
    """A procfs daemon of its own, or the module's bpf daemon."""
    return request.getfixturevalue("daemon" if request.param == "procfs" else "bpf_daemon")

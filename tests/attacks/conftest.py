"""The attacks' fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.build import compile_c
from tests.support.paths import C_SOURCES


@pytest.fixture(scope="session")
def abi_ops(bin_dir: Path) -> Path:
    """c/abi_ops.c: the kernel patch's syscalls on one pid, each op's result printed."""
    return compile_c(C_SOURCES / "abi_ops.c", bin_dir / "abi_ops", threads=False)

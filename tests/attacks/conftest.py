"""The attacks' fixtures: the abi_ops program, processes named as a user likes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.build import compile_c
from tests.support.named import Named
from tests.support.paths import C_SOURCES
from tests.support.users import NOBODY


@pytest.fixture(scope="session")
def abi_ops(bin_dir: Path) -> Path:
    """c/abi_ops.c: the kernel patch's syscalls on one pid, each op's result printed."""
    return compile_c(C_SOURCES / "abi_ops.c", bin_dir / "abi_ops", threads=False)


@pytest.fixture
def named() -> Iterator[Callable[..., Named]]:
    started: list[Named] = []

    def start(raw: bytes | None = None, uid: int | None = NOBODY) -> Named:
        process = Named(uid)
        started.append(process)
        if raw is not None:
            process.name(raw)
        return process

    yield start
    for process in started:
        process.stop()

"""Compiling the tests' C programs (c/)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def compile_c(
    source: Path | str, output: Path, *flags: str, optimize: str = "-O1", threads: bool = True
) -> Path:
    """`source` compiled by gcc to `output` (with -pthread unless `threads` is false)."""
    argv = ["gcc", optimize, *(["-pthread"] if threads else []), *flags, "-o", output, source]
    subprocess.run(argv, check=True)
    return output

"""Temp directories every uid can enter, remembered so the session can check they are gone."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SHARED_TEMPDIRS: list[Path] = []


def shared_tempdir(prefix: str) -> Path:
    """A directory every uid can enter (pytest's tmp_path is root-only).

    Whoever makes one removes it; `left_behind` lists those still there."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    _SHARED_TEMPDIRS.append(path)
    return path


def left_behind() -> list[Path]:
    """The shared temp dirs of this run that still exist."""
    return [path for path in _SHARED_TEMPDIRS if os.path.lexists(path)]

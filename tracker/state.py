"""Atomic persistence of the registrations, so a restart loses none of them.

The file is JSON: small, greppable, and written whole on every change
(write a temp file, fsync, rename over, fsync the directory), so a reader or a
crash sees either the old state or the new one, never half of each.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERSION = 1
Record = dict[str, Any]


def save(path: Path, records: list[Record]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = json.dumps({"version": VERSION, "entries": records}, separators=(",", ":"))
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path) -> list[Record]:
    """The saved records; none if there is no file or it cannot be understood."""
    try:
        with open(path, "rb") as file:
            data = json.load(file)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        log.error("state file %s unreadable, starting empty: %s", path, error)
        return []
    if not isinstance(data, dict) or data.get("version") != VERSION:
        log.error("state file %s has an unknown format, starting empty", path)
        return []
    entries = data.get("entries")
    return entries if isinstance(entries, list) else []

"""The version both commands and the metrics report: the installed package's
metadata, which pip writes from pyproject.toml (the one place it is set)."""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@cache
def version() -> str:
    """The package's version; from the checkout's pyproject.toml when it runs
    uninstalled (PYTHONPATH=. from a clone), "unknown" when neither is there."""
    try:
        return metadata.version("restrackfs")
    except metadata.PackageNotFoundError:
        pass
    try:
        with _PYPROJECT.open("rb") as file:
            return str(tomllib.load(file)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"

"""Running code as another uid: setpriv argv, and an interpreter any uid can run.

user_python() copies this checkout to a temp dir once per run; `remove_user_pythons`
(called at the end of the session) deletes those copies.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support.paths import CHECKOUT

NOBODY = 65534
# The interpreters that run this checkout's code as root; another uid gets user_python().
CHECKOUT_PYTHONS = {sys.executable, str(Path(sys.executable).parent / "python")}


def as_user(uid: int, argv: Sequence[object]) -> list[str]:
    """`argv` run with `uid` as real, effective and saved uid and gid, and no groups.

    A checkout's own interpreter is swapped for user_python(): the checkout (and its
    virtualenv) may sit under a directory that uid cannot enter, such as /root.
    """
    argv = [str(word) for word in argv]
    if argv and argv[0] in CHECKOUT_PYTHONS:
        argv[0] = user_python()
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


_user_python_dirs: list[Path] = []

# What code run as another uid imports: the client, the command line, `restrack run`.
USER_MODULES = ("restrackfs.client", "restrackfs.cli", "restrackfs.run")


@functools.cache
def user_python() -> str:
    """An interpreter any uid can run, with a copy of this checkout any uid can read.

    Prepared once per run in a private temp directory of the tests (0755, removed at the
    end of the session): the project's packages and the third-party packages they import
    are copied there, and a two-line wrapper runs a Python that uid can execute with that
    copy first on its path. Fails with the reason when no interpreter qualifies.
    """
    root = Path(tempfile.mkdtemp(prefix="restrack-userpy-"))  # removed at session finish
    _user_python_dirs.append(root)
    site = root / "site"
    for package in ("restrackfs", "tracker"):
        shutil.copytree(CHECKOUT / package, site / package, ignore=_no_bytecode)
    for source in _third_party_imports():
        if source.is_dir():
            shutil.copytree(source, site / source.name, ignore=_no_bytecode)
        else:
            shutil.copy2(source, site / source.name)
    _readable_by_all(root)
    reasons = []
    for interpreter in _interpreter_candidates():
        wrapper = root / "python"
        wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {interpreter} "$@"\n')
        wrapper.chmod(0o755)
        check = subprocess.run(
            as_user(NOBODY, [wrapper, "-c", f"import {', '.join(USER_MODULES)}"]),
            capture_output=True,
            text=True,
            cwd="/",
        )
        if check.returncode == 0:
            return str(wrapper)
        reasons.append(f"{interpreter}: {(check.stderr.strip().splitlines() or ['?'])[-1]}")
    pytest.fail(
        "no Python interpreter that uid 65534 can run imports this checkout's copy "
        f"(install python3 system-wide): {'; '.join(reasons)}"
    )


def _third_party_imports() -> list[Path]:
    """Top-level files and packages outside the standard library that USER_MODULES import."""
    code = (
        f"import sys, {', '.join(USER_MODULES)}\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if f and 'site-packages' in f: print(f)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    tops = set()
    for line in out.stdout.split("\n"):
        if not line:
            continue
        site, _, rest = line.partition("site-packages/")
        top = Path(site + "site-packages") / rest.split("/")[0]
        if not top.name.startswith("__editable__"):
            tops.add(top)
    return sorted(tops)


def _interpreter_candidates() -> list[str]:
    """This run's interpreter first, then the system's one of the same version."""
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = [sys.executable, os.path.realpath(sys.executable), f"/usr/bin/{minor}"]
    return [path for i, path in enumerate(found) if os.path.exists(path) and path not in found[:i]]


def _no_bytecode(directory: str, names: list[str]) -> list[str]:
    return [name for name in names if name == "__pycache__"]


def _readable_by_all(root: Path) -> None:
    for directory, _subdirs, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            path = os.path.join(directory, name)
            os.chmod(path, os.stat(path).st_mode | 0o444)


def remove_user_pythons() -> None:
    """Delete the copies user_python() made."""
    for root in _user_python_dirs:
        shutil.rmtree(root, ignore_errors=True)


def sh(command: str, uid: int | None = None) -> subprocess.CompletedProcess[str]:
    """`command` run by bash, as `uid` if given; its output captured as text."""
    argv = ["bash", "-c", command]
    if uid is not None:
        argv = as_user(uid, argv)
    return subprocess.run(argv, capture_output=True, text=True)


def run_as(uid: int, *argv: object, **kw) -> subprocess.CompletedProcess[str]:
    """`argv` run as `uid` from /, its output captured as text (60 s at most)."""
    return subprocess.run(
        as_user(uid, argv), capture_output=True, text=True, cwd="/", timeout=60, **kw
    )

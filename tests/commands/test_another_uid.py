"""The tests that act as another uid run this checkout's code, wherever it was cloned.

A checkout under /root (0700) is out of reach of uid 65534, and so is its virtualenv:
those tests run user_python() instead, a copy made readable for the run. This guard
fails first, with the reason, if that copy cannot be made to work.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.paths import CHECKOUT
from tests.support.users import NOBODY, USER_MODULES, as_user, user_python


def test_another_uid_imports_this_checkouts_code_from_a_readable_copy():
    code = (
        f"import {', '.join(USER_MODULES)}, restrackfs.client as c, tracker.quota as q\n"
        "print(c.__file__); print(q.__file__)"
    )
    result = subprocess.run(
        as_user(NOBODY, [user_python(), "-c", code]), capture_output=True, text=True, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    for line, module in zip(
        result.stdout.split("\n"), ("restrackfs/client.py", "tracker/quota.py"), strict=False
    ):
        copy = Path(line)
        assert not copy.is_relative_to(CHECKOUT), f"{copy} is the checkout, not the copy"
        assert copy.read_bytes() == (CHECKOUT / module).read_bytes()


def test_the_swap_applies_only_to_this_checkouts_interpreters():
    assert as_user(NOBODY, [sys.executable, "-V"])[4] == user_python()
    assert as_user(NOBODY, ["/usr/bin/python3", "-V"])[4:] == ["/usr/bin/python3", "-V"]

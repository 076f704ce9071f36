"""`scripts/setup --link`: `restrack` and `restrackfs` on PATH, and a clear refusal for a
user who cannot reach the installation (a clone under /root, a pyenv under /root)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.support.paths import CHECKOUT
from tests.support.tempdirs import shared_tempdir
from tests.support.users import NOBODY, as_user, user_python


def link_from(home: Path) -> Path:
    """Run `home`'s scripts/link into a fresh directory everyone can read; return it."""
    bin_dir = shared_tempdir("restrack-linked-")
    subprocess.run([home / "scripts" / "link", bin_dir], check=True, capture_output=True)
    return bin_dir


def readable_install(root: Path) -> Path:
    """An installation every uid can use: this checkout's code and a Python they can run."""
    home = root / "install"
    (home / ".venv" / "bin").mkdir(parents=True)
    (home / "scripts").mkdir()
    shutil.copy2(CHECKOUT / "scripts" / "link", home / "scripts" / "link")
    os.symlink(user_python(), home / ".venv" / "bin" / "python")
    os.symlink(Path(user_python()).parent / "site" / "restrackfs", home / "restrackfs")
    return home


def test_the_wrappers_run_the_installation():
    root = shared_tempdir("restrack-home-")
    bin_dir = link_from(readable_install(root))
    try:
        result = subprocess.run(
            as_user(NOBODY, [bin_dir / "restrack", "--help"]), capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: restrack")
        own = link_from(CHECKOUT)  # the daemon is root's: its wrapper runs this checkout
        result = subprocess.run([own / "restrackfs", "--help"], capture_output=True, text=True)
        assert result.stdout.startswith("usage: restrackfs"), result.stderr
        shutil.rmtree(own)
    finally:
        shutil.rmtree(root)
        shutil.rmtree(bin_dir)


def test_a_user_who_cannot_reach_the_installation_gets_one_sentence(tmp_path):
    closed = tmp_path / "closed"  # pytest's tmp_path is 0700, as /root is
    closed.mkdir()
    home = readable_install(closed)
    os.chmod(tmp_path, 0o700)
    bin_dir = link_from(home)
    try:
        for command in ("restrack", "restrackfs"):
            for args in (["status"], ["run", "--", "true"], ["--help"]):
                result = subprocess.run(
                    as_user(NOBODY, [bin_dir / command, *args]), capture_output=True, text=True
                )
                assert result.returncode == 126
                assert result.stdout == ""
                assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
                assert result.stderr.startswith(f"{command}: cannot run restrackfs from {home}:")
                assert f"uid {NOBODY} cannot reach it" in result.stderr
    finally:
        shutil.rmtree(bin_dir)


# a command line that runs scripts/setup (in a shell block, or a comment of the unit)
SETUP_COMMAND = re.compile(r"(?:^|&&|#)\s*(?:[A-Z_]+=\S+\s+)*scripts/setup\b")


def test_the_systemd_steps_install_from_the_system_python():
    """The README's systemd steps and the unit's comment ran plain `scripts/setup`: with a
    Python under /root, the node's users could not run `restrack`."""
    wanted = "RESTRACK_PYTHON=/usr/bin/python3 scripts/setup --link"
    unit = (CHECKOUT / "scripts" / "restrackfs.service").read_text()
    readme = (CHECKOUT / "docs" / "deploy.md").read_text()
    fleet = readme.split("\n## Fleet\n", 1)[1].split("\n## ", 1)[0]
    for name, text in (("the unit", unit), ("the README's Fleet", fleet)):
        setups = [line for line in text.splitlines() if SETUP_COMMAND.search(line)]
        assert setups and all(wanted in line for line in setups), (name, setups)

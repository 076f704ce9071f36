"""Installing the commands: `scripts/setup --link` (`restrack` and `restrackfs` on PATH, and
a clear refusal for a user who cannot reach the installation: a clone under /root, a pyenv
under /root), and `pip install .` of a clone into a venv of its own."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.bpf import needs_bpf, pin_dir, scrub
from tests.support.daemon import Daemon, release, unmount
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
    """deploy.md's systemd steps and the unit's comment ran plain `scripts/setup`: with a
    Python under /root, the node's users could not run `restrack`."""
    wanted = "RESTRACK_PYTHON=/usr/bin/python3 scripts/setup --link"
    unit = (CHECKOUT / "scripts" / "restrackfs.service").read_text()
    readme = (CHECKOUT / "docs" / "deploy.md").read_text()
    host = readme.split("\n## On a host\n", 1)[1].split("\n## ", 1)[0]
    for name, text in (("the unit", unit), ("deploy.md's On a host", host)):
        setups = [line for line in text.splitlines() if SETUP_COMMAND.search(line)]
        assert setups and all(wanted in line for line in setups), (name, setups)


def copy_of_the_clone(destination: Path) -> Path:
    """The files a clone of this checkout has (its uncommitted edits too), and nothing built
    here: no .venv, no compiled `_counters`, no egg-info for pip to pick up by mistake."""
    listed = subprocess.run(
        ["git", "-C", CHECKOUT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = CHECKOUT / name
        if source.is_file():  # listed but deleted in the work tree: a clone would lack it too
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def installed_environment() -> dict[str, str]:
    """No PYTHONPATH or venv of the suite's: the installed commands must stand alone."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    return {key: value for key, value in os.environ.items() if key not in drop}


@needs_bpf
def test_pip_install_of_a_clone_gives_working_commands_and_the_bpf_engine(tmp_path):
    """Not editable, into a fresh venv: the commands, the BPF objects and their headers,
    the compiled `_counters` extension and restrack.h all come from the installed package.
    About 30 s on the 2-vCPU VM with pip's wheel cache empty (building pyfuse3 from its
    sdist is most of it), 10 s with it warm."""
    clone = copy_of_the_clone(tmp_path / "clone")
    venv = tmp_path / "venv"
    env = installed_environment()
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, env=env)
    install = subprocess.run(
        [venv / "bin" / "pip", "install", "-q", clone],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    shutil.rmtree(clone)  # whatever runs now cannot come from the clone

    site = subprocess.run(
        [venv / "bin" / "python", "-c", PACKAGE_FILES],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout.split()
    assert site and all(path.startswith(f"{venv}/lib/") for path in site), site
    for command in ("restrackfs", "restrack"):
        result = subprocess.run(
            [venv / "bin" / command, "--help"], capture_output=True, text=True, env=env
        )
        assert result.returncode == 0 and result.stdout.startswith(f"usage: {command}")
    cflags = subprocess.run(
        [venv / "bin" / "restrack", "cflags"], capture_output=True, text=True, env=env
    ).stdout.split()
    include = Path(cflags[0].removeprefix("-I"))
    assert include.is_relative_to(venv) and (include / "restrack.h").is_file(), cflags

    mountpoint = shared_tempdir("restrack-mnt-")
    daemon = Daemon(
        mountpoint,
        tmp_path / "state.json",
        tmp_path / "daemon.log",
        "--engine",
        "bpf",
        command=[str(venv / "bin" / "restrackfs")],
        env=env,
    )
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        daemon.start()
        assert daemon.read("engine") == "bpf\n", daemon.log_text()
        assert "heapsize read through /proc" not in daemon.log_text()  # _counters loaded
        daemon.register(sleeper.pid)
        status = subprocess.run(
            [venv / "bin" / "restrack", "--mount", mountpoint, "status"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert status.returncode == 0, status.stderr
        rows = [line.split() for line in status.stdout.splitlines()]
        assert any(row[:2] == [str(sleeper.pid), "sleep"] for row in rows), status.stdout
        assert status.stdout.rstrip().endswith("engine: bpf"), status.stdout
    finally:
        sleeper.kill()
        sleeper.wait()
        if daemon.proc is not None:
            daemon.stop()
        release(daemon.state)
        scrub(pin_dir(daemon))
        unmount(mountpoint)
        shutil.rmtree(mountpoint, ignore_errors=True)


# Where each part of the package was imported from, and that the BPF objects and the
# headers the objects' users read lie beside them.
PACKAGE_FILES = """
import importlib.resources as r, restrackfs, tracker.backends.bpf._counters as c
bpf = r.files("tracker.backends.bpf")
for name in ("restrack.bpf.o", "counters.bpf.o", "restrack_shared.h", "counters_shared.h"):
    assert bpf.joinpath(name).is_file(), name
print(restrackfs.__file__, c.__file__, bpf)
"""

"""The podman fixtures of the container tests: a private store, the image built here."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.podman import (
    BASE,
    ENABLED,
    IMAGE,
    REPO,
    SETUP,
    Podman,
    mounts_under,
    unmount_under,
)


@pytest.fixture(scope="session")
def podman() -> Iterator[Podman]:
    if not ENABLED:
        pytest.skip("run with scripts/test --container")
    workdir = Path(tempfile.mkdtemp(prefix="restrack-podman-"))
    workdir.chmod(0o755)
    tool = Podman(workdir)
    try:
        yield tool
    finally:
        tool.remove_everything()
        unmount_under(workdir)
        leftover = mounts_under(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        assert not leftover and not workdir.exists(), f"left behind: {leftover or workdir}"


@pytest.fixture(scope="session")
def image(podman: Podman) -> str:
    """deploy/Dockerfile built on the debootstrapped base, offline, from wheels made here."""
    setup = subprocess.run([str(SETUP)], capture_output=True, text=True, timeout=1200, check=False)
    assert setup.returncode == 0, setup.stderr
    tarball = setup.stdout.strip().splitlines()[-1]
    podman("import", tarball, BASE)
    wheels = podman.workdir / "wheels"
    # the versions the Dockerfile pins: the image's pip refuses any other from these wheels
    constrained = {**os.environ, "PIP_CONSTRAINT": str(REPO / "deploy/constraints.txt")}
    pip_wheel = [str(REPO / ".venv/bin/pip"), "wheel", "-q", "-w", str(wheels), str(REPO)]
    built = subprocess.run(
        [*pip_wheel, "setuptools"], capture_output=True, text=True, env=constrained, timeout=600
    )
    assert built.returncode == 0, built.stderr
    podman(
        "build", "-q", "-f", str(REPO / "deploy/Dockerfile"), "-t", IMAGE, "--network", "none",
        "-v", f"{wheels}:/wheels:ro", "--build-arg", f"BASE={BASE}",
        "--build-arg", "PIP_OPTIONS=--no-index --find-links /wheels", str(REPO),
    )  # fmt: skip
    return IMAGE

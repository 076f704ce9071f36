"""deploy/Dockerfile's pins: written in full, and what the built image holds.

The image is built by the `image` fixture (conftest.py) from this clone, offline, on a
debootstrapped bookworm base with the pinned Debian packages installed: a pin that no
longer matches the bookworm release would send the build to apt, which fails without
network, and a Python pin the wheels do not meet fails pip.
"""

from __future__ import annotations

import re

from tests.support.podman import REPO, Podman, needs_container_flag

DOCKERFILE = (REPO / "deploy" / "Dockerfile").read_text()
CONSTRAINTS = REPO / "deploy" / "constraints.txt"


def argument(name: str) -> str:
    found = re.search(rf'^ARG {name}="?([^"\n]*)"?$', DOCKERFILE, re.MULTILINE)
    assert found, f"no ARG {name} in deploy/Dockerfile"
    return found.group(1)


def debian_pins(name: str) -> dict[str, str]:
    return dict(pinned.split("=", 1) for pinned in argument(name).split())


def python_pins() -> dict[str, str]:
    lines = (line.split("#")[0].strip() for line in CONSTRAINTS.read_text().splitlines())
    return {name.lower(): version for name, version in (pin.split("==") for pin in lines if pin)}


def test_the_base_is_pinned_by_tag_and_digest():
    assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", argument("BASE"))


def test_every_package_is_pinned():
    for name in ("RUN_PACKAGES", "BUILD_PACKAGES"):
        for package, version in debian_pins(name).items():
            assert re.fullmatch(r"[0-9][\w.+:~-]*", version), (package, version)
    assert {"trio", "h11", "pyfuse3", "setuptools", "cython"} <= python_pins().keys()
    assert "PIP_CONSTRAINT=/opt/restrackfs/constraints.txt" in DOCKERFILE


@needs_container_flag
def test_the_image_holds_the_pinned_versions(podman: Podman, image: str):
    def run(*command: str, check: bool = True) -> str:
        argv = ("run", "--rm", "--entrypoint", command[0], image, *command[1:])
        return podman(*argv, check=check).stdout

    kept = debian_pins("RUN_PACKAGES")
    listed = run("dpkg-query", "-W", "-f", "${Package}=${Version}\\n", *kept)
    assert dict(line.split("=", 1) for line in listed.split()) == kept
    for package in debian_pins("BUILD_PACKAGES"):  # purged: dpkg-query fails, or not installed
        status = run("dpkg-query", "-W", "-f", "${db:Status-Status}", package, check=False)
        assert status != "installed", package
    frozen = run("/opt/restrackfs/venv/bin/pip", "freeze", "--exclude", "restrackfs")
    installed = {line.split("==")[0].lower(): line.split("==")[1] for line in frozen.split()}
    pins = python_pins()
    assert installed and all(pins.get(name) == version for name, version in installed.items())
    assert {"trio", "h11", "pyfuse3"} <= installed.keys(), installed

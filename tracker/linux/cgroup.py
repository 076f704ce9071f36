"""Which container and pod a process runs in, from the paths in /proc/PID/cgroup.

Container runtimes name a container's cgroup after its id, and the kubelet names a
pod's cgroup after the pod's UID, so the path alone answers "which workload is
this pid" with no runtime socket to ask. The forms recognised:

- containerd: ``cri-containerd-<id>.scope`` (systemd driver) or ``.../pod<uid>/<id>``
- CRI-O: ``crio-<id>.scope`` (``crio-conmon-<id>.scope`` is the monitor, not the container)
- Docker: ``docker-<id>.scope`` or ``/docker/<id>``
- podman: ``libpod-<id>.scope`` (possibly with a ``/container`` child), ``/libpod-<id>``
- a pod: ``pod<uid>`` (cgroupfs driver) or ``kubepods-<qos>-pod<uid>.slice`` (systemd
  driver, which writes the UID's dashes as underscores)

Parsing is kept apart from reading, so recorded paths of runtimes not runnable
here can be checked as text.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from tracker.linux.procfs import read_cgroup

_CONTAINER_ID = r"([0-9a-f]{64})"
_CONTAINER_FORMS = (
    re.compile(rf"(?:^|/)(?:cri-containerd|crio|docker|libpod)-{_CONTAINER_ID}\.scope(?:/|$)"),
    re.compile(rf"(?:^|/)(?:docker|libpod_parent/libpod-?|libpod)[/-]?{_CONTAINER_ID}(?:/|$)"),
    re.compile(
        rf"/pod[0-9a-f_-]{{36}}(?:\.slice)?/(?:[a-z-]+-)?{_CONTAINER_ID}(?:\.scope)?(?:/|$)"
    ),
)
_POD_UID = re.compile(
    r"(?:^|/)(?:kubepods(?:-[a-z]+)*-)?pod"
    r"([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?(?:/|$)"
)


class Workload(NamedTuple):
    """A container id and a pod UID, each `None` where the cgroup path names none."""

    container: str | None
    pod: str | None


NO_WORKLOAD = Workload(None, None)


def parse_cgroup_paths(raw: bytes) -> list[str]:
    """The cgroup paths of a /proc/PID/cgroup file (v2's ``0::path`` and v1's lines)."""
    paths = []
    for line in raw.decode(errors="replace").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[2] not in ("", "/"):
            paths.append(parts[2])
    return paths


def container_in(path: str) -> str | None:
    if "crio-conmon-" in path:
        return None
    for form in _CONTAINER_FORMS:
        found = form.search(path)
        if found:
            return found.group(1)
    return None


def pod_in(path: str) -> str | None:
    found = _POD_UID.search(path)
    return found.group(1).replace("_", "-") if found else None


def workload_in(raw: bytes) -> Workload:
    """The first container id and pod UID named by any of the file's paths."""
    container = pod = None
    for path in parse_cgroup_paths(raw):
        container = container or container_in(path)
        pod = pod or pod_in(path)
    return Workload(container, pod)


def read_workload(pid: int) -> Workload:
    """`Workload` of a live process; raises `NoSuchProcess`/`AccessDenied` as procfs does."""
    return workload_in(read_cgroup(pid))

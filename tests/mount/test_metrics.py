"""The `metrics` exposition for platform teams, parsed by prometheus_client.

Absolute usage is checked against /proc for real child processes; the `container`
and `pod` labels against real cgroups made here in the v1 `pids` hierarchy under
the paths containerd, CRI-O and Docker write (a process moved into one has that
path in /proc/PID/cgroup, as in a node's pod); the daemon's own series against
what the daemon was made to do.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import Daemon
from tests.support.paths import CHECKOUT
from tests.support.procs import errno_of, open_fds, proc_vm_data

MiB = 1 << 20
CID = "c0ffee" * 10 + "beef"  # 64 hex digits, as runtimes name containers
POD = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
PIDS_HIERARCHY = Path("/sys/fs/cgroup/pids")


def families(text: str) -> dict[str, object]:
    """The exposition's families by name, as Prometheus's own client parses them."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_of(text: str, name: str, **labels: str) -> tuple[float, dict[str, str]]:
    """The value and labels of the one sample `name` whose labels include `labels`."""
    found = [
        (s.value, s.labels)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def value(text: str, name: str, **labels: str) -> float:
    return sample_of(text, name, **labels)[0]


# ----- absolute usage, against /proc ------------------------------------------------


def test_absolute_usage_is_procs_own_count_beside_the_growth(daemon, spawn):
    """Usage that came before registration shows in the totals only."""
    w = spawn()
    w.do("mmap", 3 * MiB)
    w.do("open", 5)
    daemon.register(w.pid)
    w.do("mmap", 2 * MiB)
    w.do("open", 2)
    text = daemon.read("metrics")  # the workload waits on its stdin: nothing moves
    pid = str(w.pid)
    assert value(text, "restrack_heap_total_bytes", pid=pid) == proc_vm_data(w.pid)
    assert value(text, "restrack_open_files_total", pid=pid) == open_fds(w.pid)
    assert value(text, "restrack_heap_bytes", pid=pid) == 2 * MiB
    assert value(text, "restrack_open_files", pid=pid) == 2
    assert value(text, "restrack_heap_total_bytes", pid=pid) >= 5 * MiB


def test_totals_follow_each_process(daemon, spawn):
    workers = [spawn() for _ in range(3)]
    for n, w in enumerate(workers):
        w.do("mmap", (n + 1) * MiB)
        w.do("open", n * 3)
        daemon.register(w.pid)
    text = daemon.read("metrics")
    for w in workers:
        assert value(text, "restrack_heap_total_bytes", pid=str(w.pid)) == proc_vm_data(w.pid)
        assert value(text, "restrack_open_files_total", pid=str(w.pid)) == open_fds(w.pid)


# ----- every family: HELP, TYPE, names ------------------------------------------------


def test_every_family_has_help_and_type_and_a_conventional_name(daemon, spawn):
    daemon.register(spawn().pid)
    text = daemon.read("metrics")
    declared: dict[str, str] = {}
    helped = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            declared[name] = kind
        elif line.startswith("# HELP "):
            helped.add(line.split(" ", 3)[2])
    sampled = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert sampled <= declared.keys() == helped
    for name, kind in declared.items():
        assert name.startswith("restrack_"), name
        if kind == "counter":
            assert name.endswith("_total"), name
        elif name.endswith("_total"):
            # the one gauge whose name the interface fixes with _total: descriptors now
            assert name == "restrack_open_files_total", name
    for name in ("restrack_heap_total_bytes", "restrack_open_files_total"):
        assert declared[name] == "gauge"
    assert declared["restrack_exposition_render_seconds"] == "gauge"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_finds_nothing_but_the_fixed_total_gauge(daemon, spawn):
    daemon.register(spawn().pid)
    checked = subprocess.run(
        ["promtool", "check", "metrics"],
        input=daemon.read("metrics"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    findings = [line for line in (checked.stdout + checked.stderr).splitlines() if line.strip()]
    assert all("restrack_open_files_total" in line for line in findings), findings


# ----- the daemon's own series --------------------------------------------------------


def test_build_info_carries_the_packages_version(daemon):
    text = daemon.read("metrics")
    pyproject = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]["version"]
    assert metadata.version("restrackfs") == pyproject
    assert value(text, "restrack_build_info", version=pyproject) == 1
    assert value(text, "restrack_up") == 1
    assert value(text, "restrack_engine_info", engine="procfs") == 1


def test_no_kernel_events_to_drop_under_procfs_is_a_zero(daemon):
    assert value(daemon.read("metrics"), "restrack_kernel_events_dropped_total") == 0


def test_quota_writes_answered_with_an_errno_are_counted(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    daemon.write("heap=8M files=10 action=notify", w.pid, "quota")  # accepted: not counted
    refused = [
        ("heap=lots", errno.EINVAL),  # malformed
        ("heap=1M " + "x" * 5000, errno.EINVAL),  # longer than a write may be
        ("heap=16M", errno.EBUSY),  # a quota is set already
    ]
    for text, expected in refused:
        assert errno_of(lambda text=text: daemon.write(text, w.pid, "quota")) == expected
    assert value(daemon.read("metrics"), "restrack_quota_writes_refused_total") == len(refused)


def test_render_time_is_measured_at_each_exposition(daemon, spawn):
    for _ in range(20):
        daemon.register(spawn().pid)
    seen = {value(daemon.read("metrics"), "restrack_exposition_render_seconds") for _ in range(5)}
    assert all(0 < seconds < 1.0 for seconds in seen), seen
    assert len(seen) > 1, "the same time at every read: not measured"


# ----- container and pod labels, from real cgroups ------------------------------------


class Cgroups:
    """Leaf cgroups made in the v1 pids hierarchy, each process moved into one
    given back to the root cgroup and the directories removed at the end."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    def move(self, pid: int, path: str) -> None:
        leaf = PIDS_HIERARCHY / path.strip("/")
        for parent in [*reversed(leaf.relative_to(PIDS_HIERARCHY).parents), Path(".")][1:]:
            directory = PIDS_HIERARCHY / parent
            if not directory.exists():
                directory.mkdir()
                self.made.append(directory)
        if not leaf.exists():
            leaf.mkdir()
            self.made.append(leaf)
        (leaf / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for directory in reversed(self.made):
            for pid in (directory / "cgroup.procs").read_text().split():
                (PIDS_HIERARCHY / "cgroup.procs").write_text(pid)
            directory.rmdir()


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    if not (PIDS_HIERARCHY / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids hierarchy to make a container's path in")
    made = Cgroups()
    try:
        yield made
    finally:
        made.remove()


SYSTEMD_POD = POD.replace("-", "_")
RUNTIME_PATHS = {
    "containerd, systemd driver": (
        "kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{SYSTEMD_POD}.slice/cri-containerd-{CID}.scope",
        CID,
        POD,
    ),
    "containerd, cgroupfs driver": (f"kubepods/besteffort/pod{POD}/{CID}", CID, POD),
    "CRI-O": (f"kubepods.slice/kubepods-pod{SYSTEMD_POD}.slice/crio-{CID}.scope", CID, POD),
    "Docker": (f"system.slice/docker-{CID}.scope", CID, None),
    "podman": (f"machine.slice/libpod-{CID}.scope/container", CID, None),
    "a pod's pause-less conmon": (
        f"kubepods.slice/kubepods-pod{SYSTEMD_POD}.slice/crio-conmon-{CID}.scope",
        None,
        POD,
    ),
}


@pytest.mark.parametrize("runtime", RUNTIME_PATHS)
def test_container_and_pod_labels_on_every_series_of_the_process(
    daemon: Daemon, spawn: Callable, cgroups: Cgroups, runtime: str
):
    path, container, pod = RUNTIME_PATHS[runtime]
    inside, outside = spawn(), spawn()
    cgroups.move(inside.pid, path)
    daemon.register(inside.pid)
    daemon.register(outside.pid)
    daemon.write("heap=64M files=100 action=notify", inside.pid, "quota")
    text = daemon.read("metrics")
    want = {k: v for k, v in (("container", container), ("pod", pod)) if v is not None}
    per_process = [
        s
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("pid") == str(inside.pid)
    ]
    assert {s.name for s in per_process} >= {
        "restrack_heap_bytes",
        "restrack_heap_total_bytes",
        "restrack_open_files_total",
        "restrack_heap_quota_bytes",
    }
    for s in per_process:
        assert {k: s.labels[k] for k in ("container", "pod") if k in s.labels} == want, s
    for s in (
        s
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("pid") == str(outside.pid)
    ):
        assert "container" not in s.labels and "pod" not in s.labels, s


def test_labels_are_read_once_at_registration(daemon, spawn, cgroups):
    """A process moved to a container's cgroup after registration keeps the labels
    it had: /proc/PID/cgroup is read when the entry is made, not at each scrape."""
    early, late = spawn(), spawn()
    cgroups.move(early.pid, f"system.slice/docker-{CID}.scope")
    daemon.register(early.pid)
    daemon.register(late.pid)
    cgroups.move(late.pid, f"system.slice/docker-{CID}.scope")
    text = daemon.read("metrics")
    assert sample_of(text, "restrack_heap_bytes", pid=str(early.pid))[1]["container"] == CID
    assert "container" not in sample_of(text, "restrack_heap_bytes", pid=str(late.pid))[1]


def test_labels_survive_a_restart_of_the_daemon(daemon_factory, spawn, cgroups):
    daemon = daemon_factory()
    w = spawn()
    cgroups.move(w.pid, f"kubepods/burstable/pod{POD}/{CID}")
    daemon.register(w.pid)
    daemon.stop()
    daemon.start()
    labels = sample_of(daemon.read("metrics"), "restrack_heap_bytes", pid=str(w.pid))[1]
    assert (labels.get("container"), labels.get("pod")) == (CID, POD)

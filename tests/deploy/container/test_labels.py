"""The `container` label on a real container: podman runs one (runc, the cgroup path
`libpod-<id>` it writes), a daemon on the host registers its process, and the
label is the id `podman inspect` gives. The other runtimes' path forms are
made as real cgroups in tests/mount/test_metrics.py."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.podman import BASE, SETUP, Podman, needs_container_flag

pytestmark = needs_container_flag


@pytest.fixture(scope="session")
def base_image(podman: Podman) -> str:
    """The debootstrapped base alone (the restrackfs image is not needed here)."""
    setup = subprocess.run([str(SETUP)], capture_output=True, text=True, timeout=1200, check=False)
    assert setup.returncode == 0, setup.stderr
    if podman("image", "exists", BASE, check=False).returncode != 0:
        podman("import", setup.stdout.strip().splitlines()[-1], BASE)
    return BASE


def test_a_containers_process_carries_its_container_id(podman, base_image, daemon, spawn):
    name = f"restrack-labels-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", name, "--network", "none", base_image, "sleep", "600")
    try:
        cid, pid = podman("inspect", "--format", "{{.Id}} {{.State.Pid}}", name).stdout.split()
        host = spawn()
        daemon.register(int(pid))
        daemon.register(host.pid)
        text = daemon.read("metrics")
    finally:
        podman("rm", "--force", "--time", "0", name)
    labels = {
        s.labels["pid"]: s.labels
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "restrack_heap_total_bytes"
    }
    assert labels[pid]["container"] == cid
    assert labels[pid]["comm"] == "sleep"
    assert "pod" not in labels[pid]  # podman alone names no Kubernetes pod
    assert "container" not in labels[str(host.pid)]

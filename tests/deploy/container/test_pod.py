"""deploy/'s overlays, rendered (`kubectl kustomize`), run by a real container runtime
(podman): the sidecar overlay's pod and the node-agent overlay's DaemonSet pod.

`podman kube play` runs the manifests with these changes, each because podman
or this machine differs from a Kubernetes node (docs/testing.md lists them):

- the Deployment's pod template runs as a Pod (what a ReplicaSet would make of it);
- emptyDir -> hostPath on a shared bind mount this test makes: podman backs an
  emptyDir with a named volume, which it always mounts private, so the FUSE
  mount would not propagate (Kubernetes's Bidirectional does propagate it);
- hostNetwork, the endpoint on 127.0.0.1:PORT, no `ports`: podman refuses
  `ports` with host networking, and nothing here may reach a pod network's
  private addresses (Kubernetes: the pod IP, scraped through the PodMonitor);
- local images (the pinned digest names an image no registry here serves); the app
  container is the restrackfs image running `sleep`;
- the DaemonSet: podman has no DaemonSet, so its pod template runs as a Pod,
  with its host paths under the test's temp dir (but /dev/fuse and the node's
  bpffs, /sys/fs/bpf, which are the node's), `$(NODE_IP)` (a fieldRef podman does
  not fill) -> 127.0.0.1, and no hostPort, livenessProbe or resources.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from restrackfs.daemon import default_state_path, fuse_mounted
from tests.support.bpf import needs_bpf, scrub
from tests.support.kustomize import OVERLAYS, needs_kustomize, render, workload
from tests.support.podman import (
    Podman,
    free_port,
    needs_container_flag,
    shared_mount,
)
from tests.support.waiting import wait_until
from tracker.backends.bpf import backend as bpf_backend
from tracker.quota import parse_quota

pytestmark = [needs_container_flag, needs_kustomize]


def scrape(port: int) -> dict[str, list]:
    """GET /metrics from the host, parsed: metric name -> samples."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = response.read().decode()
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def answers(port: int) -> bool:
    try:
        return "restrack_tracked_processes" in scrape(port)
    except OSError:
        return False


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def set_option(args: list[str], name: str, value: str) -> None:
    args[args.index(name) + 1] = value


@dataclass
class Pod:
    podman: Podman
    name: str
    manifest: Path
    port: int
    default_quota: str  # as `quota` reads it back

    def exec(self, container: str, command: str, check: bool = True) -> str:
        result = self.podman(
            "exec", f"{self.name}-{container}", "sh", "-c", command, check=check, timeout=60
        )
        return result.stdout

    def pids(self, container: str, comm: str) -> list[int]:
        rows = [line.split() for line in self.exec(container, "ps -eo pid=,comm=").splitlines()]
        return [int(pid) for pid, name in rows if name == comm]

    def logs(self, container: str) -> str:
        return self.logs_of_container(f"{self.name}-{container}")

    def logs_of_container(self, name: str | None = None) -> str:
        result = self.podman("logs", name or self.name, check=False)
        return result.stdout + result.stderr


def play(podman: Podman, pod: dict, workdir: Path, port: int, default_quota: str) -> Pod:
    manifest = workdir / f"{pod['metadata']['name']}.yaml"
    manifest.write_text(yaml.safe_dump(pod))
    podman("kube", "play", str(manifest), timeout=300)
    played = Pod(podman, pod["metadata"]["name"], manifest, port, default_quota)
    try:
        wait_until(lambda: answers(port), 60, "the endpoint to answer from the host")
    except BaseException:
        print(played.logs("restrackfs"))
        stop(played)
        raise
    return played


def stop(pod: Pod) -> None:
    pod.podman("kube", "down", str(pod.manifest), check=False, timeout=120)


def read_quota(default_quota: str) -> str:
    return parse_quota(default_quota).format()


@pytest.fixture(scope="module")
def sidecar(podman: Podman, image: str) -> Iterator[Pod]:
    """The sidecar overlay's pod, with the changes the module docstring lists."""
    deployment = workload(render(OVERLAYS["sidecar"]))
    template = deployment["spec"]["template"]
    spec = template["spec"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": deployment["metadata"]["name"], **template["metadata"]},
        "spec": spec,
    }
    spec["hostNetwork"] = True
    side, app = spec["containers"]
    side["image"] = app["image"] = image
    side.pop("ports")
    port = free_port()
    set_option(side["args"], "--metrics-listen", f"127.0.0.1:{port}")
    app["command"] = ["sleep", "infinity"]
    shared = shared_mount(podman.workdir / "pod-restrack")
    for volume in spec["volumes"]:
        if volume["name"] == "restrack":
            del volume["emptyDir"]
            volume["hostPath"] = {"path": str(shared), "type": "Directory"}
    played = play(podman, pod, podman.workdir, port, option(side["args"], "--default-quota"))
    yield played
    stop(played)


def test_the_sidecar_tracks_the_app_containers_processes_with_the_default_quota(sidecar):
    (app_pid,) = sidecar.pids("app", "sleep")
    (daemon_pid,) = sidecar.pids("app", "restrackfs")  # one PID namespace: the pod's
    expected = read_quota(sidecar.default_quota)
    wait_until(
        lambda: (
            sidecar.exec("app", f"cat /restrack/{app_pid}/quota", check=False).strip() == expected
        ),
        5,
        "the app's process to be tracked with the default quota",
    )
    listing = sidecar.exec("app", "ls /restrack").split()
    assert str(daemon_pid) not in listing
    # a process started later in the app container is picked up within a second
    started = sidecar.podman.popen("exec", "-i", f"{sidecar.name}-app", "cat")
    try:
        (late_pid,) = wait_until(lambda: sidecar.pids("app", "cat"), 10, "cat to start")
        wait_until(
            lambda: (
                sidecar.exec("app", f"cat /restrack/{late_pid}/quota", check=False).strip()
                == expected
            ),
            5,
            "a new process to be tracked",
        )
    finally:
        started.kill()
        started.wait()


def test_the_app_reads_the_shared_mount_and_restrack_status_works_there(sidecar):
    (app_pid,) = sidecar.pids("app", "sleep")
    wait_until(lambda: str(app_pid) in sidecar.exec("app", "ls /restrack").split(), 5, "tracked")
    status = sidecar.exec("app", "restrack status")  # RESTRACK_MOUNT=/restrack, from the pod
    row = next(
        line.split() for line in status.splitlines() if line.split()[:2] == [str(app_pid), "sleep"]
    )
    assert row[-1] == "notify", status
    metrics = sidecar.exec("app", "cat /restrack/metrics")
    pids = {
        s.labels["pid"]
        for f in text_string_to_metric_families(metrics)
        for s in f.samples
        if s.name == "restrack_heap_bytes"
    }
    assert str(app_pid) in pids


def test_a_kill_quota_kills_in_the_app_container(sidecar):
    opener = (
        "import os, sys, time; print(os.getpid(), flush=True); sys.stdin.readline()\n"
        "for _ in range(100000): os.open('/dev/null', os.O_RDONLY); time.sleep(0.005)"
    )
    proc = sidecar.podman.popen("exec", "-i", f"{sidecar.name}-app", "python3", "-c", opener)
    try:
        pid = int(proc.stdout.readline())
        wait_until(
            lambda: (
                sidecar.exec("app", f"cat /restrack/{pid}/quota", check=False).strip()
                == read_quota(sidecar.default_quota)
            ),
            5,
            "the opener to be tracked",
        )
        kills_before = scrape(sidecar.port)["restrack_enforcements_total"]
        # the default quota was set by root (the sidecar): root in the app may reset it
        sidecar.exec(
            "app", f"echo quota > /restrack/{pid}/reset && echo 'files=3' > /restrack/{pid}/quota"
        )
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(30) == 137, proc.stderr.read()  # 128 + SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    kills = {
        s.labels["action"]: s.value for s in scrape(sidecar.port)["restrack_enforcements_total"]
    }
    before = {s.labels["action"]: s.value for s in kills_before}
    assert kills["kill"] == before["kill"] + 1
    assert f"pid={pid} comm=python3 quota=files" in sidecar.logs("restrackfs")
    assert "action=kill" in sidecar.logs("restrackfs")


def test_the_scrape_endpoint_answers_from_the_host(sidecar):
    (app_pid,) = sidecar.pids("app", "sleep")
    wait_until(lambda: str(app_pid) in sidecar.exec("app", "ls /restrack").split(), 5, "tracked")
    found = scrape(sidecar.port)
    heap = {(s.labels["pid"], s.labels["comm"]) for s in found["restrack_heap_bytes"]}
    assert (str(app_pid), "sleep") in heap
    quota = {s.labels["pid"]: s.value for s in found["restrack_heap_quota_bytes"]}
    assert quota[str(app_pid)] == parse_quota(sidecar.default_quota).heap
    assert found["restrack_tracked_processes"][0].value == len(heap)
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://127.0.0.1:{sidecar.port}/", timeout=5)
    assert error.value.code == 404


# ----- the DaemonSet's pod: hostPID, the node's processes ------------------------


PROPAGATION = {"Bidirectional": ":rshared", "HostToContainer": ":rslave", None: ""}


def podman_run_argv(spec: dict, name: str, host_paths: dict[str, Path]) -> list[str]:
    """`podman run` arguments for a pod template's one container: what kube play
    would do, were hostPID honoured (podman 4.3 ignores it; 4.5 added it)."""
    (container,) = spec["containers"]
    argv = ["run", "--detach", "--name", name]
    if spec.get("hostPID"):
        argv += ["--pid", "host"]
    if spec.get("hostNetwork"):
        argv += ["--network", "host"]
    if container.get("securityContext", {}).get("privileged"):
        argv.append("--privileged")
    argv += ["--stop-timeout", str(spec.get("terminationGracePeriodSeconds", 30))]
    for mount in container["volumeMounts"]:
        source = host_paths.get(mount["name"])
        if source is None:
            (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
            source = volume["hostPath"]["path"]
        suffix = PROPAGATION[mount.get("mountPropagation")]
        argv += ["--volume", f"{source}:{mount['mountPath']}{suffix}"]
    return [*argv, container["image"], *container["args"]]


@pytest.fixture(scope="module")
def node_daemon(podman: Podman, image: str) -> Iterator[tuple[Pod, Path, str]]:
    """The node-agent overlay's pod template (hostPID), run as the module docstring says."""
    template = workload(render(OVERLAYS["node-agent"]))["spec"]["template"]
    spec = template["spec"]
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    (container,) = spec["containers"]
    container["image"] = image
    port = free_port()
    args = container["args"]
    set_option(args, "--metrics-listen", f"127.0.0.1:{port}")
    comm = "rtfs-node-app"
    set_option(args, "--track-comm", comm)
    mount = shared_mount(podman.workdir / "node-restrack")
    state = podman.workdir / "node-state"
    state.mkdir()
    name = "restrackfs-node"
    podman(*podman_run_argv(spec, name, {"restrack": mount, "state": state}))
    pod = Pod(podman, name, Path("/dev/null"), port, option(args, "--default-quota"))
    try:
        wait_until(lambda: answers(port), 60, "the node daemon's endpoint")
        yield pod, mount, comm
    finally:
        podman("rm", "--force", "--time", "10", name, check=False)
        # its pins are in the node's bpffs: a stop past the grace period leaves them
        scrub(bpf_backend.pin_dir_of(default_state_path(Path("/restrack"))))


def test_the_node_daemon_tracks_host_processes_by_comm_with_host_pids(node_daemon, podman):
    pod, mount, comm = node_daemon
    program = podman.workdir / comm
    shutil.copy("/bin/sleep", program)
    host_process = subprocess.Popen([str(program), "300"])
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        # the mount propagates back to the node (Bidirectional): read it from the host
        quota = mount / str(host_process.pid) / "quota"
        try:
            wait_until(lambda: quota.exists(), 5, "the host process to be tracked by host pid")
        except BaseException:
            print(podman("logs", pod.name, check=False).stderr)
            raise
        assert quota.read_text().strip() == read_quota(pod.default_quota)
        assert not (mount / str(bystander.pid)).exists()  # another comm
        heap = {s.labels["pid"]: s.labels["comm"] for s in scrape(pod.port)["restrack_heap_bytes"]}
        assert heap == {str(host_process.pid): comm}
        status = podman("exec", pod.name, "restrack", "status").stdout
        assert any(
            line.split()[:2] == [str(host_process.pid), comm] for line in status.splitlines()
        )
    finally:
        for process in (host_process, bystander):
            process.kill()
            process.wait()
    wait_until(lambda: not (mount / str(host_process.pid)).exists(), 5, "the exit to be seen")


def test_the_node_daemons_liveness_probe_answers(node_daemon):
    pod, _, _ = node_daemon
    with urllib.request.urlopen(f"http://127.0.0.1:{pod.port}/healthz", timeout=5) as response:
        assert response.status == 200


@needs_bpf
def test_the_node_daemon_pins_its_programs_in_the_nodes_bpffs(node_daemon):
    """The /sys/fs/bpf volume: under the bpf engine the pins are the node's, so quotas
    stay enforced while the pod restarts."""
    pod, _, _ = node_daemon
    engines = {s.labels["engine"] for s in scrape(pod.port)["restrack_engine_info"]}
    if engines == {"procfs"}:  # the image cannot load bpf: its reason, from the log
        reason = re.search(r"bpf unavailable: (.*)\)", pod.logs_of_container())
        pytest.skip(f"the image runs procfs: {reason and reason.group(1)}")
    assert engines == {"bpf"}
    assert bpf_backend.pin_dir_of(default_state_path(Path("/restrack"))).is_dir()


def test_stopping_the_node_daemon_unmounts_on_the_node(node_daemon, podman):
    """SIGTERM within terminationGracePeriodSeconds: the daemon unmounts, and the
    unmount propagates to the node, which is left no dead mount."""
    pod, mount, _ = node_daemon
    assert fuse_mounted(mount)
    podman("stop", "--time", "15", pod.name)
    assert not fuse_mounted(mount)
    assert "unmounted /restrack" in podman("logs", pod.name, check=False).stderr


def test_the_image_reads_heapsize_through_the_extension(podman: Podman, image: str):
    """deploy/Dockerfile builds tracker/backends/bpf/_counters.c (setup.py): without it the
    daemon would read heapsize through /proc, saying so in its log."""
    probe = (
        "from tracker.backends.bpf import _counters\n"
        "import tracker.backends.bpf.counters as counters\n"
        "assert counters._counters is _counters\n"
        "print(_counters.data_vm_pages.__doc__)\n"
    )
    # from /, as the entry point runs: not the sources left in the WORKDIR
    done = podman("run", "--rm", "--workdir", "/", "--entrypoint", "python3", image, "-c", probe)
    assert done.stdout.startswith("data_vm_pages(prog_fd, pid, ino)"), done

"""deploy/'s kustomize base and overlays, rendered: every object has what its kind
needs, the PodMonitor finds the pods, the daemon accepts the arguments it is given,
and the PrometheusRule is deploy/alerts.yaml word for word."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from restrackfs.daemon import parse_args
from tests.support.kustomize import DEPLOY, OVERLAYS, needs_kustomize, render, workload
from tests.support.paths import CHECKOUT

pytestmark = needs_kustomize

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
WORKLOADS = {"node-agent": "DaemonSet", "sidecar": "Deployment"}
API_VERSIONS = {
    "Namespace": "v1",
    "ServiceAccount": "v1",
    "ConfigMap": "v1",
    "DaemonSet": "apps/v1",
    "Deployment": "apps/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
}


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(OVERLAYS[request.param])


def of_kind(objects: list[dict], kind: str) -> dict:
    (found,) = [obj for obj in objects if obj["kind"] == kind]
    return found


def test_the_overlays_are_the_two_ways_to_run_it():
    assert sorted(OVERLAYS) == sorted(WORKLOADS)


def test_each_overlay_is_the_base_plus_its_workload(overlay):
    name, objects = overlay
    base = render(DEPLOY / "base")
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted([*(obj["kind"] for obj in base), WORKLOADS[name]])
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(set(keys)) == len(keys), keys


def test_every_object_names_its_api_kind_and_name(overlay):
    _, objects = overlay
    for obj in objects:
        assert obj["apiVersion"] == API_VERSIONS[obj["kind"]], obj["kind"]
        assert DNS_LABEL.fullmatch(obj["metadata"]["name"]), obj["metadata"]
        for key, value in obj["metadata"].get("labels", {}).items():
            assert isinstance(value, str), (key, value)  # a label's value is a string
        if obj["kind"] != "Namespace" and obj is not workload(objects):
            assert obj["metadata"]["namespace"] == "restrackfs", obj["metadata"]


def test_the_workload_selects_its_own_pods(overlay):
    name, objects = overlay
    found = workload(objects)
    template_labels = found["spec"]["template"]["metadata"]["labels"]
    selector = found["spec"]["selector"]
    assert set(selector) == {"matchLabels"}
    assert selector["matchLabels"].items() <= template_labels.items()
    assert template_labels["restrackfs"] == name


def restrackfs_container(objects: list[dict]) -> dict:
    spec = workload(objects)["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "restrackfs"]
    return container


def test_every_image_is_pinned_and_the_daemons_by_digest(overlay):
    _, objects = overlay
    spec = workload(objects)["spec"]["template"]["spec"]
    for container in spec["containers"]:
        image = container["image"]
        name_and_tag = image.split("@")[0]
        assert ":" in name_and_tag.rsplit("/", 1)[-1], f"{image}: no tag"
        assert not name_and_tag.endswith(":latest"), image
    image = restrackfs_container(objects)["image"]
    assert DIGEST.search(image), image
    assert image.split("@")[0].endswith(":0.1.0")  # the package's version, as the image is tagged
    assert 'version = "0.1.0"' in (CHECKOUT / "pyproject.toml").read_text()


def entrypoint() -> list[str]:
    """deploy/Dockerfile's ENTRYPOINT: what the container's args follow."""
    text = (DEPLOY / "Dockerfile").read_text()
    (line,) = re.findall(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    return json.loads(line)


def test_the_daemon_accepts_its_arguments(overlay):
    """The args, as the image runs them, pass the daemon's own parser: the quota's
    grammar, the tracking options, the listen address (the node's IP filled in)."""
    _, objects = overlay
    container = restrackfs_container(objects)
    program, *options = entrypoint()
    assert program == "restrackfs"
    args = [arg.replace("$(NODE_IP)", "192.0.2.10") for arg in container["args"]]
    parsed = parse_args([*options, *args])
    assert str(parsed.mountpoint) == "/restrack"
    assert parsed.over_volume and parsed.foreground
    host, port = parsed.metrics_listen
    (named,) = [p for p in container["ports"] if p["name"] == "restrack"]
    assert named["containerPort"] == port
    if "$(NODE_IP)" in container["args"][container["args"].index("--metrics-listen") + 1]:
        (env,) = [e for e in container["env"] if e["name"] == "NODE_IP"]
        assert env["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"


def mounts(spec: dict, container: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (the volume, the mount), each mount's volume defined in the pod."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    found = {}
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes, mount
        found[mount["mountPath"]] = (volumes[mount["name"]], mount)
    return found


def test_the_daemon_gets_fuse_privileges_and_a_propagating_mount(overlay):
    name, objects = overlay
    spec = workload(objects)["spec"]["template"]["spec"]
    container = restrackfs_container(objects)
    assert container["securityContext"] == {"privileged": True}  # FUSE, BPF, Bidirectional
    by_path = mounts(spec, container)
    fuse, _ = by_path["/dev/fuse"]
    assert fuse["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    restrack, mount = by_path["/restrack"]
    assert mount["mountPropagation"] == "Bidirectional"
    if name == "node-agent":
        assert spec["hostPID"] is True and spec["hostNetwork"] is True
        assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
        assert restrack["hostPath"]["path"] == "/restrack"
        bpffs, bpf_mount = by_path["/sys/fs/bpf"]
        assert bpffs["hostPath"] == {"path": "/sys/fs/bpf", "type": "Directory"}
        assert bpf_mount["mountPropagation"] == "HostToContainer"
        state, _ = by_path["/run/restrackfs"]
        assert state["hostPath"]["path"] == "/run/restrackfs"
        assert "--track-all" not in container["args"]  # every host process: never on a node
        probe = container["livenessProbe"]["httpGet"]
        assert probe == {"path": "/healthz", "port": "restrack"}
        assert spec["serviceAccountName"] == of_kind(objects, "ServiceAccount")["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False
    else:
        assert spec["shareProcessNamespace"] is True
        assert "--track-all" in container["args"]
        assert restrack == {"name": "restrack", "emptyDir": {}}
        (app,) = [c for c in spec["containers"] if c is not container]
        _, app_mount = mounts(spec, app)["/restrack"]
        assert app_mount["mountPropagation"] == "HostToContainer"
        assert {"name": "RESTRACK_MOUNT", "value": "/restrack"} in app["env"]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against labels."""
    operators = {
        "In": lambda key, values: labels.get(key) in values,
        "NotIn": lambda key, values: labels.get(key) not in values,
        "Exists": lambda key, _: key in labels,
        "DoesNotExist": lambda key, _: key not in labels,
    }
    return selector.get("matchLabels", {}).items() <= labels.items() and all(
        operators[e["operator"]](e["key"], e.get("values", []))
        for e in selector.get("matchExpressions", [])
    )


def test_the_podmonitor_scrapes_the_workloads_named_port(overlay):
    _, objects = overlay
    monitor = of_kind(objects, "PodMonitor")["spec"]
    template = workload(objects)["spec"]["template"]
    assert selects(monitor["selector"], template["metadata"]["labels"])
    assert not selects(monitor["selector"], {"app.kubernetes.io/name": "other"})
    assert monitor["namespaceSelector"] == {"any": True}  # sidecars live in any namespace
    (endpoint,) = monitor["podMetricsEndpoints"]
    ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
    assert [p["name"] for p in ports] == [endpoint["port"]]
    assert endpoint["path"] == "/metrics"
    relabel = {r.get("targetLabel"): r for r in endpoint["relabelings"]}
    assert relabel["job"]["replacement"] == "restrackfs"  # the job the rules expect
    assert relabel["node"]["sourceLabels"] == ["__meta_kubernetes_pod_node_name"]
    assert relabel["agent_pod"]["sourceLabels"] == ["__meta_kubernetes_pod_name"]
    # the exposition's pod and container labels are the tracked process's, not the target's
    assert relabel[None] == {"action": "labeldrop", "regex": "pod|container"}
    # scraped once: not also by a generic job that reads prometheus.io annotations
    assert "annotations" not in template["metadata"]


def test_the_prometheusrule_carries_deploy_alerts_yaml(overlay):
    _, objects = overlay
    rule = of_kind(objects, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((DEPLOY / "alerts.yaml").read_text())
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for item in group["rules"]:
            assert item["alert"] and item["expr"] and item["labels"]["severity"]
            assert item["annotations"]["summary"] and item["annotations"]["description"]


def test_the_dashboard_configmap_is_for_grafanas_sidecar(overlay):
    _, objects = overlay
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert config_map["metadata"]["name"] == "restrackfs-dashboard"  # no hash suffix
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name,) = config_map["data"]
    assert name.endswith(".json")
    dashboard = json.loads(config_map["data"][name])
    assert dashboard == json.loads((DEPLOY / "base" / "dashboard.json").read_text())


@pytest.mark.parametrize("kustomization", [DEPLOY / "base", *OVERLAYS.values()])
def test_no_object_is_left_without_a_namespace_but_the_sidecars_app(kustomization):
    objects = render(kustomization)
    for obj in objects:
        if obj["kind"] == "Deployment":
            assert "namespace" not in obj["metadata"]  # the user's: kubectl apply -n
        elif obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "restrackfs"

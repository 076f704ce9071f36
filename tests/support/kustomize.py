"""deploy/'s kustomizations rendered as a cluster would get them.

`kubectl kustomize` where kubectl is installed (its kustomize is built in), else a
standalone `kustomize build`; the tests that need either skip with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.paths import CHECKOUT

DEPLOY = CHECKOUT / "deploy"
OVERLAYS = {path.name: path for path in sorted((DEPLOY / "overlays").iterdir())}


def _kustomize_argv() -> list[str] | None:
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    return None


KUSTOMIZE = _kustomize_argv()
needs_kustomize = pytest.mark.skipif(
    KUSTOMIZE is None,
    reason="neither kubectl (kubectl kustomize) nor kustomize is installed",
)


def render(kustomization: Path) -> list[dict]:
    """Every object the kustomization gives, in its order."""
    assert KUSTOMIZE is not None
    result = subprocess.run(
        [*KUSTOMIZE, str(kustomization)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj is not None]


def workload(objects: list[dict]) -> dict:
    """The one DaemonSet or Deployment of an overlay."""
    (found,) = [obj for obj in objects if obj["kind"] in ("DaemonSet", "Deployment")]
    return found

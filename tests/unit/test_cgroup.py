"""Container and pod from cgroup paths, in the forms each runtime writes."""

import os
from pathlib import Path

import pytest

from tracker.linux.cgroup import NO_WORKLOAD, Workload, read_workload, workload_in

CID = "3f1c" * 16
POD = "1b2c3d4e-0000-1111-2222-333344445555"
POD_SYSTEMD = POD.replace("-", "_")


@pytest.mark.parametrize(
    "line, expected",
    [
        (
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_SYSTEMD}.slice/cri-containerd-{CID}.scope",
            Workload(CID, POD),
        ),
        (f"0::/kubepods/besteffort/pod{POD}/{CID}", Workload(CID, POD)),
        (
            f"0::/kubepods.slice/kubepods-pod{POD_SYSTEMD}.slice/crio-{CID}.scope",
            Workload(CID, POD),
        ),
        (
            f"0::/kubepods.slice/kubepods-pod{POD_SYSTEMD}.slice/crio-conmon-{CID}.scope",
            Workload(None, POD),
        ),
        (f"0::/system.slice/docker-{CID}.scope", Workload(CID, None)),
        (f"12:memory:/docker/{CID}\n0::/", Workload(CID, None)),
        (f"0::/machine.slice/libpod-{CID}.scope/container", Workload(CID, None)),
        (f"0::/libpod_parent/libpod-{CID}", Workload(CID, None)),
        ("0::/user.slice/user-0.slice/session-1.scope", NO_WORKLOAD),
        ("0::/", NO_WORKLOAD),
        ("", NO_WORKLOAD),
        (f"0::/system.slice/docker-{CID[:-1]}.scope", NO_WORKLOAD),
    ],
)
def test_recorded_cgroup_paths(line: str, expected: Workload) -> None:
    assert workload_in(line.encode()) == expected


def test_a_process_of_this_machine_outside_any_container() -> None:
    assert read_workload(os.getpid()) == workload_in(Path("/proc/self/cgroup").read_bytes())

"""The record's line, the metric of the records, and the follower's resume point: the
parts of the enforcement record that need no daemon (those with one are in
tests/mount/test_enforcements.py)."""

from __future__ import annotations

import json

from restrackfs import client
from restrackfs.metrics import render_process_enforcements
from tracker.engine.records import Pending
from tracker.linux.cgroup import NO_WORKLOAD, Workload

CONTAINER = "3f2a9c1b0d4e" + "0" * 52
POD = "6d0e4b8c-1f2a-4c3b-9d8e-7a6b5c4d3e2f"


def pending(**changed: object) -> Pending:
    fields: dict[str, object] = {
        "time": 1.5, "pid": 42, "comm": 'we"ird\nname', "uid": 1000, "quota": "heap",
        "usage": 3, "limit": 2, "peak": 4, "action": "kill", "workload": NO_WORKLOAD,
        "tree": False,
    }  # fmt: skip
    return Pending(**{**fields, **changed})  # type: ignore[arg-type]


def test_a_line_is_one_json_object_with_the_fields_in_order():
    line = pending().line({"file": 1})
    assert line.endswith("\n") and line.count("\n") == 1  # a newline in a name is escaped
    record = json.loads(line)
    assert list(record) == [
        "time", "pid", "comm", "uid", "quota", "usage", "limit", "peak", "action", "fds",
        "container", "pod",
    ]  # fmt: skip
    assert record["comm"] == 'we"ird\nname' and record["fds"] == {"file": 1}
    assert record["container"] is None and record["pod"] is None


def test_a_trees_line_says_so_and_a_workload_is_named():
    record = json.loads(pending(tree=True, workload=Workload(CONTAINER, POD)).line(None))
    assert (record["scope"], record["container"], record["pod"], record["fds"]) == (
        "tree", CONTAINER, POD, None,
    )  # fmt: skip
    parsed = client.Enforcement.parse(pending(tree=True).line(None))
    assert (parsed.scope, parsed.fds, parsed.comm) == ("tree", None, 'we"ird\nname')
    assert client.Enforcement.parse(pending().line(None)).scope == "process"


def test_the_metric_has_no_pid_and_labels_only_what_was_found():
    text = render_process_enforcements(
        {("kill", "heap", "a\\b", CONTAINER, POD): 2, ("notify", "files", 'x"y', "", ""): 1}
    )
    lines = text.splitlines()
    assert lines[1] == "# TYPE restrack_process_enforcements_total counter"
    assert lines[2:] == [
        'restrack_process_enforcements_total{action="kill",quota="heap",comm="a\\\\b",'
        f'container="{CONTAINER}",pod="{POD}"}} 2',
        'restrack_process_enforcements_total{action="notify",quota="files",comm="x\\"y"} 1',
    ]


def test_a_follower_resumes_after_the_last_line_it_printed():
    lines = ["a", "b", "c"]
    assert client._after(lines, None) == lines
    assert client._after(lines, "b") == ["c"]
    assert client._after(lines, "c") == []
    assert client._after(lines, "gone") == lines  # more came than the file keeps

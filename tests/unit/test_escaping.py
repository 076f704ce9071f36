"""Names escaped for printing, whatever a user chose: every code point comes back as
shown, the client parses any escaped `stat`, metrics labels follow the exposition
rules (the mounted side of this: tests/attacks/test_names.py)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from restrackfs import client, metrics
from tracker.engine.entry import Measurement
from tracker.linux.procfs import PID_MAX_LIMIT, escape_comm, escape_unprintable
from tracker.quota import Action, Quota


def unescape(shown: str) -> str:
    """The inverse of escape_comm, written from its docstring."""
    simple = {"\\\\": "\\", "\\n": "\n"}
    return re.sub(
        r"\\\\|\\n|\\x[0-9a-f]{2}|\\u[0-9a-f]{4}|\\U[0-9a-f]{8}",
        lambda m: simple.get(m[0]) or chr(int(m[0][2:], 16)),
        shown,
    )


EVERY_CODE_POINT = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=["Cs"])


@given(st.text(EVERY_CODE_POINT, max_size=20))
@settings(max_examples=2000, deadline=None)
def test_escaped_names_are_printable_and_unambiguous(name):
    shown = escape_comm(name)
    assert shown.isprintable()
    assert shown.splitlines() == ([shown] if shown else [])
    assert unescape(shown) == name


def stat_text(pid: int, comm: str) -> str:
    """A `PID/stat` as the daemon writes it, comm as given."""
    fields = {"pid": pid, "comm": comm, "heapsize": 1, "openfile_count": 2}
    fields |= {"heap_quota": "max", "file_quota": 3, "action": "kill", "heap_total": 4}
    fields |= {"openfile_total": 5, "registered": 6, "heap_peak": 7, "openfile_peak": 8}
    return "".join(f"{key} {value}\n" for key, value in fields.items())


@given(st.integers(1, PID_MAX_LIMIT), st.text(EVERY_CODE_POINT, max_size=20))
@settings(max_examples=2000, deadline=None)
def test_the_client_parses_stat_whatever_the_name(pid, name):
    """Escaped as the daemon does, every name comes back as shown; and even a name
    escaped for newlines alone (a daemon before this change) cannot move the pid."""
    record = client.parse_stat(stat_text(pid, escape_comm(name)))
    assert (record.pid, record.comm, record.file_quota) == (pid, escape_comm(name), 3)
    raw = name.replace("\\", "\\\\").replace("\n", "\\n")
    assert client.parse_stat(stat_text(pid, raw)).pid == pid
    assert client.lines(stat_text(pid, raw))[1] == f"comm {raw}"


@given(st.text(EVERY_CODE_POINT, max_size=20))
@settings(max_examples=1000, deadline=None)
def test_metrics_labels_follow_the_exposition_rules_whatever_the_name(name):
    measurement = Measurement(7, name, 1, 2, 3, 4, Quota(5, None, Action.KILL), 0.0, 6, 7)
    text = metrics.render([measurement], dict.fromkeys(Action, 0))
    assert text.count("\n") == len(client.lines(text))
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    comms = {s.labels["comm"] for s in samples if "comm" in s.labels}
    assert comms == {escape_unprintable(name)}
    assert escape_unprintable(name).isprintable()

"""The pure parts of `restrack top`: parsing, rates, sorting, cells, layout."""

from __future__ import annotations

import json

import pytest

from restrackfs.top import (
    History,
    Mark,
    Row,
    SortKey,
    _mark,
    parse_labels,
    parse_metrics,
    parse_records,
    parse_warn,
    rate_text,
    record_text,
    sort_rows,
    sparkline,
    use_bar,
)
from restrackfs.topscreen import COLUMNS, PRIORITY, cells, layout

EXPOSITION = """\
# HELP restrack_heap_bytes Heap bytes gained since registration or the last usage reset.
# TYPE restrack_heap_bytes gauge
restrack_heap_bytes{pid="10",comm="a \\"q\\" \\\\ b"} 4096
restrack_heap_bytes{pid="11",comm="b",container="abc",pod="p-1"} 0
restrack_open_files{pid="10",comm="a \\"q\\" \\\\ b"} 3
restrack_heap_quota_bytes{pid="11",comm="b",container="abc",pod="p-1"} 1048576
restrack_tree_members{pid="11",comm="b",container="abc",pod="p-1"} 4
restrack_heap_total_bytes{pid="10",comm="a \\"q\\" \\\\ b"} 1.2e6
restrack_enforcements_total{action="kill"} 2
restrack_new_series_of_a_later_daemon{pid="10"} 7
restrack_heap_bytes{pid="oops"} 1
restrack_tracked_processes 2
"""


def test_metrics_give_each_process_its_series():
    tracked = parse_metrics(EXPOSITION)
    assert set(tracked) == {10, 11}
    a, b = tracked[10], tracked[11]
    assert (a.comm, a.heapsize, a.openfile_count, a.heap_total) == ('a "q" \\ b', 4096, 3, 1200000)
    assert (a.heap_quota, a.file_quota, a.tree_members) == (None, None, None)
    assert (b.heapsize, b.heap_quota, b.tree_members) == (0, 1048576, 4)


def test_labels_keep_commas_and_braces_inside_values():
    assert parse_labels('pid="1",comm="x,y}{=",pod="p"') == {
        "pid": "1",
        "comm": "x,y}{=",
        "pod": "p",
    }
    with pytest.raises(ValueError):
        parse_labels("pid=1")


def record(**changes: object) -> str:
    fields = {
        "time": 1790000000.5, "pid": 42, "comm": "leak\n", "uid": 0, "quota": "heap",
        "usage": 3 * 2**20, "limit": 2**20, "peak": 3 * 2**20, "action": "kill", "fds": None,
        "container": None, "pod": None,
    }  # fmt: skip
    return json.dumps({**fields, **changes})


def test_records_skip_what_is_not_a_record():
    text = "\n".join([record(), "{cut short", record(pid="x"), record(action="warn", pid=43)])
    records = parse_records(text + "\n")
    assert [(r.pid, r.action) for r in records] == [(42, "kill"), (43, "warn")]
    assert records[0].comm == "leak\\x0a"  # printable: a name cannot start a new line
    assert record_text(records[0]).endswith(" kill 42 leak\\x0a heap 3M>1M")


def test_rate_is_over_the_last_minute():
    history = History()
    assert history.rate(0.0) is None
    history.add(0.0, 0)
    history.add(10.0, 1000)
    assert history.rate(10.0) == 100.0
    history.add(70.0, 2000)  # the sample at 0 s is now older than a minute
    assert history.rate(70.0) == pytest.approx(1000 / 60)
    assert history.values() == [0, 1000, 2000]


def row(pid: int, **values: object) -> Row:
    fields: dict[str, object] = {
        "pid": pid, "user": "root", "name": "w", "heap": 0, "heap_total": 0, "files": 0,
        "files_total": 0, "rss": 0, "use": None, "rate": None, "heap_peak": 0, "files_peak": 0,
        "history": [],
    }  # fmt: skip
    return Row(**{**fields, **values})  # type: ignore[arg-type]


def test_sort_puts_the_highest_first_and_rows_without_the_figure_last():
    rows = [row(1, use=0.5, files=2), row(2, use=None, files=9), row(3, use=1.5, files=2)]
    assert [r.pid for r in sort_rows(rows, SortKey.USE)] == [3, 1, 2]
    assert [r.pid for r in sort_rows(rows, SortKey.FILES)] == [2, 1, 3]  # ties by pid
    assert [r.pid for r in sort_rows(rows, SortKey.RATE)] == [1, 2, 3]


def test_marks_over_quota_and_over_the_warning_level():
    assert _mark(1.01, None) is Mark.OVER
    assert _mark(0.85, parse_warn("heap=100 files=max action=kill warn=80%")) is Mark.WARNED
    assert _mark(0.75, 0.8) is Mark.NONE
    assert _mark(None, 0.8) is Mark.NONE
    assert parse_warn("heap=100 files=max action=kill") is None


def test_cells_of_a_sparkline_a_bar_and_a_rate():
    assert sparkline([0, 50, 100], 10) == "▁▅█"
    assert sparkline([5, 5], 10, ascii_only=True) == "__"
    assert sparkline(list(range(30)), 10) == sparkline(list(range(20, 30)), 10)
    assert use_bar(0.5, 12) == "[###   ] 50%"
    assert use_bar(4.92, 12) == "[#####] 492%"  # over: a full bar, the real share
    assert use_bar(None, 12) == "-".ljust(12)
    assert rate_text(1536.0) == "+1.5K/s" and rate_text(-2048.0) == "-2K/s"


@pytest.mark.parametrize("width", [20, 40, 60, 80, 100, 132, 200])
def test_every_row_fits_the_width(width):
    columns = layout(width)
    line = cells(row(4194304, name="n" * 40, use=4.92, rate=-1e12, heap=2**60), columns, False)
    assert len(line) <= width
    titles = [c.title for c in columns]
    assert titles[:1] == ["PID"]
    dropped = [t for t in PRIORITY if t not in titles]
    if dropped:  # the first column dropped did not fit beside those of higher priority
        first = PRIORITY.index(dropped[0])
        assert set(PRIORITY[:first]) <= set(titles)
        kept = sum(COLUMNS[t].width + 1 for t in PRIORITY[:first]) + 1
        assert kept + COLUMNS[dropped[0]].width + 1 > width

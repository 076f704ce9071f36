"""`--log-format json` and `--version`, on the real commands."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tomllib

from restrackfs.logformat import JsonFormatter, KeyValueFields, key_value_fields
from tests.support.paths import CHECKOUT
from tests.support.waiting import wait_until

VERSION = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]["version"]
ENFORCEMENT_FIELDS = {"pid", "comm", "quota", "usage", "limit", "action"}


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_log_is_one_object_a_line_with_the_text_lines_fields(daemon_factory, spawn):
    daemon = daemon_factory("--log-format", "json")
    w = spawn()
    daemon.register(w.pid)
    daemon.write("files=1 action=notify", w.pid, "quota")
    w.do("open", 3)
    wait_until(lambda: "restrackfs.enforce" in daemon.log_text(), 5, "the enforcement line")
    lines = json_lines(daemon.log_text())  # every line parses, or this fails
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT[0-9:.]+[+-]\d\d:\d\d", x["time"]) for x in lines)
    registered = next(x for x in lines if x["message"].startswith("registered"))
    assert (registered["level"], registered["logger"]) == ("INFO", "restrackfs.engine")
    assert registered["pid"] == w.pid
    enforced = next(x for x in lines if x["logger"] == "restrackfs.enforce")
    assert enforced.keys() >= ENFORCEMENT_FIELDS
    assert enforced["pid"] == w.pid and enforced["comm"] == "workload"
    assert (enforced["quota"], enforced["action"], enforced["limit"]) == ("files", "notify", 1)
    assert isinstance(enforced["usage"], int) and enforced["usage"] > 1
    # the fields say what the message says
    for key in ENFORCEMENT_FIELDS:
        assert f"{key}={enforced[key]}" in enforced["message"]


def test_text_is_the_default_form(daemon, spawn):
    daemon.register(spawn().pid)
    line = next(x for x in daemon.log_text().splitlines() if "registered pid=" in x)
    assert re.match(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} restrackfs\.engine INFO registered", line
    )


def test_fields_come_from_the_call_not_from_the_text():
    """A name holding ` quota=` cannot forge a field: the arguments are the fields."""
    record = logging.LogRecord(
        "restrackfs.enforce", logging.WARNING, __file__, 1,
        "pid=%d comm=%s quota=%s usage=%d limit=%d action=%s%s",
        (7, "x quota=heap", "files", 12, 10, "kill", " crossings=3"), None,
    )  # fmt: skip
    KeyValueFields().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert {k: line[k] for k in ENFORCEMENT_FIELDS} == {
        "pid": 7, "comm": "x quota=heap", "quota": "files", "usage": 12, "limit": 10,
        "action": "kill",
    }  # fmt: skip
    assert line["message"] == (
        "pid=7 comm=x quota=heap quota=files usage=12 limit=10 action=kill crossings=3"
    )
    assert key_value_fields("%d%% of %s", (5, "x")) == {}
    assert key_value_fields("a=%s", ()) == {}  # a malformed call: no fields, no error


def test_both_commands_answer_version():
    for command in ("restrackfs", "restrack"):
        done = subprocess.run(
            [str(CHECKOUT / ".venv/bin" / command), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"{command} {VERSION}\n"


def test_version_without_the_package_installed_is_pyprojects():
    """Run from a clone without installing (PYTHONPATH), the checkout's pyproject says."""
    code = "from restrackfs.version import version; print(version())"
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        cwd=CHECKOUT,
        timeout=30,
        env={"PYTHONPATH": str(CHECKOUT)},
    )
    assert done.stdout == f"{VERSION}\n", done.stderr

"""The log line's form: `--log-format text` (the default) or `json`.

JSON is one object a line with the text line's fields, `time` (RFC 3339, local
offset), `level`, `logger` and `message`, and, for a line written as
`key=%d key=%s ...` (every enforcement line: `pid`, `comm`, `quota`, `usage`,
`limit`, `action`), each key as a field of its own with the value the line
prints, a number where it is one. Those fields are taken from the log call's
own format and arguments (`KeyValueFields`, a handler filter that runs before
`logguard`'s, which fills the arguments in), never parsed back out of the text.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
FORMATS = ("text", "json")
_BASE_FIELDS = {"time", "level", "logger", "message", "exception"}
# one printf conversion of a %-style log format, with the `key=` written before it
_CONVERSION = re.compile(r"(?:(\w+)=)?%(?:\(\w+\))?[-#0 +]*(?:\d+|\*)?(?:\.\d+)?([a-zA-Z%])")


def key_value_fields(msg: object, args: object) -> dict[str, Any]:
    """`{key: argument}` for every `key=%x` of a %-style format, in order."""
    if not isinstance(msg, str) or not isinstance(args, tuple) or "=%" not in msg:
        return {}
    fields: dict[str, Any] = {}
    position = 0
    for match in _CONVERSION.finditer(msg):
        key, conversion = match.groups()
        if conversion == "%":
            continue
        if position >= len(args):
            break
        value = args[position]
        position += 1
        if key is not None and key not in _BASE_FIELDS:
            is_plain = isinstance(value, (int, float, str)) and not isinstance(value, bool)
            fields[key] = value if is_plain else str(value)
    return fields


class KeyValueFields(logging.Filter):
    """Keeps a record's `key=%x` arguments as `record.fields` (for the JSON form)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = key_value_fields(record.msg, record.args)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created)
            .astimezone()
            .isoformat("T", "milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure(level: str, log_file: Path | None, form: str) -> logging.Handler:
    """The root logger's one handler: to `log_file` (appended) or stderr, in `form`."""
    handler: logging.Handler = (
        logging.StreamHandler() if log_file is None else logging.FileHandler(log_file)
    )
    handler.addFilter(KeyValueFields())
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler

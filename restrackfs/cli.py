"""The `restrack` command, built only on `restrackfs.client`.

Exit codes: 0 success, 1 any other error, 2 usage or invalid value (EINVAL),
3 no such process (ESRCH), 4 already tracked (EEXIST), 5 not tracked (ENOENT),
6 not permitted (EPERM/EACCES), 7 quota already set (EBUSY), 8 no daemon
serves the mount, 130 interrupted. 3 to 7 are the daemon's answers only: a
failure outside the mount (a --textfile directory that is missing, say) is 1,
whatever its errno. `restrack run` exits with the program's
status (128 + signal if it was killed), or 125 if the emulation is unavailable;
when its quota could not be set, with the code of that error, the program unstarted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from restrackfs import client
from restrackfs.client import NotMountedError, Stat
from restrackfs.version import version
from tracker.linux.procfs import escape_unprintable
from tracker.vocabulary import LIMIT_MAX, OPENFILE_TOTAL, TREE_STAT_FIELDS, UNLIMITED

EXIT_CODES = {
    errno.EINVAL: 2,
    errno.ESRCH: 3,
    errno.EEXIST: 4,
    errno.ENOENT: 5,
    errno.EPERM: 6,
    errno.EACCES: 6,
    errno.EBUSY: 7,
}
EXIT_FAILURE = 1  # anything else: a failure outside the mount (a file restrack writes)
EXIT_NOT_MOUNTED = 8
EXIT_INTERRUPTED = 130
EXIT_NO_EMULATION = 125


class LocalError(Exception):
    """A failure outside the mount (say, the --textfile directory): exit 1 with the
    message, whatever its errno (which would otherwise read as a daemon's answer)."""


# ----- formatting -------------------------------------------------------------


def human_size(size: int | None) -> str:
    """1536 -> 1.5K, 31457285 -> 30M: binary units, at most one decimal, never a
    trailing .0 (so a quota and a usage of about the same size read alike)."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("", "K", "M", "G", "T"):
        shown = round(value, 1) if value < 100 else float(round(value))
        if shown < 1024 or unit == "T":
            return f"{shown:.1f}".removesuffix(".0") + unit
        value /= 1024
    raise AssertionError("unreachable")


def judged(s: Stat) -> tuple[int, int]:
    """(heap, files) as the quota judges them: a tree's sums, else the process's own."""
    if s.tree_heapsize is not None and s.tree_openfile_count is not None:
        return s.tree_heapsize, s.tree_openfile_count
    return s.heapsize, s.openfile_count


def quota_use(s: Stat) -> float | None:
    """The highest share of a quota in use, in percent; None without a quota.

    A zero quota counts as one unit (byte or file), so a breached zero quota
    still reads as a (large) number, never as "no quota" or an infinity that
    JSON cannot carry.
    """
    heap, files = judged(s)
    shares = [
        100.0 * used / max(limit, 1)
        for used, limit in ((heap, s.heap_quota), (files, s.file_quota))
        if limit is not None
    ]
    return max(shares) if shares else None


def action_of(s: Stat) -> str | None:
    """The action a breach would take; None while no limit is set (stat's `action`
    then is only what a limit set later would default to)."""
    return s.action if s.heap_quota is not None or s.file_quota is not None else None


def over_quota(s: Stat) -> bool:
    heap, files = judged(s)
    return any(
        limit is not None and used > limit
        for used, limit in ((heap, s.heap_quota), (files, s.file_quota))
    )


def _use_text(use: float | None) -> str:
    return "-" if use is None else f"{use:.0f}%"


# PEAK: the highest HEAP since registration or the last usage reset (heap_peak)
COLUMNS = ("PID", "COMMAND", "HEAP", "PEAK", "FILES", "HEAP-QUOTA", "FILE-QUOTA", "USE", "ACTION")


def _row(s: Stat) -> tuple[str, ...]:
    """One process; a tree's root shows its tree's sums and how many members it has."""
    heap, files = judged(s)
    tree = "" if s.members is None else f"(tree:{s.members})"  # one word: awk-able
    return (
        str(s.pid),
        escape_unprintable(s.comm) + tree,
        human_size(heap),
        "-" if s.is_tree else human_size(s.heap_peak),  # no peak is kept of a tree's sum
        str(files),
        human_size(s.heap_quota),
        "-" if s.file_quota is None else str(s.file_quota),
        _use_text(quota_use(s)),
        action_of(s) or "-",
    )


def table(stats: Sequence[Stat]) -> str:
    rows = [COLUMNS, *map(_row, stats)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def stat_json(s: Stat) -> dict[str, object]:
    record: dict[str, object] = _fields(s)
    record["action"] = action_of(s)  # null without a limit, as heap_quota and file_quota
    use = quota_use(s)
    record["quota_use"] = None if use is None else round(use, 2)
    record["over_quota"] = over_quota(s)
    return record


def _fields(s: Stat) -> dict[str, object]:
    """The stat's fields; the tree's only while a tree quota is set."""
    fields: dict[str, object] = asdict(s)
    if not s.is_tree:
        for name in TREE_STAT_FIELDS:
            del fields[name]
    return fields


def collect(mount: str | None) -> list[Stat]:
    """A reading of every tracked process; those that leave meanwhile are skipped."""
    stats = []
    for pid in client.tracked(mount=mount):
        try:
            stats.append(client.stat(pid, mount=mount))
        except (ProcessLookupError, FileNotFoundError) as error:
            if isinstance(error, NotMountedError):
                raise
    return stats


# ----- commands ---------------------------------------------------------------


def cmd_register(args: argparse.Namespace, out: TextIO) -> int:
    for pid in args.pids:
        client.register(pid, mount=args.mount)
    return 0


def cmd_deregister(args: argparse.Namespace, out: TextIO) -> int:
    for pid in args.pids:
        client.deregister(pid, mount=args.mount)
    return 0


def cmd_cap(args: argparse.Namespace, out: TextIO) -> int:
    if args.heap is None and args.files is None and args.action is None:
        raise OSError(errno.EINVAL, "cap: give --heap, --files or --action")
    heap = None if args.heap is None else whole_bytes(args.pid, args.heap)
    scope = "tree" if args.tree else None
    client.set_quota(
        args.pid, heap=heap, files=args.files, action=args.action, scope=scope, mount=args.mount
    )
    return 0


# A size as `status` prints it: a decimal with a K/M/G/T suffix (`1.5G`). The mount's
# grammar takes whole numbers only, so the command converts it.
_DECIMAL_SIZE = re.compile(r"([0-9]{1,20})\.([0-9]{1,20})([KMGTkmgt])", re.ASCII)
_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40}


def whole_bytes(pid: int, text: str) -> str:
    """`1.5G` -> `1610612736`: a decimal size in bytes, rounded down to a whole byte;
    anything else as it is (the grammar decides: `40M`, `max`, or why not)."""
    match = _DECIMAL_SIZE.fullmatch(text)
    if match is None:
        return text
    whole, fraction, suffix = match.groups()
    scale = 10 ** len(fraction)
    value = ((int(whole) * scale + int(fraction)) << _SHIFT[suffix.lower()]) // scale
    if value > LIMIT_MAX:
        raise OSError(errno.EINVAL, f"{pid}: size {text!r} is too large")
    return str(value)


def cmd_reset(args: argparse.Namespace, out: TextIO) -> int:
    client.reset(args.pid, args.what, mount=args.mount)
    return 0


def fds_text(kinds: dict[str, int]) -> str:
    """`file 3, dir 1, ... (openfile_total 9)`: one line for `show`."""
    total = kinds.pop(OPENFILE_TOTAL)
    return ", ".join(f"{kind} {count}" for kind, count in kinds.items()) + f" (total {total})"


def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    s = client.stat(args.pid, mount=args.mount)
    kinds = client.fds(args.pid, mount=args.mount)  # a listing of its own moment
    if args.json:
        json.dump({**stat_json(s), "fds": kinds}, out)
        out.write("\n")
        return 0
    fields = _fields(s)
    fields["action"] = action_of(s) or "-"
    fields["quota_use"] = _use_text(quota_use(s))
    fields["fds"] = fds_text(kinds)
    width = max(map(len, fields))
    for key, value in fields.items():
        value = UNLIMITED if value is None else value
        out.write(f"{key.ljust(width)}  {escape_unprintable(str(value))}\n")
    return 0


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    stats = collect(args.mount)
    if args.json:
        json.dump([stat_json(s) for s in stats], out)
        out.write("\n")
    else:
        out.write(table(stats) + "\n")
        engine = client.engine(mount=args.mount)
        if engine is not None:
            out.write(f"\nengine: {engine}\n")
    return 0


def _by_use(s: Stat) -> tuple[bool, float, int]:
    use = quota_use(s)
    return (over_quota(s), -1.0 if use is None else use, -s.pid)


CLEAR_SCREEN = "\x1b[H\x1b[2J"


def cmd_top(args: argparse.Namespace, out: TextIO) -> int:
    shown = 0
    while args.iterations is None or shown < args.iterations:
        if shown:
            time.sleep(args.delay)
        stats = sorted(collect(args.mount), key=_by_use, reverse=True)
        header = f"restrack top - {time.strftime('%H:%M:%S')} - {len(stats)} tracked"
        # a terminal is redrawn in place; a pipe or file gets plain tables, one after another
        clear = CLEAR_SCREEN if out.isatty() else "\n" if shown else ""
        out.write(clear + header + "\n\n" + table(stats) + "\n")
        out.flush()
        shown += 1
    return 0


CONTAINER_ID_SHOWN = 12  # characters of a container id, as `docker ps` shows it


def enforcement_text(record: client.Enforcement) -> str:
    """One record on one line: when, what, on whom, how far over, where it ran."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.time))
    size = human_size if record.quota == "heap" else str
    words = [
        when,
        f"{record.action:<6}",
        f"pid {record.pid} ({escape_unprintable(record.comm)})",
        f"{record.quota} {size(record.usage)}/{size(record.limit)}",
        f"peak {size(record.peak)}",
    ]
    if record.scope != "process":
        words.append(f"scope {record.scope}")
    if record.container is not None:
        words.append(f"container {record.container[:CONTAINER_ID_SHOWN]}")
    if record.pod is not None:
        words.append(f"pod {record.pod}")
    return "  ".join(words)


def cmd_enforcements(args: argparse.Namespace, out: TextIO) -> int:
    """The kept records, then (with --follow) each new one as it is made."""
    if args.follow or args.new:
        records = client.follow_enforcements(mount=args.mount, new_only=args.new)
    else:
        records = iter(client.enforcements(mount=args.mount))
    for record in records:
        out.write((record.line if args.json else enforcement_text(record)) + "\n")
        out.flush()
    return 0


def cmd_metrics(args: argparse.Namespace, out: TextIO) -> int:
    text = client.metrics(mount=args.mount)
    if args.textfile is None:
        out.write(text)
        return 0
    write_textfile(Path(args.textfile), text)
    return 0


def write_textfile(directory: Path, text: str, name: str = "restrack.prom") -> Path:
    """For node_exporter's textfile collector: a temp file renamed over, so the
    collector never reads half a file (it ignores names not ending in .prom)."""
    target = directory / name
    temp = directory / f".{name}.{os.getpid()}.tmp"
    try:
        with open(temp, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
    except OSError as error:
        with contextlib.suppress(OSError):  # ENOTDIR too, where DIR is a file
            temp.unlink()
        raise LocalError(f"cannot write {target}: {_local_reason(error)}") from None
    return target


def _local_reason(error: OSError) -> str:
    if error.errno == errno.ENOENT:
        return "no such directory"
    return os.strerror(error.errno or errno.EIO).lower()


def include_dir() -> Path:
    """Where restrack.h lands: inside the installed package."""
    return Path(__file__).parent / "include"


def cmd_cflags(args: argparse.Namespace, out: TextIO) -> int:
    out.write(f"-I{include_dir()}\n")
    return 0


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    from restrackfs.jobquota import StartQuota
    from restrackfs.run import EmulationUnavailable, run

    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        raise OSError(errno.EINVAL, "run: give a program to run: restrack run -- PROGRAM ARGS")
    quota = None
    if args.heap is not None or args.files is not None:
        quota = StartQuota(args.heap, args.files, args.action or "kill", args.tree)
    elif args.action is not None or args.tree:
        option = "--action" if args.action is not None else "--tree"
        raise OSError(errno.EINVAL, f"run: {option} needs --heap or --files")
    try:
        return run(program, mount=args.mount, quota=quota)
    except EmulationUnavailable as error:
        print(f"restrack run: {error}", file=sys.stderr)
        return EXIT_NO_EMULATION


# ----- parsing ----------------------------------------------------------------


def _pid(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise argparse.ArgumentTypeError(f"{text!r} is not a pid")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="restrack",
        description="Track and cap processes' heap and open files through restrackfs.",
        epilog="exit codes: 2 invalid, 3 no such process, 4 already tracked, 5 not tracked, "
        "6 not permitted, 7 quota already set, 8 no daemon at the mount, 1 anything else",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument(
        "--mount", help="mount point (default: $RESTRACK_MOUNT, else /restrack)", default=None
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, run: Callable[..., int], help_text: str, **kw: object
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, **kw)  # type: ignore[arg-type]
        sub.set_defaults(run=run)
        return sub

    sub = add("register", cmd_register, "start tracking processes")
    sub.add_argument("pids", nargs="+", type=_pid, metavar="PID")
    sub = add("deregister", cmd_deregister, "stop tracking processes")
    sub.add_argument("pids", nargs="+", type=_pid, metavar="PID")

    _add_quota_commands(add)

    sub = add("show", cmd_show, "every field of one tracked process")
    sub.add_argument("pid", type=_pid, metavar="PID")
    sub.add_argument("--json", action="store_true", help="one JSON object")

    for name in ("status", "ls"):
        sub = add(name, cmd_status, "one row per tracked process")
        sub.add_argument("--json", action="store_true", help="a JSON list, sizes in bytes")

    sub = add("top", cmd_top, "the status table, refreshed until Ctrl-C, highest use first")
    sub.add_argument("--delay", type=_seconds, default=1.0, help="seconds between refreshes")
    sub.add_argument("--iterations", "-n", type=int, help="stop after N refreshes")

    sub = add(
        "enforcements",
        cmd_enforcements,
        "the daemon's last enforcement actions, one a line; --follow prints new ones as"
        " they happen",
    )
    sub.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new records, as tail -f"
    )
    sub.add_argument(
        "--new", action="store_true", help="follow, printing only records made from now on"
    )
    sub.add_argument("--json", action="store_true", help="each record as the daemon wrote it")

    sub = add("metrics", cmd_metrics, "the Prometheus metrics, or write them for node_exporter")
    sub.add_argument(
        "--textfile", metavar="DIR", help="write DIR/restrack.prom atomically instead of printing"
    )

    sub = add(
        "run",
        cmd_run,
        "run a program with the kernel patch's syscalls emulated, "
        "under a quota from its first instruction if --heap or --files is given",
    )
    sub.add_argument("--heap", metavar="SIZE", help="heap quota: bytes, K/M/G/T suffix, or max")
    sub.add_argument("--files", metavar="N", help="open file quota: a count, or max")
    sub.add_argument(
        "--action", choices=["kill", "deny", "notify"], help="on a breach (default: kill)"
    )
    sub.add_argument(
        "--tree",
        action="store_true",
        help="one quota over the program and every process it starts (not with deny)",
    )
    sub.add_argument("program", nargs=argparse.REMAINDER)
    add("cflags", cmd_cflags, "compiler flags for restrack.h: cc $(restrack cflags) prog.c")
    return parser


def _add_quota_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """`cap` and `reset`: the two commands that change a quota."""
    sub = add("cap", cmd_cap, "set a process's quota (once, until reset)")
    sub.add_argument("pid", type=_pid, metavar="PID")
    sub.add_argument(
        "--heap",
        metavar="SIZE",
        help="bytes, K/M/G/T suffix (a decimal too, as status prints it: 1.5G), or max",
    )
    sub.add_argument("--files", metavar="N", help="open file count, or max")
    sub.add_argument("--action", choices=["kill", "deny", "notify"])
    sub.add_argument(
        "--tree", action="store_true", help="one quota for PID and every process it starts"
    )

    sub = add("reset", cmd_reset, "clear the quota and restart the counters")
    sub.add_argument("pid", type=_pid, metavar="PID")
    what = sub.add_mutually_exclusive_group()
    what.add_argument("--quota", dest="what", action="store_const", const="quota",
                      help="clear the quota only")  # fmt: skip
    what.add_argument("--usage", dest="what", action="store_const", const="usage",
                      help="restart the usage counters only")  # fmt: skip
    sub.set_defaults(what="all")


def _describe(error: OSError) -> str:
    """The client's message as it is (it quotes values, which must keep their case)."""
    return error.strerror or os.strerror(error.errno or errno.EIO).lower()


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        return args.run(args, out)
    except BrokenPipeError:
        return 0
    except NotMountedError as error:
        print(f"restrack: {_describe(error)}", file=sys.stderr)
        return EXIT_NOT_MOUNTED
    except OSError as error:
        print(f"restrack: {_describe(error)}", file=sys.stderr)
        return EXIT_CODES.get(error.errno or 0, EXIT_FAILURE)
    except LocalError as error:
        print(f"restrack: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED if args.command not in ("top", "enforcements") else 0


if __name__ == "__main__":
    sys.exit(main())

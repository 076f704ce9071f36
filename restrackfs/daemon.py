"""The `restrackfs` command: mount the filesystem and serve it until told to stop."""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pyfuse3
import trio

from restrackfs import logformat, logguard, scrape
from restrackfs.files import Caller, read_metrics
from restrackfs.fs import RestrackOperations
from restrackfs.health import Health
from restrackfs.version import version
from tracker.backends.base import BackendUnavailable
from tracker.backends.bpf import backend as bpf_backend
from tracker.engine import state
from tracker.engine.autotrack import (
    AutoTracker,
    Selection,
    in_initial_pid_namespace,
    proc_matches_my_pid_namespace,
)
from tracker.engine.engine import open_engine, release_state
from tracker.errors import InvalidArgument
from tracker.linux import procfs
from tracker.quota import parse_quota

log = logging.getLogger("restrackfs")

STATE_DIR = Path("/run/restrackfs")
_MNT_DETACH = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    return args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="restrackfs",
        description="Mount the per-process resource tracking filesystem.",
    )
    parser.add_argument(
        "mountpoint", type=Path, nargs="?", help="directory to mount on, e.g. /restrack"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument(
        "--release",
        action="store_true",
        help="uninstall: restore the soft limits and remove the pinned BPF programs and maps "
        "that the daemons of this state file (--state, or the mount point's) left enforcing",
    )
    parser.add_argument(
        "-f", "--foreground", action="store_true", help="stay attached to the terminal"
    )
    parser.add_argument(
        "--interval",
        type=int,
        default=100,
        metavar="MS",
        help="quota check period in milliseconds (default 100)",
    )
    parser.add_argument(
        "--engine",
        choices=["auto", "bpf", "procfs"],
        default="auto",
        help="how quotas are watched: bpf (kernel programs, exact), procfs (polling "
        "every --interval), auto (bpf where it loads; default)",
    )
    parser.add_argument("--state", type=Path, metavar="FILE", help="state file to persist to")
    parser.add_argument(
        "--hidepid", action="store_true", help="non-root callers see only their own processes"
    )
    parser.add_argument(
        "--over-volume",
        action="store_true",
        help="MOUNTPOINT is a volume (a mount of its own, e.g. a pod's emptyDir): mount on top",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default info)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=logformat.FORMATS,
        help="text lines (default), or one JSON object a line with the same fields "
        "(and an enforcement line's pid, comm, quota, usage, limit, action as fields)",
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        metavar="FILE",
        help="log here (default: stderr; detached, the state file's name with .log)",
    )
    _add_endpoint_options(parser)
    _add_tracking_options(parser)
    return parser


def _add_endpoint_options(parser: argparse.ArgumentParser) -> None:
    endpoint = parser.add_argument_group("scrape endpoint")
    endpoint.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="also serve root's view of `metrics` at http://HOST:PORT/metrics (off by default)",
    )
    endpoint.add_argument(
        "--hidepid-allow-remote-metrics",
        action="store_true",
        help="with --hidepid, allow a non-loopback --metrics-listen (it shows every process)",
    )


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors the options cannot express, and the defaults that follow from others."""
    if args.mountpoint is None and not (args.release and args.state):
        parser.error("a mount point is needed (or --release --state FILE)")
    if args.interval < 1:
        parser.error("--interval must be at least 1 ms")
    args.selection = _tracking_selection(parser, args)
    if args.metrics_listen is not None:
        try:
            args.metrics_listen = scrape.check_listen(
                args.metrics_listen,
                hidepid=args.hidepid,
                allow_remote=args.hidepid_allow_remote_metrics,
            )
        except ValueError as error:
            parser.error(f"--metrics-listen: {error}")
    if args.mountpoint is not None:
        args.mountpoint = args.mountpoint.absolute()
    if args.state is None:
        args.state = default_state_path(args.mountpoint)
    if args.release:
        args.foreground = True
    if args.log_file is None and not args.foreground:
        args.log_file = args.state.with_suffix(".log")


def _add_tracking_options(parser: argparse.ArgumentParser) -> None:
    tracking = parser.add_argument_group("automatic tracking (sidecars)")
    tracking.add_argument(
        "--track-all",
        action="store_true",
        help="register every process of this PID namespace, and each new one within 1 s",
    )
    tracking.add_argument(
        "--track-comm", metavar="GLOB", help="only processes whose comm matches GLOB"
    )
    tracking.add_argument(
        "--track-children", type=int, metavar="PID", help="only descendants of PID"
    )
    tracking.add_argument(
        "--default-quota",
        metavar="QUOTA",
        help="quota written for each auto-tracked process, e.g. 'heap=1G files=512 action=kill'",
    )
    tracking.add_argument(
        "--yes-all-host-processes",
        action="store_true",
        help="allow --track-all with a kill or deny --default-quota in the host's pid "
        "namespace, where it caps every process of the machine",
    )


def _tracking_selection(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Selection:
    """The automatic tracking the options ask for; a usage error if they contradict."""
    try:
        default_quota = parse_quota(args.default_quota) if args.default_quota else None
    except InvalidArgument as error:
        parser.error(f"--default-quota: {error}")
    selection = Selection(args.track_all, args.track_comm, args.track_children, default_quota)
    if default_quota is not None and not selection.enabled:
        parser.error("--default-quota needs --track-all, --track-comm or --track-children")
    if selection.enabled and not proc_matches_my_pid_namespace():
        parser.error(MISMATCHED_PROC)
    if (
        selection.acts_on_everything
        and not args.yes_all_host_processes
        and in_initial_pid_namespace()
    ):
        parser.error(HOST_NAMESPACE)
    return selection


HOST_NAMESPACE = (
    "refusing --track-all with a kill or deny --default-quota in the host's pid namespace: "
    "it would cap every process of this machine. Run the daemon in the application's pid "
    "namespace (unshare --pid --fork --mount-proc restrackfs ..., or a pod with "
    "shareProcessNamespace), narrow it with --track-comm or --track-children, or give "
    "--yes-all-host-processes if you mean it"
)
MISMATCHED_PROC = (
    "/proc shows another pid namespace than the daemon's (unshare --pid --fork without "
    "--mount-proc?): its pids would name other processes; use unshare --pid --fork --mount-proc"
)


def default_state_path(mountpoint: Path) -> Path:
    """One state file per mount point: /restrack -> /run/restrackfs/restrack.json."""
    name = str(mountpoint).strip("/").replace("-", "--").replace("/", "-") or "root"
    return STATE_DIR / f"{name}.json"


def clear_stale_mount(mountpoint: Path) -> None:
    """Detach a mount left by a killed daemon ("Transport endpoint is not connected")."""
    try:
        os.statvfs(mountpoint)  # stat() may answer from the dead mount's attribute cache
        return
    except OSError as error:
        if error.errno != errno.ENOTCONN:
            return
    log.warning("%s: stale mount of a dead daemon, detaching it", mountpoint)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot detach stale mount {mountpoint}: {os.strerror(err)}")


def _mount_type(mountpoint: Path) -> str | None:
    """The filesystem type of the topmost mount at `mountpoint`, from mountinfo."""
    types = [m.fs_type for m in procfs.read_mountinfo() if m.mount_point == str(mountpoint)]
    return types[-1] if types else None


def _fuse_servers(mountpoint: Path) -> list[tuple[int, str]]:
    """Processes holding /dev/fuse whose command line names `mountpoint`."""
    servers = []
    for pid in procfs.list_pids():
        if pid == os.getpid():
            continue
        try:
            if "/dev/fuse" not in procfs.read_fd_targets(pid):
                continue
            argv = procfs.read_cmdline(pid)
            cwd = procfs.read_cwd(pid)
        except OSError:
            continue  # gone meanwhile, or not ours to look at
        if any(os.path.abspath(os.path.join(cwd, arg)) == str(mountpoint) for arg in argv[1:]):
            servers.append((pid, " ".join(argv)))
    return servers


def already_mounted(mountpoint: Path) -> str:
    """Why the daemon will not mount over a live mount, who holds it, what to do."""
    kind = _mount_type(mountpoint) or "unknown type"
    servers = _fuse_servers(mountpoint) if kind.startswith("fuse") else []
    if servers:
        pids = " ".join(str(pid) for pid, _ in servers)
        who = "; ".join(f"pid {pid}: {command}" for pid, command in servers)
        return (
            f"{mountpoint}: already mounted ({kind}, served by {who}); stop that daemon "
            f"first (kill {pids}), or choose another mount point"
        )
    return (
        f"{mountpoint}: already mounted ({kind}, by no process found here); "
        f"umount {mountpoint} if it is not wanted, or choose another mount point"
    )


def fuse_mounted(mountpoint: Path) -> bool:
    """A FUSE filesystem (a live daemon's) is on top at `mountpoint`: never mounted
    over, even with --over-volume."""
    kind = _mount_type(Path(os.path.realpath(mountpoint)))
    return kind is not None and kind.startswith("fuse")


def mount_options() -> set[str]:
    options = {"fsname=restrackfs", "subtype=restrackfs", "noatime"}
    if os.geteuid() == 0:
        options.add("allow_other")  # the daemon checks every caller itself (docs/security.md)
    return options


def raise_fd_limit() -> None:
    """One pidfd per tracked process: take all the descriptors we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def notify_systemd(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


# How long a pyfuse3 worker keeps reading before it sleeps (patches/: the option
# exists only in the patched build): the next request of a reader on the other
# CPU then finds the daemon awake, which saves a cross-CPU wake-up per request,
# for at most this much CPU time when none follows. It must outlast the reader's
# own wake-up on this kind of VM (~25-30 µs): at 20 µs the poll mostly gave up
# just before the next request. Pooled A/B (bench/levers.md), 0 / 20 / 50 / 100:
# short bursts p50 60-70 / 81-103 / 78-83 / 76-83 µs, p99 400-720 / 480-750 /
# 383-413 / 374-388 µs; one reader reading on 4.7-4.9k / 7.5-10.1k / 10.9-13.9k /
# 12.1k reads/s; isolated reads alike. 50 is the least CPU for the steady reader's 2x.
BUSY_POLL_US = 50


def release(state_path: Path) -> int:
    """`--release`: lift what the daemons of `state_path` left enforcing; exit code."""
    try:
        state.check_location(state_path)
        released = trio.run(release_state, state_path)
        pins = bpf_backend.release_pins(state_path)
    except OSError as error:
        log.error("release %s: %s", state_path, error)
        return 1
    where = f"; pins removed: {pins}" if pins else "; no pins"
    log.info("released %d registrations of %s%s", released, state_path, where)
    return 0


def main_options() -> dict[str, int]:
    """Options for `pyfuse3.main`: busy polling where pyfuse3 is the patched build."""
    try:
        version = metadata.version("pyfuse3")
    except metadata.PackageNotFoundError:
        return {}
    return {"busy_poll_us": BUSY_POLL_US} if "+restrack." in version else {}


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def serve(args: argparse.Namespace, on_ready: Callable[[], None]) -> None:
    async with open_engine(
        state_path=args.state,
        interval=args.interval / 1000,
        helpers_in_background=True,
        backend=args.engine,
    ) as engine:
        ops = RestrackOperations(engine, hidepid=args.hidepid)
        listeners = await scrape.open_listeners(*args.metrics_listen) if args.metrics_listen else []
        pyfuse3.init(ops, str(args.mountpoint), mount_options())
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_terminate_on_signal)
                nursery.start_soon(ops.notices.run_invalidations)
                if args.selection.enabled:
                    nursery.start_soon(AutoTracker(engine, args.selection).run)
                if listeners:
                    render = functools.partial(read_metrics, engine, None, Caller(0, False))
                    health = Health(args.mountpoint, engine)
                    server = scrape.MetricsServer(listeners, render, health=health)
                    nursery.start_soon(server.serve)
                    for address in map(scrape.listener_address, listeners):
                        log.info("metrics endpoint on http://%s/metrics and /healthz", address)
                    if args.hidepid:
                        log.warning("--hidepid: the endpoint shows every process to its clients")
                log.info("mounted on %s (state %s)", args.mountpoint, args.state)
                on_ready()
                await pyfuse3.main(**main_options())
                nursery.cancel_scope.cancel()
        finally:
            ops.notices.detach()
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", args.mountpoint)


def _daemonize(args: argparse.Namespace) -> Callable[[int], None]:
    """Fork into the background; the parent exits once the child reports, saying
    where the log goes (the child's errors until then reach its stderr too).

    Returns the function the child calls with 0 (mounted) or an exit code.
    """
    read_end, write_end = os.pipe()
    child = os.fork()
    if child > 0:
        os.close(write_end)
        status = os.read(read_end, 1)
        code = status[0] if status else 1
        print(detached_message(args, child, code), file=sys.stderr)
        sys.exit(code)
    os.close(read_end)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.chdir("/")
    until_detached = _errors_to_stderr()

    def report(code: int) -> None:
        nonlocal write_end
        if write_end >= 0:
            os.write(write_end, bytes([code]))
            os.close(write_end)
            write_end = -1
            logging.getLogger().removeHandler(until_detached)
            if code == 0:
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)

    return report


def _errors_to_stderr() -> logging.Handler:
    """Errors while starting, on the terminal as well as in the log file."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.ERROR)
    handler.setFormatter(logging.Formatter("restrackfs: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def detached_message(args: argparse.Namespace, pid: int, code: int) -> str:
    """What the parent of a detached daemon says as it exits."""
    if code == 0:
        return f"restrackfs: mounted on {args.mountpoint} (pid {pid}); log: {args.log_file}"
    return f"restrackfs: not started; log: {args.log_file}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.log_file is not None:
        args.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    logformat.configure(args.log_level, args.log_file, args.log_format)
    if args.release:
        sys.exit(release(args.state))
    report: Callable[[int], None] = lambda code: None  # noqa: E731
    if not args.foreground:
        report = _daemonize(args)
    logguard.install()  # one line per record, identical ones rate-limited (every handler)
    try:
        clear_stale_mount(args.mountpoint)
        if not args.mountpoint.is_dir():
            raise OSError(errno.ENOTDIR, f"{args.mountpoint}: not a directory")
        if os.path.ismount(args.mountpoint) and (
            fuse_mounted(args.mountpoint) or not args.over_volume
        ):
            raise OSError(errno.EBUSY, already_mounted(args.mountpoint))
        state.check_location(args.state)
        raise_fd_limit()

        def ready() -> None:
            report(0)
            notify_systemd("READY=1")

        trio.run(serve, args, ready)
    except OSError as error:  # our own errors say it all in words, without [Errno N]
        log.error("%s", error.strerror if error.strerror and error.filename is None else error)
        report(1)
        sys.exit(1)
    except BackendUnavailable as why:  # --engine bpf where it cannot load: the reason only
        log.error("engine %s unavailable: %s", args.engine, why)
        report(1)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
    report(0)


if __name__ == "__main__":
    main()

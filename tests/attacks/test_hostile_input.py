"""Hostile input: every writable file and every mkdir/rmdir name, fuzzed.

Hypothesis throws random bytes, NULs, 1 MiB values, multi-chunk writes on one
descriptor, writes at offsets, O_APPEND, writev, numbers past 64 bits, unit
typos and duplicate keys at one long-lived daemon. Each write's outcome is
compared with an independent model of the grammar written from the README
(not from the code): a rejected write must carry its documented errno and leave a
full snapshot of the state (every readable file, the state file's bytes and
inode, the tracked processes' rlimits) exactly as it was; an accepted one must
read back as the model says. The daemon must stay up, and its log must never
show an unexpected exception.

The normal suite runs a few hundred examples; `scripts/test --long` runs the
`slow` variants with many more. Hostile requests from another uid get a clean errno
and leave no traceback in the log, whose repeated warnings are rate-limited.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import textwrap
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from restrackfs import logguard
from tests.support.daemon import Daemon
from tests.support.mount import opened
from tests.support.tempdirs import shared_tempdir
from tests.support.users import NOBODY, as_user
from tests.support.workload import Workload
from tracker.engine import state as state_file

MAX_WRITE = 4096
LIMIT_MAX = 2**63 - 1
PID_MAX_LIMIT = 4194304  # the kernel's largest pid_max: no pid is ever above it
# C isspace(): what "trailing whitespace" means to a shell user (and in sysfs).
WS = b" \t\n\v\f\r"
SHIFT = {b"": 0, b"k": 10, b"m": 20, b"g": 30, b"t": 40}
BUSY_QUOTA = "heap=1G files=100 action=notify"
FUZZ = int(os.environ.get("RESTRACK_FUZZ_EXAMPLES", "100"))
FUZZ_LONG = int(os.environ.get("RESTRACK_FUZZ_EXAMPLES_LONG", "1500"))

FIGURES: Counter[str] = Counter()


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


EXAMPLES = [
    pytest.param(FUZZ, id="short"),
    pytest.param(FUZZ_LONG, id="long", marks=pytest.mark.slow),
]


# ----- the model of the grammar (README "The files", "Quotas", "Errors") ----------------


def _ws_class(ws: bytes) -> bytes:
    return b"[" + b"".join(b"\\x%02x" % c for c in ws) + b"]"


def model_pid(buf: bytes, ws: bytes = WS) -> int | None:
    """A decimal pid >= 1 with optional trailing whitespace; None: EINVAL."""
    if len(buf) > MAX_WRITE or not buf.isascii():
        return None
    value = buf.rstrip(ws)
    if not re.fullmatch(rb"[0-9]+", value):
        return None
    number = int(value)
    return number if number >= 1 else None


def model_quota(buf: bytes, ws: bytes = WS, max_digits: int | None = None) -> str | None:
    """The quota as it must read back, or None: EINVAL."""
    if len(buf) > MAX_WRITE or not buf.isascii():
        return None
    tokens = [t for t in re.split(_ws_class(ws) + b"+", buf) if t]
    if not tokens:
        return None
    values: dict[bytes, object] = {}
    for token in tokens:
        key, sep, value = token.partition(b"=")
        if not sep or key not in (b"heap", b"files", b"action") or key in values:
            return None
        if key == b"action":
            if value not in (b"kill", b"deny", b"notify"):
                return None
            values[key] = value.decode()
            continue
        if value == b"max":
            values[key] = "max"
            continue
        pattern = rb"([0-9]+)([KMGTkmgt]?)" if key == b"heap" else rb"([0-9]+)()"
        match = re.fullmatch(pattern, value)
        if not match or (max_digits is not None and len(match[1]) > max_digits):
            return None
        number = int(match[1]) << SHIFT[match[2].lower()]
        if number > LIMIT_MAX:
            return None
        values[key] = str(number)
    heap, files = values.get(b"heap", "max"), values.get(b"files", "max")
    return f"heap={heap} files={files} action={values.get(b'action', 'kill')}\n"


def model_reset(buf: bytes, ws: bytes = WS) -> tuple[bool, bool] | None:
    """(clears the quota, restarts usage), or None: EINVAL."""
    if len(buf) > MAX_WRITE or not buf.isascii():
        return None
    kinds = {b"1": (True, True), b"all": (True, True), b"quota": (True, False)}
    kinds[b"usage"] = (False, True)
    return kinds.get(buf.rstrip(ws))


def model_variants(model: Callable, buf: bytes) -> list:
    """The model's answer (a list, so that a known deviation can be allowed here)."""
    return [model(buf)]


# ----- one daemon for the whole module --------------------------------------------------


@dataclass
class World:
    daemon: Daemon
    fresh: Workload  # tracked, no quota
    busy: Workload  # tracked, a quota set by root
    untracked: Workload  # alive, never tracked unless a test registers it
    tracked: set[int] = field(default_factory=set)
    fresh_quota: bool = False
    busy_quota: bool = True
    log_start: int = 0

    def path(self, *parts: object) -> Path:
        return self.daemon.path(*parts)

    def assert_up(self) -> None:
        assert self.daemon.proc is not None and self.daemon.proc.poll() is None, "daemon died"

    def new_log(self) -> str:
        with open(self.daemon.log, "rb") as log:
            log.seek(self.log_start)
            return log.read().decode(errors="replace")

    def restore(self) -> None:
        """Undo what accepted writes did, with root's plain writes."""
        if self.fresh_quota:
            self.daemon.write("1", self.fresh.pid, "reset")
            self.fresh_quota = False
        if not self.busy_quota:
            self.daemon.write(BUSY_QUOTA, self.busy.pid, "quota")
            self.busy_quota = True
        if self.untracked.pid in self.tracked:
            self.daemon.write(str(self.untracked.pid), "deregister")
            self.tracked.discard(self.untracked.pid)


def readable(path: Path) -> bool:
    return bool(os.stat(path).st_mode & 0o444)


DAEMON_SELF_SERIES = ("restrack_exposition_render_seconds ", "restrack_quota_writes_refused_total ")


def snapshot(world: World, identity: bool = True) -> dict[str, object]:
    """Everything a rejected write must leave as it was."""
    d = world.daemon
    snap: dict[str, object] = {"listing": sorted(os.listdir(d.mountpoint))}
    for name in snap["listing"]:  # type: ignore[union-attr]
        path = d.path(name)
        if name.isdigit():
            for child in sorted(os.listdir(path)):
                if readable(path / child):
                    snap[f"{name}/{child}"] = (path / child).read_text()
        elif readable(path):
            snap[name] = path.read_text()
    if "metrics" in snap:  # the daemon's account of itself moves: refusals counted, render time
        snap["metrics"] = "".join(
            line
            for line in str(snap["metrics"]).splitlines(keepends=True)
            if not line.startswith(DAEMON_SELF_SERIES)
        )
    if identity:  # not a byte of the state file moved
        info = os.stat(d.state)
        snap["state"] = (d.state.read_bytes(), info.st_ino, info.st_mtime_ns)
    else:  # what a restart would resume (the journal may have grown meanwhile)
        snap["state"] = sorted(state_file.load(d.state), key=lambda record: record["pid"])
    for w in (world.fresh, world.busy, world.untracked):
        snap[f"limits {w.pid}"] = Path(f"/proc/{w.pid}/limits").read_text()
    return snap


@pytest.fixture(scope="module")
def world(workload_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("hostile")
    daemon = Daemon(shared_tempdir("restrack-mnt-"), tmp / "state.json", tmp / "daemon.log")
    daemon.start()
    workloads = [Workload(workload_binary) for _ in range(3)]
    fresh, busy, untracked = workloads
    daemon.register(fresh.pid)
    daemon.register(busy.pid)
    daemon.write(BUSY_QUOTA, busy.pid, "quota")
    world = World(daemon, fresh, busy, untracked, tracked={fresh.pid, busy.pid})
    world.log_start = daemon.log.stat().st_size
    try:
        yield world
    finally:
        for w in workloads:
            w.stop()
        if daemon.proc is not None:
            daemon.stop()
        subprocess.run(["umount", "-l", str(daemon.mountpoint)], capture_output=True)
        shutil.rmtree(daemon.mountpoint, ignore_errors=True)
        print(f"\nhostile figures: {dict(FIGURES)}")


@pytest.fixture
def clean(world: World) -> Iterator[World]:
    """Each test starts and ends with the module's world as it was set up."""
    world.restore()
    before = snapshot(world, identity=False)
    yield world
    world.assert_up()
    world.restore()
    assert snapshot(world, identity=False) == before
    log = world.new_log()
    assert "unexpected error" not in log and "Traceback" not in log, log[-3000:]


# ----- strategies -------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(0, 2**16).map(str),
    st.integers(0, 2**70).map(str),
    st.integers(-(2**70), -1).map(str),
    st.sampled_from(
        [
            str(2**63 - 1),
            str(2**63),
            str(2**64 - 1),
            str(2**64),
            str(2**128),
            "9" * 40,
            "0",
            "00",
            "0" * 25 + "7",
            "8388607",
            "8388608",
            "8796093022208",
        ]
    ),  # fmt: skip
    st.builds(lambda n, z: "0" * z + str(n), st.integers(0, 10**6), st.integers(1, 30)),
    st.sampled_from(["+5", "5.0", "1.5", "1e3", "0x10", "5_0", "٥", "５", "Ⅻ", " 5", "5 5", "-0"]),
)
SUFFIXES = st.sampled_from(
    ["", "", "K", "M", "G", "T", "k", "m", "g", "t", "KB", "MB", "Mi", "KiB", "b", "B", "P",
     "E", "%", " M", "MM"]
)  # fmt: skip
SIZES = st.one_of(
    st.builds(str.__add__, NUMBERS, SUFFIXES),
    st.sampled_from(["max", "MAX", "Max", "unlimited", "-1", "", "none", "inf", "max "]),
)
ACTIONS = st.sampled_from(["kill", "deny", "notify", "KILL", "Kill", "stop", "", "kill,deny"])
KEYS = st.sampled_from(
    ["heap", "files", "action", "HEAP", "Heap", "hea", "heaps", "file", "", "heap ", "=", "pid"]
)
TOKENS = st.one_of(
    st.builds("heap={}".format, SIZES),
    st.builds("files={}".format, SIZES),
    st.builds("action={}".format, ACTIONS),
    st.builds("{}={}".format, KEYS, st.one_of(SIZES, ACTIONS)),
    st.sampled_from(["heap", "files", "heap==1", "=5", "heap=1=2", "files=1K", "heap=1M,"]),
    st.text(max_size=12),
)
SEPARATORS = st.sampled_from([" ", " ", "  ", "\t", "\n", " \t ", ",", ";", "\0", "\x1c", "\x0b"])
TRAILERS = st.sampled_from(["", "\n", "\n", " \n", "\r\n", "\0", "\n\n", "\t", "\x1f", "\n\0"])
LEADERS = st.sampled_from(["", "", "", " ", "\t", "\n", "\0", "\ufeff"])


@st.composite
def quota_texts(draw: st.DrawFn) -> bytes:
    tokens = draw(st.lists(TOKENS, max_size=5))
    text = draw(LEADERS)
    for index, token in enumerate(tokens):
        text += (draw(SEPARATORS) if index else "") + token
    return (text + draw(TRAILERS)).encode("utf-8", "surrogatepass")


VALID_SIZES = st.one_of(
    st.builds(
        lambda n, s: f"{n}{s}", st.integers(0, 2**40), st.sampled_from(list("KMGTkmgt") + [""])
    ),
    st.just("max"),
    st.just(str(LIMIT_MAX)),
)
VALID_TOKENS = {
    "heap": VALID_SIZES.map("heap={}".format),
    "files": st.one_of(st.integers(0, LIMIT_MAX).map(str), st.just("max")).map("files={}".format),
    "action": st.sampled_from(["kill", "deny", "notify"]).map("action={}".format),
}


@st.composite
def valid_quota_texts(draw: st.DrawFn) -> bytes:
    """Well-formed quotas: any subset of the keys in any order, trailing whitespace."""
    keys = draw(
        st.lists(st.sampled_from(sorted(VALID_TOKENS)), min_size=1, max_size=3, unique=True)
    )
    separator = draw(st.sampled_from([" ", "  ", "\t", " \t"]))
    text = separator.join(draw(VALID_TOKENS[key]) for key in keys)
    return (text + draw(st.sampled_from(["", "\n", " \n", "\r\n"]))).encode()


def duplicated_keys() -> st.SearchStrategy[bytes]:
    """A well-formed quota with one of its keys given again (any value): EINVAL."""
    again = st.sampled_from(sorted(VALID_TOKENS)).flatmap(lambda key: VALID_TOKENS[key])
    return st.builds(
        lambda text, token: text.rstrip() + b" " + token.encode(), valid_quota_texts(), again
    ).filter(lambda text: len({t.split(b"=")[0] for t in text.split()}) < len(text.split()))


RESET_WORDS = st.sampled_from(
    ["1", "all", "quota", "usage", "ALL", "Usage", "2", "0", "11", "1 1", "quotas", "reset",
     "yes", "true", "", "all usage", "usage,quota"]
)  # fmt: skip


@st.composite
def reset_texts(draw: st.DrawFn) -> bytes:
    return (draw(LEADERS) + draw(RESET_WORDS) + draw(TRAILERS)).encode("utf-8", "surrogatepass")


def pid_texts(world: World) -> st.SearchStrategy[bytes]:
    """Pids named in every way: tracked ones dressed up, far too large ones, malformed."""
    known = st.sampled_from(sorted(world.tracked))
    dressed = st.builds(
        lambda zeros, pid, trailer: "0" * zeros + str(pid) + trailer,
        st.integers(0, 3),
        known,
        TRAILERS,
    )
    huge = st.builds(str, st.integers(PID_MAX_LIMIT + 1, 2**130))
    return st.one_of(dressed, huge, NUMBERS, st.builds(str.__add__, NUMBERS, TRAILERS)).map(
        lambda text: text.encode("utf-8", "surrogatepass")
    )


def oversized(base: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A value padded with trailing spaces to a size around and far past 4096 bytes."""
    sizes = st.sampled_from([4095, 4096, 4097, 8192, 65536, 131072, 131073, 1 << 20])
    return st.builds(lambda value, size: value + b" " * max(0, size - len(value)), base, sizes)


def payloads(structured: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        structured,
        structured,
        structured,
        st.binary(max_size=64),
        st.binary(min_size=4000, max_size=4200),
        st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
        oversized(structured),
    )


# ----- writing ---------------------------------------------------------------------------

MODES = st.sampled_from(["write", "write", "trunc", "append", "pwrite", "writev", "rdwr"])


def do_write(fd: int, mode: str, chunk: bytes, offset: int) -> int:
    """One write() carrying `chunk`; 0 or the errno."""
    FIGURES["writes tried"] += 1
    try:
        if mode == "pwrite":
            written = os.pwrite(fd, chunk, offset)
        elif mode == "writev":
            cut = len(chunk) // 2
            written = os.writev(fd, [chunk[:cut], chunk[cut:]])
        else:
            written = os.write(fd, chunk)
    except OSError as error:
        FIGURES["writes rejected"] += 1
        return error.errno
    assert written == len(chunk), f"short write {written} of {len(chunk)}"
    return 0


def open_for(path: Path, mode: str) -> int:
    flags = {"trunc": os.O_TRUNC, "append": os.O_APPEND}.get(mode, 0)
    access = os.O_RDWR if mode == "rdwr" and readable(path) else os.O_WRONLY
    return os.open(path, access | flags)


def expect(world: World, target: str, buf: bytes) -> set[int]:
    """The outcomes (0 = accepted, else errno) the model allows, applying accepted ones."""
    if buf == b"":
        return {0}  # the kernel answers a zero-byte write; nothing changes
    allowed: set[int] = set()
    if target == "register":
        for pid in model_variants(model_pid, buf):
            if pid is None:
                allowed.add(errno.EINVAL)
            elif pid in world.tracked:
                allowed.add(errno.EEXIST)
            elif pid == world.untracked.pid:
                allowed.add(0)
            elif pid > PID_MAX_LIMIT or not os.path.exists(f"/proc/{pid}"):
                allowed.add(errno.ESRCH)
            else:
                assume(False)  # some other live process: not ours to register
    elif target == "deregister":
        for pid in model_variants(model_pid, buf):
            if pid is None:
                allowed.add(errno.EINVAL)
            elif pid in (world.fresh.pid, world.busy.pid):
                assume(False)  # would tear down the world
            elif pid in world.tracked:
                allowed.add(0)
            else:
                allowed.add(errno.ESRCH)
    elif target.endswith("quota"):
        has_quota = world.busy_quota if target.startswith("busy") else world.fresh_quota
        for quota in model_variants(model_quota, buf):
            if quota is None:
                allowed.add(errno.EINVAL)
            elif has_quota:
                allowed.add(errno.EBUSY)
            else:
                allowed.add(0)
    elif target.endswith("reset"):
        for kind in model_variants(model_reset, buf):
            allowed.add(errno.EINVAL if kind is None else 0)
    else:
        raise AssertionError(target)
    return allowed


def applied(world: World, target: str, buf: bytes) -> None:
    """Bring the world's bookkeeping up to date after an accepted write, and check it."""
    if buf == b"":
        return
    w = world.busy if target.startswith("busy") else world.fresh
    if target == "register":
        world.tracked.add(world.untracked.pid)
        assert os.path.isdir(world.path(world.untracked.pid))
    elif target == "deregister":
        world.tracked.discard(world.untracked.pid)
        assert not os.path.exists(world.path(world.untracked.pid))
    elif target.endswith("quota"):
        assert target == "fresh/quota"
        quotas = {q for q in model_variants(model_quota, buf) if q is not None}
        assert world.daemon.read(w.pid, "quota") in quotas
        world.fresh_quota = True
    elif target.endswith("reset"):
        kinds = {k for k in model_variants(model_reset, buf) if k is not None}
        if any(clears for clears, _ in kinds):
            assert world.daemon.read(w.pid, "quota") == "heap=max files=max action=kill\n"
            if target.startswith("busy"):
                world.busy_quota = False
            else:
                world.fresh_quota = False


def target_path(world: World, target: str) -> Path:
    if "/" not in target:
        return world.path(target)
    who, name = target.split("/")
    return world.path((world.busy if who == "busy" else world.fresh).pid, name)


def check_writes(world: World, target: str, chunks: list[bytes], mode: str, offset: int) -> None:
    world.restore()
    before = snapshot(world)
    before_logical = snapshot(world, identity=False)
    path = target_path(world, target)
    accepted = False
    fd = open_for(path, mode)
    try:
        for chunk in chunks:
            allowed = expect(world, target, chunk)
            got = do_write(fd, mode, chunk, offset)
            assert got in allowed, (
                f"{target} {mode}: {chunk[:120]!r}{'...' if len(chunk) > 120 else ''} "
                f"({len(chunk)} bytes) gave {errno.errorcode.get(got, got)}, "
                f"want one of {[errno.errorcode.get(a, a) for a in allowed]}"
            )
            outcome = "empty" if chunk == b"" else "accepted" if got == 0 else "rejected"
            FIGURES[f"{target}: {outcome}"] += 1
            if got == 0:
                applied(world, target, chunk)
                accepted = accepted or chunk != b""
    finally:
        os.close(fd)
    world.assert_up()
    if not accepted:
        assert snapshot(world) == before, "a rejected write changed the state"
        FIGURES["rejected examples with state unchanged"] += 1
    else:
        world.restore()
        assert snapshot(world, identity=False) == before_logical


WRITABLE_TARGETS = ["register", "deregister", "fresh/quota", "busy/quota", "fresh/reset"]
WRITABLE_TARGETS += ["busy/reset"]


def test_every_writable_file_has_a_model(world):
    """A writable file added later must get a model here (and so be fuzzed)."""
    top = {n for n in os.listdir(world.daemon.mountpoint) if not n.isdigit()}
    writable = {n for n in top if os.stat(world.path(n)).st_mode & 0o222}
    pid_dir = world.path(world.fresh.pid)
    writable |= {f"PID/{n}" for n in os.listdir(pid_dir) if os.stat(pid_dir / n).st_mode & 0o222}
    assert writable == {"register", "deregister", "PID/quota", "PID/reset"}


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("target", WRITABLE_TARGETS)
def test_fuzz_writes(clean, target, examples):
    world = clean
    structured = {
        "register": pid_texts(world),
        "deregister": pid_texts(world),
        "fresh/quota": st.one_of(quota_texts(), valid_quota_texts(), duplicated_keys()),
        "busy/quota": st.one_of(quota_texts(), valid_quota_texts(), duplicated_keys()),
        "fresh/reset": reset_texts(),
        "busy/reset": reset_texts(),
    }[target]

    @fuzz_settings(examples)
    @given(
        chunks=st.lists(payloads(structured), min_size=1, max_size=3),
        mode=MODES,
        offset=st.one_of(st.just(0), st.integers(1, 2**40)),
    )
    def run(chunks: list[bytes], mode: str, offset: int) -> None:
        check_writes(world, target, chunks, mode, offset)

    run()


# ----- mkdir and rmdir names ------------------------------------------------------------

NAME_BYTES = st.binary(min_size=1, max_size=40).map(
    lambda b: b.replace(b"/", b"").replace(b"\0", b"")
)


@st.composite
def dir_names(draw: st.DrawFn, world: World) -> bytes:
    name = draw(
        st.one_of(
            NAME_BYTES,
            pid_texts(world).map(lambda b: b.replace(b"\0", b"")),
            st.sampled_from([b"register", b"metrics", b"deregister", b"events", b"..."]),
            st.builds(lambda n: b"9" * n, st.integers(20, 255)),
            st.sampled_from([b"-1", b"0", b"1 ", b"\n", b" ", b"1\n2", b"%d", b"\xff\xfe"]),
        )
    )
    assume(name not in (b"", b".", b"..") and b"/" not in name and b"\0" not in name)
    return name[:255]


def model_dir_name(name: bytes) -> int | None:
    """A process directory has one name, the pid's canonical spelling (no leading
    zero, no whitespace): an alias would outlive the directory in the kernel's cache
    (test_a_non_canonical_name_never_names_a_process_directory)."""
    pid = model_pid(name)
    return pid if pid is not None and name == str(pid).encode() else None


def expect_mkdir(world: World, name: bytes, top: set[bytes]) -> set[int]:
    if name in top:
        return {errno.EEXIST}
    pid = model_dir_name(name)
    if pid is None:
        return {errno.EINVAL}
    if pid in world.tracked:
        return {errno.EEXIST}
    if pid > PID_MAX_LIMIT or not os.path.exists(f"/proc/{pid}"):
        return {errno.ESRCH}
    assume(False)  # a live process: not ours to register
    return set()


def expect_rmdir(world: World, name: bytes, top: set[bytes]) -> set[int]:
    if name in top:
        return {errno.ENOTDIR}
    assume(model_dir_name(name) not in world.tracked)  # would tear down the world
    # The kernel looks the name up before rmdir reaches the daemon, so a malformed
    # name is simply missing: ENOENT (the documented errors list EINVAL for a malformed rmdir,
    # which no filesystem can answer; it is the same "missing directory" case).
    return {errno.ENOENT}


@pytest.mark.parametrize("examples", EXAMPLES)
def test_fuzz_mkdir_and_rmdir_names(clean, examples):
    world = clean
    top = {n.encode() for n in os.listdir(world.daemon.mountpoint) if not n.isdigit()}
    mount = bytes(world.daemon.mountpoint)

    @fuzz_settings(examples)
    @given(name=dir_names(world), rmdir=st.booleans())
    def run(name: bytes, rmdir: bool) -> None:
        world.restore()
        allowed = (expect_rmdir if rmdir else expect_mkdir)(world, name, top)
        before = snapshot(world)
        FIGURES["mkdir/rmdir names tried"] += 1
        try:
            (os.rmdir if rmdir else os.mkdir)(mount + b"/" + name)
            got = 0
        except OSError as error:
            got = error.errno
        assert got in allowed, f"{'rmdir' if rmdir else 'mkdir'} {name!r}: {got}, want {allowed}"
        world.assert_up()
        assert snapshot(world) == before

    run()


def test_mkdir_in_a_process_directory_is_eperm_for_any_name(clean):
    world = clean
    before = snapshot(world)
    for name in [b"x", b"123", str(world.untracked.pid).encode(), b"\xff", b"a" * 255]:
        path = bytes(world.path(world.fresh.pid)) + b"/" + name
        with pytest.raises(OSError) as info:
            os.mkdir(path)
        assert info.value.errno == errno.EPERM, name
    assert snapshot(world) == before


def test_register_a_kernel_thread_is_esrch(clean):
    """kthreadd has no address space to measure: like a zombie, no such process."""
    world = clean
    if "kthreadd" not in Path("/proc/2/status").read_text():
        pytest.skip("no kthreadd visible here")
    before = snapshot(world)
    with pytest.raises(OSError) as info:
        world.daemon.register(2)
    assert info.value.errno == errno.ESRCH
    assert snapshot(world) == before


# ----- the register accepted path, in every form -----------------------------------------


@pytest.mark.parametrize("form", ["{}", "{}\n", "{} \t\n", "000{}", "{}\r\n", "{}\v\f"], ids=repr)
@pytest.mark.parametrize("how", ["write", "pwrite", "append", "writev"])
def test_register_forms_are_accepted_and_undone(clean, form, how):
    world = clean
    before = snapshot(world, identity=False)
    text = form.format(world.untracked.pid).encode()
    fd = open_for(world.path("register"), {"append": "append"}.get(how, "write"))
    try:
        assert do_write(fd, how, text, 1 << 33) == 0
    finally:
        os.close(fd)
    world.tracked.add(world.untracked.pid)
    assert os.path.isdir(world.path(world.untracked.pid))
    world.restore()
    assert snapshot(world, identity=False) == before


# ----- chunks ----------------------------------------------------------------------------


def test_one_value_split_over_two_writes_is_two_bad_values(clean):
    """sysfs: each write() is one whole value, so "hea" + "p=1M" is two EINVALs."""
    world = clean
    before = snapshot(world)
    with opened(world, world.fresh.pid, "quota", flags=os.O_WRONLY) as fd:
        assert do_write(fd, "write", b"hea", 0) == errno.EINVAL
        assert do_write(fd, "write", b"p=1M", 0) == errno.EINVAL
    assert snapshot(world) == before


def test_writev_of_one_value_in_pieces_is_one_value(clean):
    world = clean
    with opened(world, world.fresh.pid, "quota", flags=os.O_WRONLY) as fd:
        assert os.writev(fd, [b"heap=", b"3M", b" files=", b"7\n"]) == 16
    world.fresh_quota = True
    assert world.daemon.read(world.fresh.pid, "quota") == "heap=3145728 files=7 action=kill\n"


def test_a_huge_write_is_refused_whole_not_in_pieces(clean):
    """1 MiB of "1\\n" repeated: the kernel cuts it into max_write requests; the first
    is already over 4096 bytes, so nothing at all is accepted."""
    world = clean
    before = snapshot(world)
    for target, value in [("fresh/reset", b"1\n"), ("fresh/quota", b"files=1\n")]:
        fd = os.open(target_path(world, target), os.O_WRONLY)
        try:
            assert do_write(fd, "write", value * ((1 << 20) // len(value)), 0) == errno.EINVAL
        finally:
            os.close(fd)
    assert snapshot(world) == before


# ----- concurrent writes to the same file ------------------------------------------------


def race(n: int, action: Callable[[int], None]) -> list[int]:
    """Run `action(i)` in n threads released together; their outcomes (0 or errno)."""
    barrier = threading.Barrier(n)
    outcomes = [-1] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            action(i)
            outcomes[i] = 0
        except OSError as error:
            outcomes[i] = error.errno

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    FIGURES["writes tried"] += n
    FIGURES["concurrent writes"] += n
    return outcomes


ROUNDS = 12


def test_concurrent_quota_writes_one_wins(clean):
    world, d, pid = clean, clean.daemon, clean.fresh.pid
    for _ in range(ROUNDS):
        outcomes = race(8, lambda i: d.write(f"files={i + 1} action=notify", pid, "quota"))
        assert sorted(outcomes) == [0] + [errno.EBUSY] * 7, outcomes
        winner = outcomes.index(0)
        assert d.read(pid, "quota") == f"heap=max files={winner + 1} action=notify\n"
        d.write("1", pid, "reset")
    world.assert_up()


def test_concurrent_register_and_mkdir_one_wins(clean):
    world, d, pid = clean, clean.daemon, clean.untracked.pid
    for _ in range(ROUNDS):

        def register(i: int) -> None:
            if i % 2:
                os.mkdir(d.path(pid))
            else:
                d.register(pid)

        outcomes = race(8, register)
        assert sorted(outcomes) == [0] + [errno.EEXIST] * 7, outcomes
        outcomes = race(8, lambda i: d.write(f"{pid}\n", "deregister"))
        assert sorted(outcomes) == [0] + [errno.ESRCH] * 7, outcomes
        assert str(pid) not in os.listdir(d.mountpoint)
    world.assert_up()


def test_concurrent_resets_and_invalid_writes_on_one_file(clean):
    """Valid and invalid writes interleaved on the same descriptor and on others."""
    world, d, pid = clean, clean.daemon, clean.busy.pid
    fd = os.open(d.path(pid, "reset"), os.O_WRONLY)
    values = [b"usage\n", b"bogus", b"usage", b"\0", b"x" * 5000, b"usage \n", b"ALL", b"usage"]
    try:
        for _ in range(ROUNDS):
            outcomes = race(8, lambda i: os.write(fd, values[i]) and None)
            valid = [model_reset(v) is not None for v in values]
            assert outcomes == [0 if ok else errno.EINVAL for ok in valid]
    finally:
        os.close(fd)
    assert d.read(pid, "quota") == "heap=1073741824 files=100 action=notify\n"
    world.assert_up()


# ----- found by the fuzzing --------------------------------------------------------------


def test_python_only_whitespace_is_refused(clean):
    """Found by the fuzzing: str.rstrip()/str.split() took \\x1c-\\x1f for whitespace,
    so '1\\x1c' reset and 'files=1\\x1fheap=2' set a quota (README: trailing whitespace
    is accepted 'and nothing else is')."""
    world = clean
    before = snapshot(world)
    outcomes = []
    for target, text in [("fresh/reset", b"1\x1c"), ("fresh/quota", b"files=1\x1fheap=2")]:
        fd = os.open(target_path(world, target), os.O_WRONLY)
        try:
            outcomes.append(do_write(fd, "write", text, 0))
        finally:
            os.close(fd)
    if outcomes[1] == 0:
        world.fresh_quota = True
    assert outcomes == [errno.EINVAL, errno.EINVAL]
    assert snapshot(world) == before


def test_zero_padded_quota_value_is_its_value(clean):
    """Found by the fuzzing: sizes and counts were cut at 19 digits before their value
    was known, so 'files=0000000000000000000000001' was EINVAL (README: only 'a value
    over 2^63-1' is)."""
    world = clean
    world.daemon.write("files=" + "0" * 24 + "1", world.fresh.pid, "quota")
    world.fresh_quota = True
    assert world.daemon.read(world.fresh.pid, "quota") == "heap=max files=1 action=kill\n"


# ----- non-canonical directory names ----------------------------------------------------


def test_a_non_canonical_name_never_names_a_process_directory(clean):
    """Found by this file: lookup took '0PID' or 'PID\\n' for PID's directory, and on
    exit only 'PID' was invalidated: the alias stayed in the kernel's cache (300 s),
    so stat() of it succeeded long after the directory was gone. A process directory
    now has one name."""
    world, d, pid = clean, clean.daemon, clean.untracked.pid
    d.register(pid)
    world.tracked.add(pid)
    mount = bytes(d.mountpoint)
    aliases = [b"0" + str(pid).encode(), str(pid).encode() + b"\n", str(pid).encode() + b" "]
    for alias in aliases:
        assert not os.path.exists(mount + b"/" + alias), alias
        with pytest.raises(OSError) as info:
            os.mkdir(mount + b"/" + alias)
        assert info.value.errno in (errno.EEXIST, errno.EINVAL), alias
        with pytest.raises(OSError) as info:
            os.rmdir(mount + b"/" + alias)
        assert info.value.errno == errno.ENOENT, alias
    assert os.path.isdir(d.path(pid))
    d.write(str(pid), "deregister")
    world.tracked.discard(pid)
    assert not any(os.path.exists(mount + b"/" + alias) for alias in aliases)
    assert not os.path.exists(d.path(pid))


# ----- quotas that are valid but hurt the daemon -----------------------------------------


def responsive(daemon: Daemon, timeout: float = 3.0) -> bool:
    """Does the mount answer a read within `timeout` (from a process we can abandon)?"""
    try:
        result = subprocess.run(
            ["cat", str(daemon.path("metrics"))], capture_output=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def test_huge_deny_file_quota_does_not_hang_the_daemon(daemon_factory, spawn):
    """Found by this fuzzing: the limit was searched fd number by fd number up to the
    quota, in the event loop, so files=2^63-1 hung the daemon for every user (fixed in
    3f33efc). Any user may write this to their own process's quota."""
    daemon = daemon_factory()
    w = spawn(uid=NOBODY)
    daemon.register(w.pid)
    quota = str(daemon.path(w.pid, "quota"))
    writer = subprocess.Popen(
        as_user(NOBODY, ["sh", "-c", f"echo 'files={LIMIT_MAX} action=deny' > {quota}"]),
        stderr=subprocess.DEVNULL,
    )
    try:
        alive = responsive(daemon)
    finally:
        if not alive:  # nothing else stops it
            daemon.proc.kill()
            daemon.proc.wait()
            daemon.proc = None
        writer.wait(20)
    assert alive, "the daemon stopped answering after one user's quota write"


def test_huge_deny_heap_quota_is_not_eio(daemon_factory, spawn):
    """Found by the fuzzing: the baseline plus a quota of 2^63-1 went past 2^63-1 into
    prlimit(): OverflowError, answered EIO. The limit stays the process's own."""
    daemon = daemon_factory()
    w = spawn()
    daemon.register(w.pid)
    daemon.write(f"heap={LIMIT_MAX} action=deny", w.pid, "quota")
    assert daemon.read(w.pid, "quota") == f"heap={LIMIT_MAX} files=max action=deny\n"
    assert "unexpected error" not in daemon.log_text()


# ----- the log under hostile requests ---------------------------------------------------


# 1000 requests a user may make, run as nobody; prints the errno each kind got.
HOSTILE = textwrap.dedent(
    """
    import collections, json, os, sys
    mount, own = sys.argv[1], sys.argv[2]
    digits = "9" * 4096

    def write(path, text):
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    requests = {
        "4096 digits > register": lambda: write(f"{mount}/register", digits),
        "4096 digits > deregister": lambda: write(f"{mount}/deregister", digits[1:] + "\\n"),
        "mkdir 255 digits": lambda: os.mkdir(f"{mount}/{'9' * 255}"),
        "escapes > quota": lambda: write(f"{mount}/{own}/quota", "heap=\\x1b[2J\\r\\u2028"),
        "4097 bytes > register": lambda: write(f"{mount}/register", "1" + " " * 4096),
    }
    seen = collections.defaultdict(collections.Counter)
    for _ in range(200):
        for name, request in requests.items():
            try:
                request()
                seen[name]["ok"] += 1
            except OSError as error:
                seen[name][os.strerror(error.errno)] += 1
    print(json.dumps(seen))
    """
)


def test_hostile_requests_get_a_clean_errno_and_log_no_traceback(daemon, named):
    """Found by a review: 4096 digits written to `register` gave EIO and a ~5 KiB
    traceback (ENAMETOOLONG from /proc/<digits>); 1000 such writes made 5 MiB of log in
    1.6 s. A number no pid can be is now ESRCH (a pid is a decimal integer >= 1 that
    names no process), decided before any path is built; 1000 hostile requests by a
    user log nothing."""
    own = named()
    daemon.register(own.pid)
    size_before = daemon.log.stat().st_size
    argv = as_user(NOBODY, ["/usr/bin/python3", "-c", HOSTILE, daemon.mountpoint, own.pid])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    srch, inval = os.strerror(errno.ESRCH), os.strerror(errno.EINVAL)
    assert json.loads(result.stdout) == {
        "4096 digits > register": {srch: 200},
        "4096 digits > deregister": {srch: 200},
        "mkdir 255 digits": {srch: 200},
        "escapes > quota": {inval: 200},
        "4097 bytes > register": {inval: 200},
    }
    grown = daemon.log.read_bytes()[size_before:].decode(errors="replace")
    assert "Traceback" not in grown
    assert len(grown) < 4096, grown[-2000:]


def test_identical_warnings_are_rate_limited_with_a_count(daemon, spawn):
    """A user can make the daemon warn as often as they like (here a notify quota
    crossed and uncrossed 300 times, each crossing seen by a read): identical lines
    past 10 in 5 s are counted, not written; the counters of `events` stay exact."""
    own = spawn(uid=NOBODY)
    daemon.register(own.pid)
    daemon.write("files=0 action=notify", own.pid, "quota")
    for _ in range(300):
        own.do("open", 1)
        assert daemon.read(own.pid, "openfile_count") == "1\n"
        own.do("close", 1)
        assert daemon.read(own.pid, "openfile_count") == "0\n"
    assert "notified 300\n" in daemon.read(own.pid, "events")
    crossing = f"pid={own.pid} comm=workload quota=files usage=1 limit=0 action=notify"
    assert daemon.log_text().count(crossing) == logguard.BURST

"""Tree quotas in the kernel (tracker/backends/bpf: `trees`, group_fork, set_tree)
against the real kernel, at the loader's level: the test plays the daemon.

c/treegrow.c forks children (and grandchildren, and exec'd children) that map
or open in steps; the kernel adds each one to its parent's tree at fork and
moves the tree's sums at each of a member's checked calls. Measured figures
(usage at the kill, the fork round trip) are printed: run with -s to see them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.procs import PAGE, MiB, exited, open_fds, proc_vm_data, start_time
from tests.support.waiting import wait_until
from tracker.backends.bpf.loader import Event, KernelWatch, Kind, TreeState

KILL_QUOTA = 64 * MiB
STEP = MiB


class TreeGrow:
    """One treegrow process: commands in, the lines its tree writes collected."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen(
            [binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.lines: list[str] = []
        self._more = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.pid = int(self.wait_for("ready")[0].split()[1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._more:
                self.lines.append(line.strip())
                self._more.notify_all()

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def wait_for(self, word: str, count: int = 1, timeout: float = 10) -> list[str]:
        """The first `count` lines that start with `word`, waiting for them."""

        def found() -> list[str]:
            return [line for line in self.lines if line.split()[0] == word]

        with self._more:
            if not self._more.wait_for(lambda: len(found()) >= count, timeout):
                pytest.fail(f"treegrow: {count} {word!r} lines not seen: {self.lines[-5:]}")
            return found()[:count]

    def pids(self, word: str, count: int = 1) -> list[int]:
        return [int(line.split()[1]) for line in self.wait_for(word, count)]

    def steps_of(self, pid: int) -> int:
        """The steps `pid` wrote it had made."""
        return sum(1 for line in list(self.lines) if line.startswith(f"step {pid} "))

    def stop(self) -> None:
        """Its whole process group killed (it made one at start), then reaped."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def treegrow(treegrow_binary: Path) -> Iterator[Callable[[], TreeGrow]]:
    started: list[TreeGrow] = []

    def start() -> TreeGrow:
        started.append(TreeGrow(treegrow_binary))
        return started[-1]

    yield start
    for one in started:
        one.stop()


def vm_data_pages(pid: int) -> int:
    return proc_vm_data(pid) // PAGE


def set_tree(kw: KernelWatch, root: int, *, heap: int | None = None, files: int | None = None,
             action: str = "kill") -> tuple[int, int]:  # fmt: skip
    """A tree quota on `root` over its usage now; its bases (pages, fds)."""
    heap_base, fd_base = vm_data_pages(root), open_fds(root)
    heap_limit = None if heap is None else heap_base + heap // PAGE
    fd_limit = None if files is None else fd_base + files
    kw.watch_tree(root, start_time(root), heap_limit, fd_limit, action, heap_base, fd_base)
    return heap_base, fd_base


def tree_events(kw: KernelWatch, root: int, until: Kind, timeout: float = 10) -> list[Event]:
    """The events of the tree of `root`, waiting until one of kind `until` came."""
    seen: list[Event] = []

    def arrived() -> bool:
        seen.extend(event for event in kw.drain() if event.tgid == root)
        return any(event.kind == until for event in seen)

    wait_until(arrived, timeout, f"{until.name} for the tree of {root}")
    return seen


def state(kw: KernelWatch, root: int) -> TreeState:
    tree = kw.tree(root)
    assert tree is not None, f"no tree for {root}"
    return tree


def proc_sums(members: list[int]) -> tuple[int, int]:
    """VmData pages and open descriptors added up over `members`, from /proc."""
    return sum(map(vm_data_pages, members)), sum(map(open_fds, members))


def assert_sums_are_procs(kw: KernelWatch, root: int) -> None:
    """The kernel's sums equal /proc's over the live members, which it lists."""
    members = kw.tree_members(root)
    tree = state(kw, root)
    assert tree.members == len(members)
    assert (tree.heap_pages, tree.fds) == proc_sums(members)


def gone(pids: list[int]) -> bool:
    return all(exited(pid) for pid in pids)


# --- a fan-out under a kill quota ---------------------------------------------------

FAN_OUTS = [("mmap", 1), ("mmap", 8), ("mmap", 64), ("open", 8)]


@pytest.mark.parametrize(("mode", "n"), FAN_OUTS, ids=[f"{m}-{n}" for m, n in FAN_OUTS])
def test_fan_out_killed_in_the_crossing_call(tree_watch: KernelWatch, treegrow, mode, n) -> None:
    """N children step at once; the member whose call crosses is killed in it, the
    tree flagged and the event in the ring; every other member dies at its next
    checked call; no step is printed that the quota did not allow."""
    tree = treegrow()
    heap = mode == "mmap"
    step_units, quota = (STEP // PAGE, KILL_QUOTA // PAGE) if heap else (1, 100)
    base = set_tree(tree_watch, tree.pid, **({"heap": KILL_QUOTA} if heap else {"files": 100}))
    tree.send(f"fan {n} {mode} {STEP if heap else 1} {10 * quota // step_units}")
    children = tree.pids("child", n)
    tree.wait_for("waiting", n)
    assert set(tree_watch.tree_members(tree.pid)) == {tree.pid, *children}
    assert_sums_are_procs(tree_watch, tree.pid)
    before = state(tree_watch, tree.pid)
    start_sum = before.heap_pages if heap else before.fds
    limit = before.heap_limit_pages if heap else before.fd_limit
    tree.send("go")
    killed = next(e for e in tree_events(tree_watch, tree.pid, Kind.TREE_KILLED)
                  if e.kind == Kind.TREE_KILLED)  # fmt: skip
    # the first crossing; a member on another CPU may have added its step meanwhile
    assert killed.member in children and killed.usage > limit
    assert killed.usage - step_units * (os.cpu_count() or 1) <= limit
    assert (
        state(tree_watch, tree.pid).killed and state(tree_watch, tree.pid).killer == killed.member
    )
    wait_until(lambda: gone(children), 10, "every child killed at its next call")
    tree.send("wait")
    ends = tree.wait_for("end", n)
    assert all(line.split()[2] == str(signal.SIGKILL.value) for line in ends), ends
    printed = sum(tree.steps_of(child) for child in children) * step_units
    assert start_sum + printed <= limit, "a step past the quota was allowed"
    usage = killed.usage - (base[0] if heap else base[1])
    copies = start_sum - (base[0] if heap else base[1])
    if heap:
        print(f"\n[tree kill] mmap N={n}: usage at the kill {usage * PAGE / MiB:.2f} MiB of "
              f"{KILL_QUOTA // MiB} MiB (fork copies {copies * PAGE / MiB:.2f} MiB)")  # fmt: skip
    else:
        print(f"\n[tree kill] open N={n}: usage at the kill {usage} fds of 100 "
              f"(fork copies {copies})")  # fmt: skip
    os.kill(tree.pid, signal.SIGKILL)  # the daemon's part: the rest of the tree
    ended = tree_events(tree_watch, tree.pid, Kind.TREE_ENDED)
    assert any(e.kind == Kind.TREE_ENDED and e.final and e.final.killed for e in ended)
    assert tree_watch.tree(tree.pid) is None


# --- sums, membership ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mmap", "open"])
def test_sums_follow_the_members(tree_watch: KernelWatch, treegrow, mode) -> None:
    """While members run, the sums are their /proc values added up; they drop as
    members exit, and the tree ends with its last one."""
    tree = treegrow()
    set_tree(tree_watch, tree.pid, heap=1 << 40, files=1 << 20, action="notify")
    tree.send(f"fan 8 {mode} {STEP if mode == 'mmap' else 3} 4")
    children = tree.pids("child", 8)
    tree.send("go")
    tree.wait_for("held", 8)
    assert_sums_are_procs(tree_watch, tree.pid)
    for child in children[:3]:
        os.kill(child, signal.SIGKILL)
    wait_until(lambda: len(tree_watch.tree_members(tree.pid)) == 6, 5, "three members out")
    assert tree_watch.tree_members(tree.pid) == [tree.pid, *sorted(children[3:])]
    assert_sums_are_procs(tree_watch, tree.pid)
    tree.stop()
    tree_events(tree_watch, tree.pid, Kind.TREE_ENDED)
    assert tree_watch.tree(tree.pid) is None


def test_a_grandchild_after_the_quota_is_a_member(tree_watch: KernelWatch, treegrow) -> None:
    """Forked by a child that then exits: reparented, still a member, still summed."""
    tree = treegrow()
    set_tree(tree_watch, tree.pid, heap=1 << 40, action="notify")
    tree.send(f"grand mmap {STEP} 3")
    (grandchild,) = tree.pids("grand")
    tree.wait_for("held")
    stat = Path(f"/proc/{grandchild}/stat").read_text()
    assert int(stat[stat.rindex(")") + 2 :].split()[1]) != tree.pid  # reparented
    assert tree_watch.tree_members(tree.pid) == [tree.pid, grandchild]
    assert_sums_are_procs(tree_watch, tree.pid)


def test_exec_keeps_membership(tree_watch: KernelWatch, treegrow) -> None:
    """A child that execs stays a member, counted with the new image's usage."""
    tree = treegrow()
    set_tree(tree_watch, tree.pid, heap=1 << 40, action="notify")
    tree.send(f"exec mmap {STEP} 3")
    (child,) = tree.pids("child")
    tree.wait_for("held")
    assert b"member" in Path(f"/proc/{child}/cmdline").read_bytes()
    assert tree_watch.tree_members(tree.pid) == [tree.pid, child]
    assert_sums_are_procs(tree_watch, tree.pid)


def test_the_root_exit_keeps_the_tree(tree_watch: KernelWatch, treegrow) -> None:
    """The root exits; its children stay members and the tree stays with them."""
    tree = treegrow()
    set_tree(tree_watch, tree.pid, heap=1 << 40, action="notify")
    tree.send(f"fan 2 mmap {STEP} 2")
    children = tree.pids("child", 2)
    tree.send("go")
    tree.wait_for("held", 2)
    os.kill(tree.pid, signal.SIGKILL)
    wait_until(lambda: tree_watch.tree_members(tree.pid) == sorted(children), 5, "root out")
    assert_sums_are_procs(tree_watch, tree.pid)


def test_a_quota_of_its_own_keeps_a_member_in_its_tree(tree_watch: KernelWatch, treegrow) -> None:
    """A member given a process quota, then none, is a member all along: its share
    of the sums is never lost or counted twice."""
    tree = treegrow()
    set_tree(tree_watch, tree.pid, heap=1 << 40, action="notify")
    tree.send(f"fan 2 mmap {STEP} 2")
    children = tree.pids("child", 2)
    tree.send("go")
    tree.wait_for("held", 2)
    child = children[0]
    tree_watch.watch(child, start_time(child), vm_data_pages(child) + 1000, None, "notify")
    assert tree_watch.entry(child).tree == tree.pid
    assert tree_watch.entry(child).heap_limit_pages is not None
    assert_sums_are_procs(tree_watch, tree.pid)
    tree_watch.unwatch(child)
    assert tree_watch.entry(child).tree == tree.pid
    assert tree_watch.entry(child).heap_limit_pages is None
    assert_sums_are_procs(tree_watch, tree.pid)
    os.kill(child, signal.SIGKILL)
    wait_until(lambda: child not in tree_watch.tree_members(tree.pid), 5, "the member out")
    assert_sums_are_procs(tree_watch, tree.pid)


def test_only_processes_forked_from_a_member_join(tree_watch: KernelWatch, treegrow) -> None:
    """Children forked before the quota, and processes of another tree, never join."""
    tree, other = treegrow(), treegrow()
    tree.send(f"fan 2 mmap {STEP} 1")
    earlier = tree.pids("child", 2)
    set_tree(tree_watch, tree.pid, heap=1 << 40, action="notify")
    other.send(f"fan 2 mmap {STEP} 1")
    other.pids("child", 2)
    assert tree_watch.tree_members(tree.pid) == [tree.pid]
    tree.send(f"fan 1 mmap {STEP} 1")
    later = tree.pids("child", 3)[2]
    assert later not in earlier
    assert tree_watch.tree_members(tree.pid) == [tree.pid, later]
    assert_sums_are_procs(tree_watch, tree.pid)


def test_notify_counts_each_crossing_once(tree_watch: KernelWatch, treegrow) -> None:
    """A notify tree: the sums cross once (one event, one count); nobody is killed."""
    tree = treegrow()
    set_tree(tree_watch, tree.pid, files=30, action="notify")  # 4 x 4 fds copied at fork
    tree.send("fan 4 open 1 5")
    children = tree.pids("child", 4)
    tree.send("go")
    tree.wait_for("held", 4)
    events = tree_events(tree_watch, tree.pid, Kind.TREE_NOTIFIED)
    assert [e.kind for e in events] == [Kind.TREE_NOTIFIED] and events[0].member in children
    taken = tree_watch.take_tree(tree.pid)
    assert taken is not None and taken.crossings == (0, 1) and not taken.killed
    assert not any(map(exited, children)) and not state(tree_watch, tree.pid).killed


def test_unwatch_tree_removes_every_member(tree_watch: KernelWatch, treegrow) -> None:
    tree = treegrow()
    set_tree(tree_watch, tree.pid, heap=1 << 40, action="notify")
    tree.send(f"fan 3 mmap {STEP} 1")
    children = tree.pids("child", 3)
    tree_watch.unwatch_tree(tree.pid)
    assert tree_watch.tree(tree.pid) is None and tree_watch.tree_members(tree.pid) == []
    assert all(tree_watch.entry(pid) is None for pid in [tree.pid, *children])


def test_deny_is_refused(tree_watch: KernelWatch, treegrow) -> None:
    tree = treegrow()
    with pytest.raises(ValueError, match="cannot deny"):
        set_tree(tree_watch, tree.pid, files=10, action="deny")
    assert tree_watch.tree(tree.pid) is None and tree_watch.entry(tree.pid) is None


# --- cost ---------------------------------------------------------------------------


def test_fork_round_trip_of_a_member(tree_watch: KernelWatch, treegrow) -> None:
    """fork + exit + wait of a tree member (joins at fork, leaves at exit) against a
    process not watched, both while the programs are attached."""
    rounds = 3000
    plain, member = treegrow(), treegrow()
    set_tree(tree_watch, member.pid, heap=1 << 40, action="notify")
    costs: dict[str, list[int]] = {"unwatched": [], "member": []}
    for turn in range(1, 4):
        for name, tree in (("unwatched", plain), ("member", member)):
            tree.send(f"forks {rounds}")
            costs[name].append(int(tree.wait_for("forks", turn)[-1].split()[1]))
    assert state(tree_watch, member.pid).members == 1  # every child left at its exit
    best = {name: min(values) for name, values in costs.items()}
    print(f"\n[tree fork] fork+exit+wait: unwatched {best['unwatched'] / 1000:.1f} µs, "
          f"member {best['member'] / 1000:.1f} µs (min of 3 x {rounds})")  # fmt: skip
    assert best["member"] < 4 * best["unwatched"]

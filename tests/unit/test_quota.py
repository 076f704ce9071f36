"""Pure unit tests of the parsers: quota grammar, deny-mode arithmetic, /proc formats.

No processes, no mount: every input is a literal, so each case documents one
rule of the quota grammar or deny arithmetic (or of the kernel's /proc formats) by itself.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from restrackfs.files import parse_pid
from tracker.deny import limits
from tracker.errors import InvalidArgument
from tracker.linux import procfs
from tracker.linux.procfs import RLIM_INFINITY, NoSuchProcess
from tracker.quota import (
    LIMIT_MAX,
    NO_QUOTA,
    Action,
    Quota,
    Reset,
    Scope,
    parse_count,
    parse_quota,
    parse_reset,
    parse_size,
)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def assert_einval(call, *args):
    with pytest.raises(InvalidArgument) as info:
        call(*args)
    assert info.value.errno == errno.EINVAL
    assert isinstance(info.value, OSError)


# ----- parse_size -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1", 1),
        ("4096", 4096),
        ("007", 7),
        ("1K", KiB),
        ("1k", KiB),
        ("3K", 3 * KiB),
        ("10M", 10 * MiB),
        ("40M", 40 * MiB),
        ("2G", 2 * GiB),
        ("5T", 5 * TiB),
        ("0M", 0),
        ("1024K", MiB),
        ("max", None),
        (str(LIMIT_MAX), LIMIT_MAX),
        (str(2**63 - 1), 2**63 - 1),
        ("8388607T", 8388607 * TiB),  # the largest T value below 2**63
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "-1",
        "-1M",
        "+5",
        "10MB",
        "10Mi",
        "10MiB",
        "10 M",
        "1.5M",
        "1e6",
        "0x10",
        "M",
        "10P",
        "10X",
        "MAX",
        "Max",
        "unlimited",
        "none",
        "inf",
        str(2**63),  # one past what the kernel's signed 64-bit size holds
        str(2**64),
        "8388608T",  # exactly 2**63
        "9007199254740992K",  # 2**53 KiB = 2**63
        "\u0661\u0660",  # Arabic-Indic digits: int() would take them, the grammar must not
        "\uff11\uff10",  # fullwidth digits
        "\u0664K",
        "1\u00a0K",
        "10m\n",  # whitespace is split off by parse_quota, never part of a value
    ],
)
def test_parse_size_rejects(text):
    assert_einval(parse_size, text)


# ----- parse_count ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("1", 1), ("10", 10), ("0010", 10), ("max", None), (str(LIMIT_MAX), LIMIT_MAX)],
)
def test_parse_count_accepts(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-1",
        "+1",
        "1K",  # counts take no size suffix
        "1.0",
        "1e3",
        "ten",
        "MAX",
        str(2**63),
        "\u0661\u0660",
        "\uff15",
        " 5",
    ],
)
def test_parse_count_rejects(text):
    assert_einval(parse_count, text)


# ----- parse_quota ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("heap=40M files=10", Quota(40 * MiB, 10, Action.KILL)),
        ("files=10 heap=40M", Quota(40 * MiB, 10, Action.KILL)),
        ("action=deny files=10 heap=40M", Quota(40 * MiB, 10, Action.DENY)),
        ("heap=40M action=notify files=10", Quota(40 * MiB, 10, Action.NOTIFY)),
        ("heap=1G", Quota(GiB, None, Action.KILL)),
        ("files=0", Quota(None, 0, Action.KILL)),
        ("heap=0", Quota(0, None, Action.KILL)),
        ("action=kill", Quota(None, None, Action.KILL)),
        ("action=deny", Quota(None, None, Action.DENY)),
        ("heap=max files=max", Quota(None, None, Action.KILL)),
        ("heap=max files=max action=notify", Quota(None, None, Action.NOTIFY)),
        ("heap=2T files=3 action=deny", Quota(2 * TiB, 3, Action.DENY)),
        ("heap=40M files=10\n", Quota(40 * MiB, 10, Action.KILL)),  # what echo writes
        ("  heap=40M \t files=10  \n", Quota(40 * MiB, 10, Action.KILL)),
        ("heap=5k", Quota(5 * KiB, None, Action.KILL)),
    ],
)
def test_parse_quota_accepts(text, expected):
    assert parse_quota(text) == expected


def test_parse_quota_is_order_independent():
    tokens = ["heap=3M", "files=7", "action=notify"]
    orders = [
        [tokens[i] for i in order]
        for order in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
    ]
    results = {parse_quota(" ".join(order)) for order in orders}
    assert results == {Quota(3 * MiB, 7, Action.NOTIFY)}


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\n",
        "heap",
        "heap=",
        "=40M",
        "heap 40M",
        "heap:40M",
        "heap==40M",
        "heap=40M=1",
        "heap = 40M",
        "HEAP=40M",
        "Heap=40M",
        "memory=40M",
        "file=10",
        "fd=10",
        "foo=bar",
        "heap=40M bogus=1",
        "heap=-1",
        "files=-1",
        "heap=-40M",
        "heap=10MB",
        "heap=1.5M",
        "heap=40m files=1.0",
        "files=10K",
        f"heap={2**63}",
        f"files={2**63}",
        f"heap={2**70}",
        "heap=\u0664\u0660M",
        "files=\u0661\u0660",
        "action=KILL",
        "action=stop",
        "action=",
        "action=kill,deny",
        # a key given twice is EINVAL, even with equal values
        "heap=1M heap=1M",
        "heap=1M heap=2M",
        "files=1 files=max",
        "action=kill action=deny",
        "heap=max heap=max",
        "heap=1M files=2 action=kill heap=3M",
    ],
)
def test_parse_quota_rejects(text):
    assert_einval(parse_quota, text)


@pytest.mark.parametrize("text", ["heap=" + "9" * 5000, "files=" + "9" * 5000])
def test_parse_quota_rejects_huge_digit_strings_with_einval(text):
    assert_einval(parse_quota, text)


@pytest.mark.parametrize(
    ("quota", "text"),
    [
        (NO_QUOTA, "heap=max files=max action=kill"),
        (Quota(), "heap=max files=max action=kill"),
        (Quota(40 * MiB, 10), f"heap={40 * MiB} files=10 action=kill"),
        (Quota(None, 0, Action.DENY), "heap=max files=0 action=deny"),
        (Quota(0, None, Action.NOTIFY), "heap=0 files=max action=notify"),
        (Quota(LIMIT_MAX, LIMIT_MAX), f"heap={LIMIT_MAX} files={LIMIT_MAX} action=kill"),
    ],
)
def test_quota_format(quota, text):
    assert quota.format() == text
    assert parse_quota(quota.format()) == quota  # what is read back can be written again


# ----- deny-mode arithmetic -------------------------------------------------------------


@pytest.mark.parametrize(
    ("fds", "allowance", "expected"),
    [
        ([0, 1, 2], 3, 6),  # 3, 4, 5 may be opened; 6 fails
        ([0, 1, 2], 1, 4),
        ([0, 1, 2], 0, 3),  # the very next open fails
        ([0, 1, 2], -1, 3),  # already over quota: same as no room at all
        ([0, 1, 2], -100, 3),
        ([], 0, 0),
        ([], 2, 2),
        ([0, 1, 2, 5], 3, 7),  # hole: 3, 4 and 6 are the three free numbers
        ([0, 1, 2, 5], 2, 6),  # 3 and 4; the limit goes at the next free number
        ([0, 2, 4], 2, 5),  # 1, 3 free; the limit sits just above the 2nd free one
        ([0, 2, 4], 0, 1),
        ([0, 2, 4], -3, 1),
        ([3, 4, 5], 3, 6),  # 0, 1, 2 free; 6 is the first free number after them
        ([10, 1, 0, 2], 1, 4),  # order of the input does not matter
        ([0, 0, 1, 1, 2], 1, 4),  # nor duplicates
        (range(1000), 5, 1005),
    ],
)
def test_nofile_soft_limit(fds, allowance, expected):
    assert limits.nofile_soft_limit(fds, allowance) == expected


def test_nofile_soft_limit_lets_exactly_allowance_opens_succeed():
    """Simulate the kernel: lowest free number, EMFILE when it is >= the limit."""
    for fds in ([0, 1, 2], [0, 1, 2, 5, 9], [0, 3, 4, 7], [1]):
        for allowance in range(-2, 8):
            limit = limits.nofile_soft_limit(iter(fds), allowance)
            used, opened = set(fds), 0
            while True:
                lowest = next(n for n in range(10**6) if n not in used)
                if lowest >= limit:
                    break
                used.add(lowest)
                opened += 1
            assert opened == max(allowance, 0), (fds, allowance)


@pytest.mark.parametrize(
    ("limit", "cap", "expected"),
    [
        (RLIM_INFINITY, RLIM_INFINITY, RLIM_INFINITY),
        (RLIM_INFINITY, 5, 5),
        (5, RLIM_INFINITY, 5),
        (3, 5, 3),
        (5, 3, 3),
        (0, RLIM_INFINITY, 0),
        (RLIM_INFINITY, 0, 0),
        (7, 7, 7),
    ],
)
def test_lower(limit, cap, expected):
    assert limits.lower(limit, cap) == expected


# ----- restrackfs/files.py parsers ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1),
        ("4242", 4242),
        ("4242\n", 4242),
        ("4242 \t\n", 4242),
        ("007", 7),
        (str(2**22), 2**22),
    ],
)
def test_parse_pid_accepts(text, expected):
    assert parse_pid(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        "0",
        "00",
        "0\n",
        "-1",
        "-4242",
        "+5",
        "1.0",
        "1e3",
        "0x10",
        "abc",
        "12abc",
        "1 2",
        "\u0664\u0662",  # Arabic-Indic digits
        "\uff14\uff12",  # fullwidth digits
        "4242\x00",
    ],
)
def test_parse_pid_rejects(text):
    assert_einval(parse_pid, text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", Reset.ALL),
        ("1\n", Reset.ALL),
        ("all", Reset.ALL),
        ("all \n", Reset.ALL),
        ("quota", Reset.QUOTA),
        ("quota\n", Reset.QUOTA),
        ("usage", Reset.USAGE),
        ("usage\t\n", Reset.USAGE),
    ],
)
def test_parse_reset_accepts(text, expected):
    assert parse_reset(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "\n", "0", "2", "01", "ALL", "All", "quotas", "use", "quota usage", "yes", "true", "1 1"],
)
def test_parse_reset_rejects(text):
    assert_einval(parse_reset, text)


# ----- /proc parsers --------------------------------------------------------------------

# Fields 3.. of a real /proc/PID/stat line; starttime (field 22) is 51084.
_STAT_TAIL = (
    b"S 4373 4373 3110 0 -1 4194304 102 0 0 0 0 0 0 0 20 0 1 0 51084 3133440 412 "
    b"18446744073709551615 94657072930816 94657072950697 140724620705248 0 0 0 0 0 0 0 0 0 "
    b"17 1 0 0 0 0 0 94657072966704 94657072968320 94657209962496 140724620708578 "
    b"140724620708598 140724620708598 140724620709867 0\n"
)


@pytest.mark.parametrize(
    "comm",
    [
        b"cat",
        b"",
        b"my prog",
        b"a) R 1 2 3",  # a comm that looks like the end of the comm field
        b"x)",
        b") (",
        b"((()))",
        b"sp  ace ",
        b"tab\there",
        b"1 (2) 3",
    ],
)
def test_parse_stat_comm_with_spaces_and_parentheses(comm):
    stat = procfs.parse_stat(4378, b"4378 (" + comm + b") " + _STAT_TAIL)
    assert stat.comm == comm.decode()
    assert stat.state == "S"
    assert stat.start_time == 51084


def test_parse_stat_states_and_non_utf8_comm():
    stat = procfs.parse_stat(9, b"9 (\xff\xfe) Z " + _STAT_TAIL[2:])
    assert stat.state == "Z"
    assert stat.start_time == 51084
    assert stat.comm == "\ufffd\ufffd"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"4378",
        b"4378 (cat",  # cut in the middle of the comm
        b"4378 (cat) S 4373 4373",  # cut short: no start time
        b"4378 cat) " + _STAT_TAIL,  # no opening parenthesis
    ],
)
def test_parse_stat_rejects_truncated(raw):
    with pytest.raises(NoSuchProcess) as info:
        procfs.parse_stat(4378, raw)
    assert info.value.errno == errno.ESRCH


def test_parse_stat_of_this_process_agrees_with_proc():
    with open(f"/proc/{os.getpid()}/stat", "rb") as file:
        stat = procfs.parse_stat(os.getpid(), file.read())
    with open(f"/proc/{os.getpid()}/comm", "rb") as file:
        assert stat.comm == file.read().rstrip(b"\n").decode()
    assert stat.state in "RS"
    assert stat.start_time > 0


_STATUS = b"""Name:\tmy prog: x
Umask:\t0022
State:\tS (sleeping)
Tgid:\t4242
Ngid:\t0
Pid:\t4243
PPid:\t4200
TracerPid:\t0
Uid:\t1000\t1001\t1002\t1003
Gid:\t2000\t2001\t2002\t2003
FDSize:\t256
Groups:\t 27 100
VmPeak:\t  230000 kB
VmSize:\t  226000 kB
VmData:\t   20584 kB
VmStk:\t     132 kB
Threads:\t2
"""

_ZOMBIE_STATUS = b"""Name:\tsleep
Umask:\t0022
State:\tZ (zombie)
Tgid:\t77
Ngid:\t0
Pid:\t77
PPid:\t1
TracerPid:\t0
Uid:\t0\t0\t0\t0
Gid:\t0\t0\t0\t0
FDSize:\t0
Groups:\t
Threads:\t1
"""


def test_parse_status():
    status = procfs.parse_status(4243, _STATUS)
    assert status == procfs.Status(
        name="my prog: x",
        tgid=4242,  # a thread's status names its thread group
        state="S",
        real_uid=1000,  # the first column is the real id
        real_gid=2000,
        vm_data=20584 * 1024,
    )
    assert procfs.vm_data_of(status) == 20584 * 1024


def test_parse_status_of_a_zombie_has_no_vm_data():
    status = procfs.parse_status(77, _ZOMBIE_STATUS)
    assert (status.state, status.tgid, status.vm_data) == ("Z", 77, None)
    with pytest.raises(NoSuchProcess):
        procfs.vm_data_of(status)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        _STATUS[: _STATUS.index(b"Tgid")],  # cut before Tgid
        _STATUS[: _STATUS.index(b"Uid") + 5],  # cut inside the Uid line
        _STATUS.replace(b"Tgid:\t4242", b"Tgid:\t"),
    ],
)
def test_parse_status_rejects_truncated(raw):
    with pytest.raises(NoSuchProcess):
        procfs.parse_status(4243, raw)


_LIMITS = b"""Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max file size             unlimited            unlimited            bytes     
Max data size             31457280             unlimited            bytes     
Max stack size            8388608              unlimited            bytes     
Max core file size        0                    unlimited            bytes     
Max resident set          unlimited            unlimited            bytes     
Max processes             96364                96364                processes 
Max open files            6                    20000                files     
Max locked memory         8388608              8388608              bytes     
Max address space         unlimited            unlimited            bytes     
Max file locks            unlimited            unlimited            locks     
Max pending signals       96364                96364                signals   
Max msgqueue size         819200               819200               bytes     
Max nice priority         0                    0                    
Max realtime priority     0                    0                    
Max realtime timeout      unlimited            unlimited            us        
"""  # noqa: W291 - the kernel pads every column with spaces


def test_parse_limits():
    parsed = procfs.parse_limits(_LIMITS)
    assert parsed["Max data size"] == (31457280, RLIM_INFINITY)
    assert parsed["Max open files"] == (6, 20000)
    assert parsed["Max cpu time"] == (RLIM_INFINITY, RLIM_INFINITY)
    assert parsed["Max core file size"] == (0, RLIM_INFINITY)
    assert parsed["Max nice priority"] == (0, 0)  # no Units column
    assert parsed["Max realtime timeout"] == (RLIM_INFINITY, RLIM_INFINITY)
    assert "Limit" not in parsed  # the header is not a limit
    assert len(parsed) == 16
    assert limits.PROC_LIMIT_NAMES[limits.DATA] in parsed
    assert limits.PROC_LIMIT_NAMES[limits.NOFILE] in parsed


def test_parse_limits_of_this_process_agrees_with_getrlimit():
    import resource

    with open(f"/proc/{os.getpid()}/limits", "rb") as file:
        parsed = procfs.parse_limits(file.read())
    for which, name in limits.PROC_LIMIT_NAMES.items():
        assert parsed[name] == resource.getrlimit(which)


def test_nofile_soft_limit_is_linear_in_open_fds_not_in_the_allowance():
    # files=2**62 with action=deny once spun the daemon forever counting up to it
    assert limits.nofile_soft_limit(range(5), 2**62) == 2**62 + 5


# ----- fd link targets ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "file_type", "kind"),
    [
        ("socket:[2077881]", None, "socket"),
        ("pipe:[2077880]", None, "pipe"),
        ("anon_inode:[eventfd]", None, "anon"),
        ("anon_inode:inotify", None, "anon"),
        ("anon_inode:[pidfd]", None, "anon"),
        ("net:[4026531833]", None, "other"),
        ("/etc/passwd", stat.S_IFREG, "file"),
        ("/memfd:x (deleted)", stat.S_IFREG, "file"),
        ("/tmp", stat.S_IFDIR, "dir"),
        ("/run/fifo", stat.S_IFIFO, "pipe"),
        ("/dev/null", stat.S_IFCHR, "other"),
        ("/dev/sda", stat.S_IFBLK, "other"),
    ],
)
def test_each_link_target_has_one_kind(target, file_type, kind):
    assert procfs.fd_kind(target, file_type) == kind


# ----- scope=tree ----------------------------------------------------------------------


def test_scope_defaults_to_process_and_a_process_quota_reads_as_before():
    quota = parse_quota("heap=1M")
    assert quota.scope is Scope.PROCESS
    assert quota.format() == "heap=1048576 files=max action=kill"
    assert parse_quota("heap=1M scope=process") == quota


def test_scope_tree_is_parsed_and_formatted_last():
    quota = parse_quota("scope=tree files=10 action=notify")
    assert quota == Quota(files=10, action=Action.NOTIFY, scope=Scope.TREE)
    assert quota.format() == "heap=max files=10 action=notify scope=tree"
    assert parse_quota(quota.format()) == quota


@pytest.mark.parametrize("text", ["scope=tree action=deny", "action=deny heap=1M scope=tree"])
def test_a_tree_cannot_deny(text):
    with pytest.raises(InvalidArgument, match="per-process rlimits cannot hold a sum") as info:
        parse_quota(text)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("text", ["scope=", "scope=Tree", "scope=group", "scope=tree scope=tree"])
def test_bad_scopes_are_einval(text):
    assert_einval(parse_quota, text)


def test_the_client_checks_a_scope_before_writing(tmp_path):
    from restrackfs import client

    with pytest.raises(OSError) as info:
        client.set_quota(1, heap=1, scope="group", mount=tmp_path)
    assert info.value.errno == errno.EINVAL


# ----- warn=N% ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "percent"),
    [("heap=1M warn=80%", 80), ("warn=1% files=10", 1), ("files=10 warn=99%", 99)],
)
def test_warn_is_parsed(text, percent):
    assert parse_quota(text).warn == percent


def test_warn_reads_back_after_action_and_before_scope():
    quota = parse_quota("scope=tree warn=75% files=10 action=notify")
    assert quota.format() == "heap=max files=10 action=notify warn=75% scope=tree"
    assert parse_quota(quota.format()) == quota
    assert parse_quota("heap=1M").warn is None  # not set: not read back
    assert parse_quota("heap=1M").format() == "heap=1048576 files=max action=kill"


@pytest.mark.parametrize(
    "text",
    [
        "heap=1M warn=0%",
        "heap=1M warn=100%",
        "heap=1M warn=80",  # the percent sign is part of the value
        "heap=1M warn=80.5%",
        "heap=1M warn=-5%",
        "heap=1M warn=%",
        "heap=1M warn=",
        "heap=1M warn=80%%",
        "heap=1M warn=８０%",  # not ASCII digits
        "heap=1M warn=80% warn=90%",  # twice
    ],
)
def test_bad_warns_are_einval(text):
    assert_einval(parse_quota, text)


@pytest.mark.parametrize(
    "text", ["warn=80%", "heap=max files=max warn=80%", "warn=50% action=kill"]
)
def test_warn_needs_a_limit(text):
    with pytest.raises(InvalidArgument, match="warn needs a heap or files limit"):
        parse_quota(text)


@pytest.mark.parametrize("action", ["kill", "deny", "notify"])
def test_warn_goes_with_every_action(action):
    assert parse_quota(f"heap=1M action={action} warn=50%").action == action


@pytest.mark.parametrize(
    ("limit", "percent", "threshold"),
    [(100, 80, 80), (10, 80, 8), (3, 50, 1), (1, 99, 0), (0, 50, 0), (None, 80, None)],
)
def test_the_warn_threshold_is_the_limit_share_rounded_down(limit, percent, threshold):
    assert Quota(heap=1, warn=percent).warn_threshold(limit) == threshold
    assert Quota(heap=1).warn_threshold(limit) is None


def test_the_client_checks_a_warn_before_writing(tmp_path):
    from restrackfs import client

    with pytest.raises(OSError) as info:
        client.set_quota(1, heap=1, warn=100, mount=tmp_path)
    assert info.value.errno == errno.EINVAL

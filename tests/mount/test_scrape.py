"""The scrape endpoint (`--metrics-listen`), with real HTTP clients on 127.0.0.1.

Two levels: the daemon itself (same exposition as root's `metrics`, the FUSE
mount unharmed by bad clients), and `scrape.MetricsServer` run in a trio loop
here with short limits, so the deadlines can be shown without waiting 10 s.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import pytest
import trio
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from restrackfs import scrape
from restrackfs.daemon import parse_args
from restrackfs.health import Health, verdict
from tests.support.bpf import BPF, needs_bpf
from tests.support.daemon import Daemon
from tests.support.procs import open_fds
from tests.support.users import NOBODY
from tests.support.waiting import wait_until

LOCAL = "127.0.0.1"


def endpoint_port(daemon: Daemon) -> int:
    found = wait_until(
        lambda: re.search(r"metrics endpoint on http://127\.0\.0\.1:(\d+)/", daemon.log_text()),
        5,
        "the endpoint's address in the log",
    )
    return int(found.group(1))


def get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection(LOCAL, port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample, parsed by prometheus_client: (name, labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def served(daemon_factory: Callable[..., Daemon]) -> tuple[Daemon, int]:
    daemon = daemon_factory("--metrics-listen", f"{LOCAL}:0")
    return daemon, endpoint_port(daemon)


def test_serves_the_same_exposition_as_roots_read(served, spawn):
    daemon, port = served
    quiet, capped = spawn(), spawn()
    daemon.register(quiet.pid)
    daemon.register(capped.pid)
    daemon.write("heap=40M files=10 action=notify", capped.pid, "quota")
    status, content_type, body = get(port)
    assert status == 200
    assert content_type == CONTENT_TYPE_PLAIN_0_0_4 == scrape.CONTENT_TYPE
    render_time = ("restrack_exposition_render_seconds", ())  # its own at each render
    assert samples(body).keys() == samples(daemon.read("metrics")).keys()
    assert {k: v for k, v in samples(body).items() if k != render_time} == {
        k: v for k, v in samples(daemon.read("metrics")).items() if k != render_time
    }
    scraped = samples(body)
    assert scraped[("restrack_tracked_processes", ())] == 2
    assert scraped[("restrack_heap_quota_bytes", (("comm", "workload"), ("pid", str(capped.pid))))]
    assert ("restrack_heap_quota_bytes", (("comm", "workload"), ("pid", str(quiet.pid)))) not in (
        scraped
    )


def test_anything_but_metrics_and_healthz_is_404_naming_them(served):
    _, port = served
    for method, path in [("GET", "/"), ("GET", "/metricsx"), ("POST", "/metrics")]:
        status, _, body = get(port, path, method)
        assert status == 404, (method, path)
        assert "/metrics" in body and "/healthz" in body, body
    assert get(port, "/metrics?name[]=x")[0] == 200  # Prometheus may add a query


def test_head_answers_as_get_without_a_body(served):
    _, port = served
    for path, status in [("/metrics", 200), ("/healthz", 200), ("/", 404)]:
        conn = http.client.HTTPConnection(LOCAL, port, timeout=10)
        try:
            conn.request("HEAD", path)
            response = conn.getresponse()
            assert response.status == status, path
            length = int(response.getheader("Content-Length"))
            assert response.read() == b""
        finally:
            conn.close()
        got_status, _, body = get(port, path)
        assert got_status == status
        if path != "/metrics":  # the exposition's length moves with its render time
            assert length == len(body.encode()), path
        else:
            assert length > 0


def test_healthz_is_ok_while_the_mount_answers_and_503_with_why_when_it_does_not(served):
    """A tmpfs mounted over the mount point hides the mount from its users: the
    probe's read finds no `engine` there, and says so; unmounted, ok again."""
    daemon, port = served
    assert get(port, "/healthz")[0::2] == (200, "ok\n")
    subprocess.run(["mount", "-t", "tmpfs", "hider", str(daemon.mountpoint)], check=True)
    try:
        status, _, body = get(port, "/healthz")
    finally:
        subprocess.run(["umount", str(daemon.mountpoint)], check=True)
    assert status == 503
    assert body.startswith("unhealthy: ") and f"{daemon.mountpoint}/engine" in body, body
    assert get(port, "/healthz")[0::2] == (200, "ok\n")
    assert get(port)[0] == 200  # the metrics were served all along


def test_healthz_answers_in_time_when_the_read_hangs():
    """The verdict of a probe whose read does not come back: 503 within the read's
    deadline, and one stuck read at most, however often it is probed."""

    class Stuck:
        backend = type("B", (), {"name": "procfs", "unloaded": None})()

    release = threading.Event()
    started: list[float] = []

    class Hanging(Health):
        def _read(self):  # the mount's read, never answered until released
            started.append(time.monotonic())
            release.wait(30)
            self._reading_since = None
            return None

    async def main() -> list[str | None]:
        check = Hanging(Path("/nowhere"), Stuck())
        return [await check() for _ in range(3)]

    with patch_read_timeout(0.2):
        begin = time.monotonic()
        verdicts = trio.run(main)
        took = time.monotonic() - begin
    release.set()
    assert len(started) == 1, "a second read started while the first hung"
    assert "was not answered in" in (verdicts[0] or "")
    assert all("has not been answered for" in (v or "") for v in verdicts[1:]), verdicts
    assert took < 2.0


def test_probes_that_come_together_both_see_a_slow_but_answering_mount():
    class Engine:
        backend = type("B", (), {"name": "procfs", "unloaded": None})()

    class Slow(Health):
        def _read(self):
            time.sleep(0.1)
            self._reading_since = None
            return None

    async def main() -> list[str | None]:
        check, verdicts = Slow(Path("/nowhere"), Engine()), []

        async def probe() -> None:
            verdicts.append(await check())

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(probe)
        return verdicts

    assert trio.run(main) == [None, None, None]


@contextmanager
def patch_read_timeout(seconds: float) -> Iterator[None]:
    from restrackfs import health

    kept, health.READ_TIMEOUT = health.READ_TIMEOUT, seconds
    try:
        yield
    finally:
        health.READ_TIMEOUT = kept


def test_the_health_verdict_names_each_part_that_fails():
    assert verdict(None, None) is None
    assert verdict("mount gone", None) == "mount gone"
    assert verdict(None, "bpf: programs not attached") == "bpf: programs not attached"
    assert verdict("a", "b") == "a; b"
    assert scrape.health_answer(None) == (200, b"ok\n")
    assert scrape.health_answer("bpf: closed") == (503, b"unhealthy: bpf: closed\n")


def test_under_hidepid_the_endpoint_shows_roots_view(daemon_factory, spawn):
    daemon = daemon_factory("--hidepid", "--metrics-listen", f"{LOCAL}:0")
    port = endpoint_port(daemon)
    mine, theirs = spawn(), spawn(uid=NOBODY)
    daemon.register(mine.pid)
    daemon.register(theirs.pid)
    pids = {labels for (name, labels) in samples(get(port)[2]) if name == "restrack_heap_bytes"}
    assert {dict(labels)["pid"] for labels in pids} == {str(mine.pid), str(theirs.pid)}
    assert "the endpoint shows every process" in daemon.log_text()


def test_hidepid_refuses_a_non_loopback_address_unless_told():
    argv = [sys.executable, "-m", "restrackfs.daemon", "--foreground", "--hidepid"]
    argv += ["--metrics-listen", "0.0.0.0:9464", "/nonexistent"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--hidepid-allow-remote-metrics" in result.stderr
    told = parse_args(
        ["--hidepid", "--hidepid-allow-remote-metrics", "--metrics-listen", "0.0.0.0:9464", "/m"]
    )
    assert told.metrics_listen == ("0.0.0.0", 9464)
    assert parse_args(["--hidepid", "--metrics-listen", "localhost:9464", "/m"]).metrics_listen
    assert parse_args(["--metrics-listen", "[::1]:9464", "/m"]).metrics_listen == ("::1", 9464)
    assert parse_args(["/m"]).metrics_listen is None  # off by default


@pytest.mark.parametrize("bad", ["9464", "host:", ":9464", "127.0.0.1:http", "127.0.0.1:70000"])
def test_malformed_listen_address_is_refused(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--metrics-listen", bad, "/m"])
    assert exit_info.value.code == 2
    assert "want HOST:PORT" in capsys.readouterr().err


def test_a_taken_port_fails_the_start_before_mounting(daemon_factory):
    with socket.socket() as taken:
        taken.bind((LOCAL, 0))
        taken.listen()
        daemon = daemon_factory(start=False)
        argv = [sys.executable, "-m", "restrackfs.daemon", "--foreground", "--state"]
        argv += [str(daemon.state), "--metrics-listen", f"{LOCAL}:{taken.getsockname()[1]}"]
        result = subprocess.run(
            [*argv, str(daemon.mountpoint)], capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    assert "Address already in use" in result.stderr
    assert not os.path.ismount(daemon.mountpoint)


def test_malformed_and_huge_requests_are_refused_and_the_daemon_serves_on(served):
    daemon, port = served
    assert raw_exchange(port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"
    assert raw_exchange(port, huge).startswith(b"HTTP/1.1 431 ")
    assert get(port)[0] == 200
    assert "restrack_tracked_processes" in daemon.read("metrics")


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send `request` (as much as the server takes) and read the answer to its end."""
    with socket.create_connection((LOCAL, port), timeout=10) as sock:
        with suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)  # it may answer and close before taking all of it
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


@contextmanager
def slow_clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` slowloris connections: each sends a request head one byte at a time."""
    stop = threading.Event()
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.create_connection((LOCAL, port))) for _ in range(count)]

        def dribble() -> None:
            head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 1000
            for byte in head:
                if stop.wait(0.05):
                    return
                for sock in socks:
                    with suppress(OSError):
                        sock.send(bytes([byte]))

        thread = threading.Thread(target=dribble, daemon=True)
        thread.start()
        try:
            yield socks
        finally:
            stop.set()
            thread.join()


def read_latencies(daemon: Daemon, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        daemon.read("metrics")
        latencies.append(time.perf_counter() - start)
    return latencies


def test_slow_clients_do_not_delay_the_mount_and_give_their_places_to_scrapes(served, spawn):
    daemon, port = served
    daemon.register(spawn().pid)
    victim = spawn()
    daemon.register(victim.pid)
    daemon.write("files=2", victim.pid, "quota")
    before = sorted(read_latencies(daemon, 50))
    with slow_clients(port, scrape.Limits().max_connections + 8):
        during = sorted(read_latencies(daemon, 200))
        # enforcement goes on: a kill quota acts within its interval (100 ms)
        start = time.monotonic()
        with suppress(ProcessLookupError):  # killed before it could answer
            victim.ask("open", 5)
        assert victim.wait(5) == -signal.SIGKILL
        assert time.monotonic() - start < 1.0
        # a scrape takes the place of the oldest client still dribbling its head
        start = time.monotonic()
        assert get_or_closed(port) == 200
        assert time.monotonic() - start < 1.0
    # the FUSE loop never waited on a socket: each read took what a read takes
    assert during[-1] < max(0.25, 20 * before[len(before) // 2]), (before[-1], during[-1])


def test_a_user_holding_connections_does_not_lock_prometheus_out(served):
    """40 idle connections from the scraper's own address, each reopened as soon as
    it is closed (the attack of a local user): scrapes every 0.25 s are answered."""
    daemon, port = served
    stop = threading.Event()

    def hold() -> None:
        socks: list[socket.socket] = []
        while not stop.is_set():
            for sock in [s for s in socks if _closed_by_server(s)]:
                socks.remove(sock)
                sock.close()
            while len(socks) < 40 and not stop.is_set():
                with suppress(OSError):
                    socks.append(socket.create_connection((LOCAL, port), timeout=1))
            stop.wait(0.01)
        for sock in socks:
            sock.close()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        time.sleep(0.5)  # the holder's 40 in place first
        answered = 0
        for _ in range(20):
            with suppress(OSError, http.client.HTTPException):
                answered += get(port)[0] == 200
            time.sleep(0.25)
    finally:
        stop.set()
        holder.join(10)
    assert answered >= 18, f"{answered} of 20 scrapes answered"


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def get_or_closed(port: int) -> int | None:
    """The status of a GET, or None when the server closed without answering."""
    try:
        return get(port)[0]
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        return None


def test_200_concurrent_clients_end_and_descriptors_stay_bounded(served, spawn):
    daemon, port = served
    daemon.register(spawn().pid)
    daemon_pid = daemon.proc.pid
    fds_before = open_fds(daemon_pid)
    # 200 connections held open at once, saying nothing: at most the cap is kept
    with ExitStack() as stack:
        for _ in range(200):
            stack.enter_context(socket.create_connection((LOCAL, port)))
        wait_until(lambda: open_fds(daemon_pid) >= fds_before + 10, 5, "connections accepted")
        time.sleep(0.5)  # let it accept what it will: the bound is on what it keeps
        assert open_fds(daemon_pid) <= fds_before + scrape.Limits().max_connections
        assert read_latencies(daemon, 20)[-1] < 1.0
    # 200 clients scraping at once: each gets an answer or a close, none hangs
    results: list[int | None] = []
    lock = threading.Lock()

    def scrape_once() -> None:
        status = get_or_closed(port)
        with lock:
            results.append(status)

    threads = [threading.Thread(target=scrape_once) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(results) == 200
    assert set(results) <= {200, None} and 200 in results
    wait_until(lambda: open_fds(daemon_pid) <= fds_before + 1, 15, "connections closed")
    assert daemon.proc.poll() is None


# ----- the server alone, with short limits ----------------------------------------------


@contextmanager
def server_thread(
    render: Callable[[], str], limits: scrape.Limits
) -> Iterator[tuple[int, scrape.MetricsServer]]:
    """A MetricsServer in a trio loop of its own thread, on 127.0.0.1."""
    ready = threading.Event()
    box: dict = {}

    async def run() -> None:
        listeners = await scrape.open_listeners(LOCAL, 0)
        box["server"] = server = scrape.MetricsServer(listeners, render, limits)
        box["port"] = listeners[0].socket.getsockname()[1]
        box["token"] = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            box["scope"] = scope
            ready.set()
            await server.serve()

    thread = threading.Thread(target=trio.run, args=(run,), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield box["port"], box["server"]
    finally:
        trio.from_thread.run_sync(box["scope"].cancel, trio_token=box["token"])
        thread.join(10)


def test_a_slowloris_is_cut_at_the_deadline():
    limits = scrape.Limits(max_connections=4, timeout=0.5)
    with server_thread(lambda: "x 1\n", limits) as (port, server):
        with slow_clients(port, 1) as (sock,):
            start = time.monotonic()
            sock.settimeout(5)
            wait_until(lambda: sock.recv(1) == b"", 5, "the server to close")
            assert 0.4 < time.monotonic() - start < 2.0
        wait_until(lambda: server.active == 0, 5, "the place to be given back")


def test_a_client_that_never_reads_is_cut_at_the_deadline():
    big = "x " + "1" * (32 * 2**20) + "\n"
    limits = scrape.Limits(max_connections=4, timeout=0.5)
    with server_thread(lambda: big, limits) as (port, server), socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((LOCAL, port))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: server.active == 1, 5, "the request to be taken")
        start = time.monotonic()
        wait_until(lambda: server.active == 0, 5, "the server to give up on it")
        assert time.monotonic() - start < 2.0


def test_renders_take_turns_with_the_rest_of_the_loop():
    """Eight scrapes woken at once run one render per trip through the loop, so a
    FUSE request (here: a ticking task) waits for one render, not eight."""
    render_time = 0.05

    def slow_render() -> str:
        end = time.perf_counter() + render_time
        while time.perf_counter() < end:
            pass
        return "x 1\n"

    async def main() -> float:
        listeners = await scrape.open_listeners(LOCAL, 0)
        port = listeners[0].socket.getsockname()[1]
        server = scrape.MetricsServer(listeners, slow_render, scrape.Limits(timeout=30))
        clients = [socket.create_connection((LOCAL, port)) for _ in range(8)]
        worst = 0.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            with trio.fail_after(10):
                while server.active < len(clients):  # all accepted, waiting for a request
                    await trio.sleep(0.001)
            for sock in clients:  # the requests arrive together: one wakeup for all
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            last = time.perf_counter()
            with trio.fail_after(10):
                while not all(_answered(sock) for sock in clients):
                    await trio.sleep(0)
                    now = time.perf_counter()
                    worst, last = max(worst, now - last), now
            nursery.cancel_scope.cancel()
        for sock in clients:
            sock.close()
        return worst

    worst = trio.run(main)
    assert worst < 3 * render_time, worst


def _answered(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return False


def test_one_peer_holding_its_bound_of_connections_leaves_room_for_another():
    """127.0.0.2 holds connections that asked for a big exposition and never read
    it (not idle: they keep their places until the deadline); 127.0.0.1 still
    scrapes. With the per-peer bound as large as the global one, it could not."""
    big = "x " + "1" * (16 * 2**20) + "\n"
    answered = {}
    for per_peer in (4, 8):
        limits = scrape.Limits(max_connections=8, max_per_peer=per_peer, timeout=8)
        with server_thread(lambda: big, limits) as (port, server), ExitStack() as held:
            for _ in range(per_peer + 2):
                sock = held.enter_context(
                    socket.create_connection((LOCAL, port), source_address=("127.0.0.2", 0))
                )
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                with suppress(OSError):  # past the bound: closed unanswered
                    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            taken = lambda server=server, bound=per_peer: server.active == bound  # noqa: E731
            wait_until(taken, 5, "the holder's connections taken")
            time.sleep(0.2)  # a connection past the bound would have been taken by now
            assert server.active == per_peer
            answered[per_peer] = get_or_closed(port)
    assert answered == {4: 200, 8: None}


@needs_bpf
def test_healthz_under_bpf_with_its_programs_attached(bpf_factory, spawn):
    daemon = bpf_factory(*BPF, "--metrics-listen", f"{LOCAL}:0")
    port = endpoint_port(daemon)
    w = spawn()
    daemon.register(w.pid)
    daemon.write("files=100 action=notify", w.pid, "quota")  # the programs attach for it
    assert get(port, "/healthz")[0::2] == (200, "ok\n")
    scraped = samples(get(port)[2])
    assert scraped[("restrack_engine_info", (("engine", "bpf"),))] == 1
    assert scraped[("restrack_kernel_events_dropped_total", ())] == 0

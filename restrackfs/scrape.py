"""`--metrics-listen`: the `metrics` exposition over HTTP for Prometheus, and
`/healthz` for a liveness or readiness probe.

`GET` or `HEAD` of `/metrics` (the exposition) and of `/healthz` (200 `ok`, or 503
with the reason); anything else is 404, with a body naming the two paths.

The server runs in the daemon's trio loop, beside the FUSE request loop, so
nothing here may block or hold it: every socket operation is trio's
non-blocking kind, and each client is bounded so that the worst it can cost the
mount is one render of `metrics`, the same as root's `cat`:

- at most `max_connections` at once, and `max_per_peer` from one address; a
  connection past either bound takes the place of the oldest one (of that
  address, or of all) that has not sent its whole request head yet, or is
  closed unanswered if none is idle: a local user holding and reopening
  connections cannot lock Prometheus out, nor take the descriptors the daemon
  holds as pidfds;
- a short deadline (`head_timeout`) for the request head, and one
  (`timeout`) for the whole exchange, reading the request and sending the
  answer: a slowloris, or a client that never reads, is cut off;
- a request head of at most `max_head` bytes (431 past it); a body is never read;
- one request per connection (`Connection: close`): no idle keep-alive to hold;
- renders one at a time, with the loop free between two of them, so a FUSE
  request waits for at most one render however many scrapes arrive together.

h11 parses (the HTTP/1.1 state machine hypercorn itself is built on). Not
hypercorn: measured on this machine, it accepted 1,000 idle connections
without bound (397 descriptors in its first second), and it sends a response
shielded from cancellation with no timeout, so a client that sends a request
and never reads an 8 MiB answer still held its connection 30 s later; it also
costs 50 ms and 4 MiB more at import than h11.
"""

from __future__ import annotations

import errno
import http
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio

log = logging.getLogger("restrackfs.scrape")

# prometheus_client.exposition.CONTENT_TYPE_PLAIN_0_0_4; its CONTENT_TYPE_LATEST
# is 1.0.0 now, and the `metrics` file serves 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PLAIN = "text/plain; charset=utf-8"
METRICS_PATH = b"/metrics"
HEALTH_PATH = b"/healthz"
NOT_FOUND = b"not found: this endpoint serves GET /metrics and GET /healthz\n"
# accept() failures that mean "out of descriptors or memory now": back off, carry on.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_RECV_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 32
    max_per_peer: int = 8  # connections from one address
    head_timeout: float = 2.0  # seconds to send the request head
    timeout: float = 10.0  # seconds, per connection: request in, answer out
    max_head: int = 8192  # bytes of request line and headers


class _Client:
    """One connection: its peer address, and while its request head is not in,
    the scope that gives its place to a newer one."""

    __slots__ = ("idle", "peer", "scope")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.idle = True
        self.scope = trio.CancelScope()


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdecimal() or int(port) > 65535:
        raise ValueError(f"{text!r}: want HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback one (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ValueError(f"{host!r}: {error.strerror}") from None
    addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    return all(address.is_loopback for address in addresses)


def check_listen(text: str, *, hidepid: bool, allow_remote: bool) -> tuple[str, int]:
    """Validate `--metrics-listen` at start.

    The endpoint shows every tracked process (pid, comm, usage) to whoever can
    connect, as root's read of `metrics` does: under --hidepid that would undo
    the option for the whole network, so a non-loopback address needs
    `allow_remote`, said on purpose.
    """
    host, port = parse_listen(text)
    if hidepid and not allow_remote and not is_loopback(host):
        raise ValueError(
            f"{text!r} is not a loopback address, and under --hidepid the endpoint would show "
            "every tracked process to the network; add --hidepid-allow-remote-metrics to mean it"
        )
    return host, port


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Bind now, before the mount, so a taken port fails the start with its reason."""
    return await trio.open_tcp_listeners(port, host=host)


def _peer_of(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return ""


def listener_address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsServer:
    """Answers `/metrics` with `render()` and `/healthz` with `health()`, 404 to
    anything else; `HEAD` as `GET`, without the body."""

    def __init__(
        self,
        listeners: list[trio.SocketListener],
        render: Callable[[], str],
        limits: Limits | None = None,
        health: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        self.listeners = listeners
        self.render = render
        self.limits = limits or Limits()
        self.health = health  # None when healthy, else why not; no health: always "ok"
        self._clients: dict[_Client, None] = {}  # oldest first
        self._render_lock = trio.Lock()

    @property
    def active(self) -> int:
        return len(self._clients)

    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for listener in self.listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
        finally:
            for listener in self.listeners:
                await trio.aclose_forcefully(listener)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.warning("metrics endpoint: accept: %s; retrying in 0.1 s", error.strerror)
                await trio.sleep(0.1)
                continue
            client = _Client(_peer_of(stream))
            if not self._make_room(client.peer):
                log.debug("metrics endpoint: %d connections, closing a new one", self.active)
                await trio.aclose_forcefully(stream)
                continue
            self._clients[client] = None
            nursery.start_soon(self._connection, stream, client)

    def _make_room(self, peer: str) -> bool:
        """Room for one more from `peer`: under both bounds, or the oldest idle
        connection (of that peer when its bound is reached) given up."""
        if sum(1 for c in self._clients if c.peer == peer) >= self.limits.max_per_peer:
            return self._give_up_oldest_idle(peer)
        if self.active >= self.limits.max_connections:
            return self._give_up_oldest_idle(None)
        return True

    def _give_up_oldest_idle(self, peer: str | None) -> bool:
        for client in self._clients:
            if client.idle and (peer is None or client.peer == peer):
                del self._clients[client]
                client.scope.cancel()
                return True
        return False

    async def _connection(self, stream: trio.SocketStream, client: _Client) -> None:
        try:
            with client.scope, trio.move_on_after(self.limits.timeout) as scope:
                await self._exchange(stream, client)
            if scope.cancelled_caught or client.scope.cancelled_caught:
                log.debug("metrics endpoint: a client ran out of time or gave its place")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:  # no client may take the daemon down
            log.exception("metrics endpoint: unexpected error")
        finally:
            self._clients.pop(client, None)
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream, client: _Client) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        request = None
        try:
            with trio.move_on_after(self.limits.head_timeout):
                request = await self._read_request(conn, stream)
        except h11.RemoteProtocolError as error:
            await self._respond(conn, stream, error.error_status_hint, b"bad request\n")
            return
        client.idle = False  # its place is kept from now on
        if request is None:
            return  # closed (or out of time) before a whole request
        path = request.target.split(b"?", 1)[0]
        head, content_type = request.method == b"HEAD", _PLAIN
        if request.method not in (b"GET", b"HEAD"):
            status, body = 404, NOT_FOUND
        elif path == METRICS_PATH:
            try:
                status, body = 200, await self._render()
                content_type = CONTENT_TYPE
            except Exception:
                log.exception("metrics endpoint: render failed")
                status, body = 500, b"internal error\n"
        elif path == HEALTH_PATH:
            status, body = await self._health()
        else:
            status, body = 404, NOT_FOUND
        await self._respond(conn, stream, status, body, head, content_type)

    async def _health(self) -> tuple[int, bytes]:
        try:
            why = None if self.health is None else await self.health()
        except Exception:
            log.exception("metrics endpoint: health check failed")
            why = "the health check itself failed (see the daemon's log)"
        return health_answer(why)

    @staticmethod
    async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(_RECV_SIZE))
            elif isinstance(event, h11.Request):
                return event
            else:
                return None  # ConnectionClosed

    async def _render(self) -> bytes:
        # One render at a time: the lock's hand-over is a trip through the run
        # loop, so FUSE requests get their turn between two renders.
        async with self._render_lock:
            return self.render().encode()

    @staticmethod
    async def _respond(
        conn: h11.Connection,
        stream: trio.SocketStream,
        status: int,
        body: bytes,
        head: bool = False,
        content_type: str = _PLAIN,
    ) -> None:
        """The answer; to a HEAD, its status and headers (the length of the body a
        GET would get) and no body."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        reason = http.HTTPStatus(status).phrase
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        await stream.send_all(
            conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
        )
        if not head:
            await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))


def health_answer(why: str | None) -> tuple[int, bytes]:
    """`/healthz`'s status and body: 200 `ok`, or 503 and the reason."""
    if why is None:
        return 200, b"ok\n"
    return 503, f"unhealthy: {why}\n".encode(errors="replace")

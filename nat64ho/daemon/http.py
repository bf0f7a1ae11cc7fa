"""The HTTP/1.1 endpoints of a running server (``--api``, ``--metrics``):
a thin asyncio loop around h11's sans-I/O connection.

h11 parses every request (a short read that is one whole request, once:
see MAX_CACHED_READ); replies, always with a Content-Length, are written
here (the head of a reply is a few fixed lines), those to one read in one
write. The loop moves bytes and bounds what a client may hold: connections
(beyond MAX_CONNECTIONS one gets a 503 and is closed, so a flood cannot
take the server's descriptors), idle time, the size of a request head, and
replies it does not read (reading pauses while its replies wait to be
written). A route answers a request's query string with a :class:`Reply`,
or an awaitable of one when it must read the database; requests on one
connection are answered in order (keep-alive, pipelining).
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple, cast

import h11

log = logging.getLogger("nat64ho")

#: Connections held at once. Far above what its users keep open (an nginx
#: keeps a few dozen to an upstream per worker; Prometheus one), far below
#: the unit's 4,096 descriptors, which the UDP path and the database need too.
MAX_CONNECTIONS = 256
#: Seconds a connection may sit without sending a byte (between keep-alive
#: requests, or inside a slow request head) before it is closed: long enough
#: for a keep-alive pool under light load (nginx reopens what we close), short
#: enough that idle or slowloris connections cannot pile up to the cap.
IDLE_TIMEOUT = 30.0
#: A request head larger than this is no request of ours (a lookup is ~100
#: octets): answered 431 and closed.
MAX_HEAD = 8192
#: A read of at most this many octets that is one whole request is parsed by
#: h11 once and remembered (:func:`_whole_request`): a client asks about the
#: same endpoint again and again (nginx once per request on a kept-alive
#: connection), and h11's parse is most of a lookup's cost. nginx's lookup
#: is ~80 octets.
MAX_CACHED_READ = 256


class Reply(NamedTuple):
    """What a route answers; Content-Length is added when it is written."""

    status: int
    body: bytes
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: tuple[tuple[bytes, bytes], ...] = ()


#: A route: the query string (octets after ``?``) -> the reply.
Route = Callable[[bytes], "Reply | Awaitable[Reply]"]

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 22\r\nConnection: close\r\n\r\ntoo many connections\r\n"
)


def text(status: int, line: str) -> Reply:
    """A plain-text reply of one line."""
    return Reply(status, line.encode() + b"\n")


class HttpServer:
    """One listening socket (TCP or Unix) and its connections."""

    def __init__(self, routes: dict[bytes, Route], what: str):
        self.routes = routes
        self.what = what  #: for log lines: "api", "metrics"
        self.connections: set[_Connection] = set()
        self.refused = 0  #: connections turned away at the cap
        self._server: asyncio.AbstractServer | None = None
        self._unix: Path | None = None
        self._errors_logged = 0

    async def start(self, where: tuple[str, int] | str) -> str:
        """Listen on (host, port) or on a Unix socket path; the address as
        text (``http://host:port``, ``unix:PATH``)."""
        loop = asyncio.get_running_loop()
        shown = f"unix:{where}" if isinstance(where, str) else f"{where[0]}:{where[1]}"
        try:
            if isinstance(where, str):
                path = Path(where)
                _remove_stale(path)
                self._server = await loop.create_unix_server(lambda: _Connection(self), str(path))
                self._unix = path
                # Only the owner and its group (nat64ho in the installed
                # unit) may ask who the clients are.
                os.chmod(path, 0o660)
                return shown
            host, port = where
            self._server = await loop.create_server(lambda: _Connection(self), host, port)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise OSError(exc.errno, f"--{self.what} {shown}: cannot listen: {why}") from None
        name = self._server.sockets[0].getsockname()
        return f"http://{'[' + name[0] + ']' if ':' in name[0] else name[0]}:{name[1]}"

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for c in list(self.connections):
            c.close()
        await self._server.wait_closed()
        if self._unix is not None:
            try:
                self._unix.unlink()
            except OSError:
                pass

    def bug(self, exc: BaseException) -> None:
        # A route that raises is a bug: the client gets a 500, the journal a
        # few tracebacks, not one per request.
        self._errors_logged += 1
        if self._errors_logged <= 10:
            log.error("bug: %s request raised", self.what, exc_info=exc)


def _remove_stale(path: Path) -> None:
    """Remove a socket left by a server that died; refuse to take over one
    that still answers, or a path that is not a socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise OSError(f"{path}: another process is listening there")


class _Connection(asyncio.Protocol):
    __slots__ = (
        "owner",
        "conn",
        "fresh",
        "transport",
        "loop",
        "busy",
        "request",
        "keep",
        "out",
        "last",
        "timer",
        "task",
    )

    def __init__(self, owner: HttpServer):
        self.owner = owner
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.fresh = True  #: ``conn`` has been fed nothing yet
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.busy = False  #: a reply is being computed: later requests wait
        self.request: h11.Request | None = None
        self.keep = False  #: the connection stays open after the reply to ``request``
        #: Replies not yet written: those to the requests of one read go out
        #: in one write (pipelining, or nginx's requests queued while busy).
        self.out: list[bytes] = []
        self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Future[Reply] | None = None

    # ------------------------------------------------------------ transport
    def connection_made(self, base: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, base)  # a stream's
        owner = self.owner
        if len(owner.connections) >= MAX_CONNECTIONS:
            owner.refused += 1
            transport.write(_BUSY)
            transport.close()
            return
        owner.connections.add(self)
        self.last = self.loop.time()
        self.timer = self.loop.call_later(IDLE_TIMEOUT, self._idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        # A client that sends requests without reading the replies waits.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _idle(self) -> None:
        loop = self.loop
        left = self.last + IDLE_TIMEOUT - loop.time()
        if left > 0 or self.busy:
            self.timer = loop.call_later(max(left, 1.0), self._idle)
        else:
            self.close()

    def data_received(self, data: bytes) -> None:
        self.last = self.loop.time()
        if self.fresh and not self.busy and len(data) <= MAX_CACHED_READ:
            whole = _whole_request(data)
            if whole is not None:
                # What h11 made of these very octets on a fresh connection;
                # ours stays fresh, fed nothing.
                self.request, self.keep = whole
                self._dispatch()
                self._flush()
                return
        self.conn.receive_data(data)
        self.fresh = False
        self._next()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self.fresh = False
        self._next()
        return False

    # ------------------------------------------------------------ requests
    def _next(self) -> None:
        """Answer what has been read, as far as it goes, then write."""
        # A fresh h11 connection fed nothing (the usual state after a
        # reply) has no event to give: it is not asked.
        while not self.busy and not self.fresh:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(exc.error_status_hint, str(exc))
                return
            kind = type(event)
            if kind is h11.Request:
                self.request = req = cast(h11.Request, event)
                self.keep = _keep_alive(req)
            elif kind is h11.EndOfMessage:
                self._dispatch()
            elif event is h11.NEED_DATA or event is h11.PAUSED:
                break
            elif kind is h11.ConnectionClosed:
                self._flush()
                self.close()
                return
            # h11.Data: a body, which no route takes; read and dropped.
        self._flush()

    def _flush(self) -> None:
        out = self.out
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _dispatch(self) -> None:
        req = self.request
        assert req is not None
        path, _, query = req.target.partition(b"?")
        route = self.owner.routes.get(path)
        if route is None:
            self._send(
                text(404, "not found: see " + " ".join(r.decode() for r in self.owner.routes))
            )
            return
        if req.method not in (b"GET", b"HEAD"):
            self._send(text(405, "GET only"), (b"allow", b"GET, HEAD"))
            return
        try:
            reply = route(query)
        except Exception as exc:
            self.owner.bug(exc)
            self._send(text(500, "internal error"))
            return
        if isinstance(reply, Reply):
            self._send(reply)
            return
        self.busy = True
        self.task = asyncio.ensure_future(reply)
        self.task.add_done_callback(self._computed)

    def _computed(self, task: asyncio.Future[Reply]) -> None:
        self.task = None
        self.busy = False
        if task.cancelled() or self.transport is None or self.transport.is_closing():
            return
        exc = task.exception()
        if exc is not None:
            self.owner.bug(exc)
            self._send(text(500, "internal error"))
        else:
            self._send(task.result())
        self._next()

    def _send(self, reply: Reply, *extra: tuple[bytes, bytes]) -> None:
        """Queue ``reply``; then the next request, on a fresh h11 connection
        fed what this one had read past the request (pipelining).

        A fresh connection rather than h11's ``start_next_cycle``: that
        needs the reply written through h11's own writer, which costs far
        more than a new connection does."""
        req = self.request
        assert req is not None and self.transport is not None
        keep = self.keep
        self.out.append(_render(reply, req.method == b"HEAD", keep, extra))
        if not keep:
            self._flush()
            self.close()
            return
        self.request = None
        if self.fresh:  # a remembered request: ``conn`` was never fed
            return
        data, closed = self.conn.trailing_data
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.fresh = not (data or closed)
        if data:
            self.conn.receive_data(data)
        if closed:
            self.conn.receive_data(b"")

    def _refuse(self, status: int, why: str) -> None:
        """A request h11 cannot parse: the status alone, then close."""
        status = 431 if "incomplete event" in why else status
        self.out.append(_render(Reply(status, b""), False, False, ()))
        self._flush()
        self.close()


@functools.lru_cache(maxsize=2048)
def _whole_request(data: bytes) -> tuple[h11.Request, bool] | None:
    """(the request, keep-alive) when ``data`` is exactly one request without
    a body, as h11 parses it on a fresh connection; None otherwise (a part
    of one, more than one, a body, an error), for h11 to take the slow way."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(data)
    try:
        req = conn.next_event()
        end = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if type(req) is not h11.Request or type(end) is not h11.EndOfMessage:
        return None
    if conn.trailing_data != (b"", False):
        return None
    return req, _keep_alive(req)


def _keep_alive(req: h11.Request) -> bool:
    # HTTP/1.1 keeps the connection unless asked not to; 1.0 closes it (as
    # h11 would decide).
    if req.http_version != b"1.1":
        return False
    return not any(
        name == b"connection" and b"close" in value.lower() for name, value in req.headers
    )


def _render(reply: Reply, head: bool, keep: bool, extra: tuple[tuple[bytes, bytes], ...]) -> bytes:
    # h11 parses every request; replies are ours alone, always with a
    # Content-Length, so their head is a few fixed lines. h11's own writer
    # costs as much as the rest of a lookup together.
    lines = [
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
        % (reply.status, _REASONS.get(reply.status, b""), reply.content_type, len(reply.body))
    ]
    for name, value in (*reply.headers, *extra):
        lines.append(name + b": " + value + b"\r\n")
    if not keep:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    if not head:
        lines.append(reply.body)
    return b"".join(lines)

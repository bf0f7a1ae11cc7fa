"""Asking a running nat64ho server which IPv6 client holds a NAT64's port,
from Python applications: :func:`lookup` and :func:`alookup` over the API of
``serve --api`` (docs/api.md).

One request per call, on a connection of its own: a Unix socket costs a
fraction of a millisecond. The request is written and the answer read with
h11, the same sans-I/O code for the blocking and the asyncio form.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.parse
from typing import NamedTuple

import h11

#: Where the installed unit serves the API (install.sh --api).
DEFAULT_API = "unix:/run/nat64ho/api.sock"
#: Seconds a lookup may take, connecting included: an application asks on
#: its request path, so it must give up quickly (and keep the NAT64's address).
TIMEOUT = 1.0
#: The largest answer read: a lookup's is about 200 octets.
MAX_ANSWER = 16384


class ApiError(Exception):
    """The API could not be reached, or did not answer the question."""


class Holder(NamedTuple):
    """The client that holds (or held, with ``at``) a NAT64's port."""

    address: str  #: IPv6, RFC 5952
    port: int
    since: str | None  #: RFC 3339 UTC; None when the history does not say


def _where(api: str) -> tuple[str, tuple[str, int] | None]:
    """(Unix path, None) or ("", (host, port)) of ``unix:PATH`` or ``HOST:PORT``."""
    if api.startswith("unix:"):
        return api[5:], None
    host, sep, port = api.rpartition(":")
    if not sep or not port.isdigit():
        raise ApiError(f"{api!r}: expected unix:PATH or HOST:PORT")
    return "", (host.strip("[]"), int(port))


def _target(nat: str, port: int, at: str | None) -> str:
    query = {"nat": nat, "port": str(port)}
    if at is not None:
        query["at"] = at
    return "/v1/client?" + urllib.parse.urlencode(query)


def _request(target: str) -> tuple[h11.Connection, bytes]:
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(
        h11.Request(
            method="GET",
            target=target,
            headers=[("host", "nat64ho"), ("connection", "close")],
        )
    )
    data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
    return conn, data


class _Answer:
    """Feeds the answer's octets to h11 until the message is complete."""

    def __init__(self, conn: h11.Connection):
        self.conn = conn
        self.status = 0
        self.body = b""

    def feed(self, data: bytes) -> bool:
        """Whether the answer is complete."""
        self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ApiError(f"not an HTTP answer: {exc}") from None
            if event is h11.NEED_DATA:
                if not data:
                    raise ApiError("the API closed the connection before answering")
                return False
            if isinstance(event, h11.Response):
                self.status = event.status_code
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > MAX_ANSWER:
                    raise ApiError("answer too long")
            elif isinstance(event, h11.EndOfMessage):
                return True


def _holder(status: int, body: bytes) -> Holder | None:
    if status != 200:
        line = body.decode(errors="replace").strip()
        raise ApiError(f"the API answered {status}: {line}")
    try:
        found = json.loads(body)
    except ValueError:
        raise ApiError("the API's answer is not JSON") from None
    if found.get("address") is None:
        return None
    return Holder(found["address"], found["client_port"], found.get("since"))


def lookup(
    nat: str, port: int, *, api: str = DEFAULT_API, at: str | None = None, timeout: float = TIMEOUT
) -> Holder | None:
    """The client holding ``nat``:``port`` now (or at the RFC 3339 instant
    ``at``); None if no client does, or ``nat`` is no NAT64 of that server.
    Raises ApiError when the API cannot be asked."""
    return _holder(*fetch(api, _target(nat, port, at), timeout))


async def alookup(
    nat: str, port: int, *, api: str = DEFAULT_API, at: str | None = None, timeout: float = TIMEOUT
) -> Holder | None:
    """:func:`lookup` for asyncio."""
    return _holder(*await afetch(api, _target(nat, port, at), timeout))


def fetch(api: str, target: str, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    """(status, body) of GET ``target`` from the endpoint ``api``
    (``unix:PATH`` or ``HOST:PORT``); ApiError when it cannot be asked."""
    path, hostport = _where(api)
    conn, request = _request(target)
    answer = _Answer(conn)
    try:
        if hostport is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(path)
        else:
            s = socket.create_connection(hostport, timeout)
        with s:
            s.sendall(request)
            while not answer.feed(s.recv(65536)):
                pass
    except OSError as exc:
        raise ApiError(f"{api}: {exc.strerror or exc}") from None
    return answer.status, answer.body


async def afetch(api: str, target: str, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    """:func:`fetch` for asyncio."""
    path, hostport = _where(api)
    conn, request = _request(target)
    answer = _Answer(conn)
    writer = None
    try:
        async with asyncio.timeout(timeout):
            if hostport is None:
                reader, writer = await asyncio.open_unix_connection(path)
            else:
                reader, writer = await asyncio.open_connection(*hostport)
            writer.write(request)
            while not answer.feed(await reader.read(65536)):
                pass
    except TimeoutError:
        raise ApiError(f"{api}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise ApiError(f"{api}: {exc.strerror or exc}") from None
    finally:
        if writer is not None:
            writer.close()
    return answer.status, answer.body

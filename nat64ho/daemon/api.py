"""The attribution API (``serve --api``): which client holds a NAT64's
port, answered by the running server from its table (memory first, then the
database), or at an instant of the past from the history.

    GET /v1/client?nat=192.0.2.9&port=14106[&at=TIME]

Only what was acknowledged is answered: an entry whose commit is still
pending is not (the NAT64 has not been told its port, so no connection can
use it yet), and its port's previous holder, still the one in the database,
is answered instead. No holder is a 200 too, with ``"address": null``, so
that nginx's ``auth_request`` passes the request on (docs/api.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import json
import socket
import sqlite3
import threading
import urllib.parse
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from nat64ho.daemon.http import Reply, Route, text
from nat64ho.errors import DatabaseError
from nat64ho.eventlog import ipv4_str, ipv6_str, ts_from_datetime, ts_rfc3339

if TYPE_CHECKING:
    from nat64ho.daemon.protocol import Server

PATH = b"/v1/client"
JSON = b"application/json"
#: The response headers nginx copies with auth_request_set.
CLIENT_HEADER = b"x-nat64ho-client"
CLIENT_PORT_HEADER = b"x-nat64ho-client-port"
_PARAMS = ("nat", "port", "at")


class BadQuery(ValueError):
    """A query the API cannot answer; the message is the 400's line."""


def rfc3339(ts: int | None) -> str | None:
    return None if ts is None else ts_rfc3339(ts)


def parse_query(query: bytes) -> tuple[int, int, int | None]:
    """(NAT64 as an int, port, instant in µs or None) of a query string;
    raises BadQuery."""
    try:
        raw = query.decode("ascii")
    except UnicodeDecodeError:
        raise BadQuery("the query is not ASCII") from None
    got: dict[str, str] = {}
    for part in raw.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        if key not in _PARAMS:
            raise BadQuery(f"unknown parameter {key!r:.40} (known: nat, port, at)")
        if key in got:
            raise BadQuery(f"{key} given twice")
        got[key] = urllib.parse.unquote(value)
    if "nat" not in got or "port" not in got:
        raise BadQuery("give nat=IPV4 and port=N")
    try:
        nat = int.from_bytes(socket.inet_pton(socket.AF_INET, got["nat"]), "big")
    except OSError:
        raise BadQuery(f"nat {got['nat']!r:.60}: not an IPv4 address") from None
    port = got["port"]
    if not (port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise BadQuery(f"port {port!r:.20}: not a port number (1-65535)")
    at = None
    if "at" in got:
        when = got["at"]
        try:
            at = ts_from_datetime(dt.datetime.fromisoformat(when.replace("Z", "+00:00")))
        except (ValueError, OverflowError):
            raise BadQuery(
                f"at {when!r:.60}: not a time (RFC 3339, e.g. 2026-01-02T03:04:05Z)"
            ) from None
    return nat, int(port), at


#: Query strings of at most this many octets have their parse cached (a
#: lookup's is ~30): nginx asks about a connection's endpoint once per request
#: it carries. Longer ones (padding with "&&&") would only fill the cache.
MAX_CACHED_QUERY = 64
_parse_cached = functools.lru_cache(maxsize=4096)(parse_query)


def _answer(
    nat: int,
    port: int,
    addr: bytes | None,
    aport: int | None,
    since: int | None,
    why: str | None = None,
    **more: Any,
) -> Reply:
    if addr is not None and aport is not None and since is not None and not more:
        return _found(nat, port, addr, aport, since)
    body: dict[str, Any] = {"nat": ipv4_str(nat), "port": port}
    if addr is None:
        body.update(address=None, why=why)
        return Reply(200, json.dumps(body).encode() + b"\n", JSON)
    address = ipv6_str(addr)
    body.update(address=address, client_port=aport, since=rfc3339(since), **more)
    headers = ((CLIENT_HEADER, address.encode()), (CLIENT_PORT_HEADER, str(aport).encode()))
    return Reply(200, json.dumps(body).encode() + b"\n", JSON, headers)


def _found(nat: int, port: int, addr: bytes, aport: int, since: int) -> Reply:
    # The answer to nearly every lookup, written as json.dumps would write
    # it (same keys, order and spacing) at a fifth of its cost: every value
    # is a number or text of digits, hex, dots, colons, dashes and letters,
    # which JSON takes unescaped.
    address = ipv6_str(addr)
    body = (
        f'{{"nat": "{ipv4_str(nat)}", "port": {port}, "address": "{address}", '
        f'"client_port": {aport}, "since": "{ts_rfc3339(since)}"}}\n'
    ).encode()
    headers = ((CLIENT_HEADER, address.encode()), (CLIENT_PORT_HEADER, b"%d" % aport))
    return Reply(200, body, JSON, headers)


class Api:
    """The ``/v1/client`` route of one server."""

    def __init__(self, server: Server):
        self.server = server
        # The history is read with the operator commands' queries, on a
        # connection of its own in a thread of its own, so that a slow
        # read never holds the event loop or the datagram path's reads.
        self._history = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="api")
        self._local = threading.local()

    def close(self) -> None:
        def close_conn() -> None:
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()

        self._history.submit(close_conn)
        self._history.shutdown(wait=True)

    def client(self, query: bytes) -> Reply | Awaitable[Reply]:
        try:
            nat, port, at = (_parse_cached if len(query) <= MAX_CACHED_QUERY else parse_query)(
                query
            )
        except BadQuery as exc:
            return text(400, str(exc))
        if at is not None:
            return self._past(nat, port, at)
        server = self.server
        state = server.tables.nats.get(nat)
        if state is None and nat not in server.sessions.boots:
            return _answer(nat, port, None, None, None, "not a NAT64 of this server")
        if state is not None:
            e = state.table.by_port.get(port)
            if e is not None and e.seq <= server.store.committed_seq:
                return _answer(nat, port, e.addr, e.aport, e.created)
        return self._read(nat, port)

    async def _read(self, nat: int, port: int) -> Reply:
        try:
            rows = await self.server.store.read_ports(nat, [port])
        except (DatabaseError, OSError) as exc:
            return text(503, f"database: {exc}")
        if not rows:
            return _answer(nat, port, None, None, None, "no entry")
        r = rows[0]
        return _answer(nat, port, r.addr, r.aport, r.created)

    async def _past(self, nat: int, port: int, at: int) -> Reply:
        loop = asyncio.get_running_loop()
        try:
            h = await loop.run_in_executor(self._history, self._who, nat, port, at)
        except DatabaseError as exc:
            return text(503, f"database: {exc}")
        if h is None:
            return _answer(nat, port, None, None, None, "no entry at that time", at=rfc3339(at))
        return _answer(
            nat,
            port,
            h.addr,
            h.aport,
            h.start,
            until=rfc3339(h.end),
            current=h.current,
            at=rfc3339(at),
        )

    def _who(self, nat: int, port: int, at: int) -> Any:
        from nat64ho.ops import queries

        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        try:
            return queries.who_port(conn, nat, port, at)
        except (DatabaseError, sqlite3.Error, OSError) as exc:
            # A lost PostgreSQL session or a damaged file: start over next time.
            self._local.conn = None
            conn.close()
            raise DatabaseError(str(exc)) from None

    def _connect(self) -> Any:
        from nat64ho.ops import db

        return db.connect(self.server.config.db, name="nat64ho api")


def health(server: Server) -> Route:
    """``/health``: whether the server can acknowledge new entries, from
    its own state: no table is read or written, nothing is logged, so a
    monitoring check leaves no trace (``nat64ho probe --health``)."""

    def route(query: bytes) -> Reply:
        failing = server.store.failing
        body = {"status": "ok" if failing is None else "failing", "store_failing": failing}
        return Reply(200 if failing is None else 503, json.dumps(body).encode() + b"\n", JSON)

    return route

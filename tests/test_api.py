"""The attribution API of ``serve --api`` and the endpoint code it shares
with ``--metrics``, over real sockets to a real server process: answers
(found, absent, not a NAT64, the past), bad requests, keep-alive, the
connection cap and the idle timeout, ``probe --health``; and the Python
client and the ASGI middleware, under a real uvicorn."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nat64ho import client
from nat64ho.core import wire
from nat64ho.daemon import http as httpd
from tests.helpers import connect, db_rows, nat64ho, run, v6, wait_for


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 5.0):
        super().__init__("nat64ho", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def get(conn: http.client.HTTPConnection, target: str, method: str = "GET"):
    conn.request(method, target)
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read()


@pytest.fixture
def api_server(server_factory, tmp_path):
    def start(*args: str, db=None):
        sock = tmp_path / "api.sock"
        srv = server_factory("--hello-rate", "0", "--api", f"unix:{sock}", *args, db=db)
        wait_for(lambda: "API on unix:" in srv.stderr)
        return srv, str(sock)

    return start


def test_found_absent_not_a_nat64_and_the_past(api_server, db_target):
    """On both backends, with one port so that the second client's MAP
    deletes the first's entry: the current holder from memory, the earlier
    one from the history, the instant of a Created itself included."""
    srv, sock = api_server("--ports", "1028-1028", db=db_target)

    async def go():
        c = await connect(srv)
        first = await c.map(v6(1), 1111)
        # Asked within the same millisecond as the MAPPING came: found.
        now = client.lookup("127.0.0.1", 1028, api=f"unix:{sock}")
        second = await c.map(v6(2), 2222)
        c.close()
        return first, now, second

    first, now, second = run(go())
    assert [type(m) for m in first] == [wire.Mapping]
    assert now is not None and (now.address, now.port) == ("2001:db8::1", 1111)
    assert [type(m) for m in second] == [wire.Deleted, wire.Mapping]

    conn = UnixHTTPConnection(sock)
    status, headers, body = get(conn, "/v1/client?nat=127.0.0.1&port=1028")
    found = json.loads(body)
    assert status == 200 and headers["x-nat64ho-client"] == "2001:db8::2"
    assert headers["x-nat64ho-client-port"] == "2222"
    assert (found["nat"], found["port"], found["address"], found["client_port"]) == (
        "127.0.0.1",
        1028,
        "2001:db8::2",
        2222,
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", found["since"])

    # The past, from the history: the instants of the two Created events.
    export = nat64ho("export", "--db", str(db_target), "--format", "jsonl")
    created = [e for e in map(json.loads, export.stdout.splitlines()) if e["event"] == "Created"]
    assert len(created) == 2, export.stdout
    t1, t2 = (e["ts"] for e in created)
    for at, who in ((t1, "2001:db8::1"), (t2, "2001:db8::2")):
        holder = client.lookup("127.0.0.1", 1028, api=f"unix:{sock}", at=at)
        assert holder is not None and holder.address == who and holder.since == at
    # One µs before the first Created: nobody held the port.
    before = dt.datetime.fromisoformat(t1[:-1]) - dt.timedelta(microseconds=1)
    assert client.lookup("127.0.0.1", 1028, api=f"unix:{sock}", at=f"{before.isoformat()}Z") is None

    # A port with no entry, and an address that is no NAT64: a 2xx without
    # the client header, so nginx's auth_request lets the request through.
    status, headers, body = get(conn, "/v1/client?nat=127.0.0.1&port=4000")
    assert status == 200 and "x-nat64ho-client" not in headers
    assert json.loads(body) == {
        "nat": "127.0.0.1",
        "port": 4000,
        "address": None,
        "why": "no entry",
    }
    status, headers, body = get(conn, "/v1/client?nat=198.51.100.7&port=1028")
    assert status == 200 and "x-nat64ho-client" not in headers
    assert json.loads(body)["why"] == "not a NAT64 of this server"
    conn.close()


def test_after_a_restart_the_answer_comes_from_the_database(api_server, db_target):
    srv, sock = api_server(db=db_target)

    async def go():
        c = await connect(srv)
        got = await c.map(v6(7), 7777)
        c.close()
        return got[0].nat_port

    port = run(go())
    srv.restart()
    wait_for(lambda: "API on unix:" in srv.stderr)
    holder = client.lookup("127.0.0.1", port, api=f"unix:{sock}")
    assert holder is not None and (holder.address, holder.port) == ("2001:db8::7", 7777)


@pytest.mark.parametrize(
    ("target", "line"),
    [
        ("/v1/client?nat=127.0.0.1", "give nat=IPV4 and port=N"),
        ("/v1/client?nat=2001:db8::1&port=1", "nat '2001:db8::1': not an IPv4 address"),
        ("/v1/client?nat=127.0.0.1&port=70000", "port '70000': not a port number (1-65535)"),
        ("/v1/client?nat=127.0.0.1&port=1&port=2", "port given twice"),
        (
            "/v1/client?nat=127.0.0.1&port=1&who=me",
            "unknown parameter 'who' (known: nat, port, at)",
        ),
        (
            "/v1/client?nat=127.0.0.1&port=1&at=yesterday",
            "at 'yesterday': not a time (RFC 3339, e.g. 2026-01-02T03:04:05Z)",
        ),
    ],
)
def test_bad_parameters_get_400_and_one_line(api_server, target, line):
    _, sock = api_server()
    conn = UnixHTTPConnection(sock)
    status, _, body = get(conn, target)
    assert (status, body.decode()) == (400, line + "\n")
    # The connection stays usable: keep-alive after an error.
    status, _, _ = get(conn, "/v1/client?nat=127.0.0.1&port=1")
    assert status == 200


def test_other_paths_and_methods_and_oversized_heads(api_server):
    _, sock = api_server()
    conn = UnixHTTPConnection(sock)
    assert get(conn, "/v2/client")[0] == 404
    status, headers, _ = get(conn, "/v1/client?nat=127.0.0.1&port=1", "POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
        s.sendall(b"GET /v1/client HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 20000)
        assert s.recv(100).startswith(b"HTTP/1.1 431 ")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
        s.sendall(b"NOT HTTP\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400 ")


def test_the_socket_is_0660_and_a_stale_one_is_replaced(api_server, tmp_path):
    stale = tmp_path / "api.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))  # bound, never listening: what a killed server leaves
    s.close()
    _, sock = api_server()
    assert oct(stale.stat().st_mode & 0o777) == "0o660"


def test_workers_with_the_api_are_refused_in_one_line(tmp_path):
    out = nat64ho("serve", "--db", str(tmp_path / "t.db"), "--workers", "2", "--api", "unix:x")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "Error: --workers above 1 with --api: each worker holds only its NAT64s' "
        "tables; run one worker to use the API"
    )
    assert not (tmp_path / "t.db").exists()


def test_the_connection_cap_holds_and_the_server_still_answers(server_factory, tmp_path):
    """Twice the cap of connections, held open: the excess is refused at
    once (503), the server keeps its descriptors bounded, answers its NAT64s
    and, as soon as connections close, HTTP again."""
    srv = server_factory("--metrics", "127.0.0.1:0")
    host, port = wait_for(
        lambda: re.search(r"metrics on http://([\d.]+):(\d+)", srv.stderr)
    ).groups()
    fds_before = len(list(Path(f"/proc/{srv.proc.pid}/fd").iterdir()))
    held = []
    refused = 0
    try:
        for _ in range(2 * httpd.MAX_CONNECTIONS):
            s = socket.create_connection((host, int(port)), 5)
            held.append(s)
        for s in held:
            s.settimeout(0.05)
            try:
                if s.recv(200).startswith(b"HTTP/1.1 503 "):
                    refused += 1
            except TimeoutError:
                pass
        assert refused == httpd.MAX_CONNECTIONS
        fds = len(list(Path(f"/proc/{srv.proc.pid}/fd").iterdir()))
        assert fds <= fds_before + httpd.MAX_CONNECTIONS + 5

        async def go():
            c = await connect(srv)
            got = await c.map(v6(1), 1)
            c.close()
            return got

        assert [type(m) for m in run(go())] == [wire.Mapping]
    finally:
        for s in held:
            s.close()
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    status, _, body = wait_for(lambda: (r := get(conn, "/metrics"))[0] == 200 and r)
    assert b"nat64ho_build_info{" in body and b"process_open_fds " in body
    refused_line = f'nat64ho_http_connections_refused_total{{endpoint="metrics"}} {refused}.0'
    assert refused_line.encode() in body
    assert srv.proc.poll() is None


def test_idle_connections_are_closed(monkeypatch, tmp_path):
    """In-process with a short timeout: a silent connection is closed, one
    that keeps asking is not."""
    import asyncio

    monkeypatch.setattr(httpd, "IDLE_TIMEOUT", 0.3)

    async def go():
        server = httpd.HttpServer({b"/x": lambda q: httpd.text(200, "x")}, "api")
        await server.start(str(tmp_path / "s"))
        quiet_r, _ = await asyncio.open_unix_connection(str(tmp_path / "s"))
        busy_r, busy_w = await asyncio.open_unix_connection(str(tmp_path / "s"))
        for _ in range(8):
            busy_w.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await busy_r.readuntil(b"x\n")).startswith(b"HTTP/1.1 200 OK")
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(quiet_r.read(), 2) == b""  # closed by the server
        assert len(server.connections) == 1
        await server.stop()

    run(go())


def test_requests_in_one_read_then_eof_are_all_answered_then_closed(tmp_path):
    """In-process: two requests and the client's end of sending arrive
    together; both are answered, in order, and then the connection closes
    (the second on an h11 connection made after the first reply)."""
    import asyncio

    async def go():
        server = httpd.HttpServer({b"/x": lambda q: httpd.text(200, q.decode())}, "api")
        await server.start(str(tmp_path / "s"))
        r, w = await asyncio.open_unix_connection(str(tmp_path / "s"))
        w.write(b"GET /x?1 HTTP/1.1\r\nHost: a\r\n\r\nGET /x?2 HTTP/1.1\r\nHost: a\r\n\r\n")
        w.write_eof()
        data = await asyncio.wait_for(r.read(), 5)  # to EOF: the server closed
        await server.stop()
        return data

    data = run(go())
    assert re.findall(rb"HTTP/1.1 200 OK\r\n.*?\r\n\r\n(\d)\n", data, re.S) == [b"1", b"2"]


def test_a_request_read_again_is_answered_alike_however_it_arrives(tmp_path):
    """In-process: the same request head read whole (parsed once, then
    remembered), in two pieces, with a body, as HTTP/1.0 and as a HEAD:
    each gets the answer h11's parse gives it, in order."""
    import asyncio

    head = b"GET /x?a HTTP/1.1\r\nHost: a\r\n\r\n"

    async def go():
        server = httpd.HttpServer({b"/x": lambda q: httpd.text(200, q.decode())}, "api")
        await server.start(str(tmp_path / "s"))
        r, w = await asyncio.open_unix_connection(str(tmp_path / "s"))

        async def answer(*pieces: bytes) -> bytes:
            for p in pieces:
                w.write(p)
                await w.drain()
                await asyncio.sleep(0.02)  # each piece a read of its own
            got = await r.readuntil(b"\r\n\r\n")
            if pieces[0].startswith(b"HEAD "):
                return got
            length = int(re.search(rb"content-length: (\d+)", got).group(1))
            return got + await r.readexactly(length)

        got = [await answer(head) for _ in range(3)]
        got.append(await answer(head[:9], head[9:]))
        got.append(await answer(b"GET /x?b HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nxyz"))
        got.append(await answer(b"HEAD /x?c HTTP/1.1\r\nHost: a\r\n\r\n"))
        got.append(await answer(head))
        w.write(b"GET /x?d HTTP/1.0\r\n\r\n")
        last = await asyncio.wait_for(r.read(), 5)  # HTTP/1.0: closed after it
        await server.stop()
        return got, last

    got, last = run(go())
    bodies = [g.split(b"\r\n\r\n", 1)[1] for g in got]
    assert bodies == [b"a\n"] * 4 + [b"b\n", b"", b"a\n"]
    assert b"content-length: 2\r\n" in got[5]  # the HEAD's length is the GET's
    assert last.endswith(b"connection: close\r\n\r\nd\n")
    assert httpd._whole_request(head) is httpd._whole_request(head)  # remembered
    assert httpd._whole_request(head[:9]) is None
    assert httpd._whole_request(head + head) is None  # two: h11 takes them one by one


def test_a_request_read_while_one_is_computed_waits_its_turn(tmp_path):
    """In-process: a remembered request whose route must wait (as a read of
    the database does), and two more read while it waits, one of them the
    same head: answered in order, each once."""
    import asyncio

    async def slow(q: bytes) -> httpd.Reply:
        await asyncio.sleep(0.1)
        return httpd.text(200, "slow " + q.decode())

    head = b"GET /slow?1 HTTP/1.1\r\nHost: a\r\n\r\n"

    async def go():
        routes = {b"/slow": slow, b"/x": lambda q: httpd.text(200, q.decode())}
        server = httpd.HttpServer(routes, "api")
        await server.start(str(tmp_path / "s"))
        r, w = await asyncio.open_unix_connection(str(tmp_path / "s"))
        for request in (head, head):  # once to be remembered, once remembered
            w.write(request)
            await asyncio.sleep(0.02)  # a read of its own; the route is waiting
            w.write(b"GET /x?2 HTTP/1.1\r\nHost: a\r\n\r\n")
            await asyncio.sleep(0.02)
            w.write(head)
        w.write(b"GET /x?3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(r.read(), 5)
        await server.stop()
        return data

    data = run(go())
    bodies = re.findall(rb"\r\n\r\n([^\r]*?)\n", data)
    assert bodies == [b"slow 1", b"2", b"slow 1"] * 2 + [b"3"]


def test_health_answers_from_the_endpoint_and_writes_nothing(server_factory, tmp_path):
    srv = server_factory("--metrics", "127.0.0.1:0", "--api", f"unix:{tmp_path}/a.sock")
    host, port = wait_for(
        lambda: re.search(r"metrics on http://([\d.]+):(\d+)", srv.stderr)
    ).groups()
    wait_for(lambda: "API on" in srv.stderr)

    def evidence() -> tuple:
        history = nat64ho("export", "--db", str(srv.db), "--format", "jsonl").stdout
        boots = db_rows(srv.db, "SELECT nat, boot_id FROM nat")
        return srv.log.read_bytes(), history, boots

    before = evidence()
    for where in (f"{host}:{port}", f"unix:{tmp_path}/a.sock"):
        out = nat64ho("probe", "--health", where)
        assert (out.returncode, out.stdout.strip()) == (0, "ok"), out.stderr
    time.sleep(1.5)  # past a commit interval and a recency save
    assert evidence() == before
    # Unlike the probe a NAT64 would make, which is a new boot, logged.
    assert nat64ho("probe", f"127.0.0.1:{srv.port}").returncode == 0
    wait_for(lambda: b" Initialized 127.0.0.1" in srv.log.read_bytes())
    srv.stop()
    out = nat64ho("probe", "--health", f"{host}:{port}")
    assert out.returncode == 1 and out.stderr.startswith("Error: ")


# ------------------------------------------------------------------ client, ASGI


def test_client_errors_are_named(tmp_path):
    with pytest.raises(client.ApiError, match="No such file"):
        client.lookup("192.0.2.9", 1, api=f"unix:{tmp_path}/none.sock")
    with pytest.raises(client.ApiError, match="expected unix:PATH or HOST:PORT"):
        client.lookup("192.0.2.9", 1, api="somewhere")


ASGI_APP = """
import json
from nat64ho.asgi import RealClient

async def echo(scope, receive, send):
    body = json.dumps({"client": list(scope["client"]),
                       "nat64": list(scope.get("nat64ho.nat64") or [])}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})

app = RealClient(echo, api="unix:SOCK", nat64s=["127.0.0.2/32"])
down = RealClient(echo, api="unix:SOCK.none", nat64s=["127.0.0.2/32"])
"""


@pytest.mark.parametrize("which", ["app", "down"])
def test_asgi_middleware_under_uvicorn(api_server, tmp_path, which):
    """A TCP connection from the NAT64's address and port (what a NAT64
    would open) reaches the app as its IPv6 client; another address stays
    as it is; with the API down, the NAT64's address stays (fail open)."""
    pytest.importorskip("uvicorn")
    srv, sock = api_server()

    async def go():
        c = await connect(srv, local="127.0.0.2")
        got = await c.map(v6(9), 9999)
        c.close()
        return got[0].nat_port

    nat_port = run(go())
    (tmp_path / "asgiapp.py").write_text(ASGI_APP.replace("SOCK", sock))
    uv = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(tmp_path),
            f"asgiapp:{which}",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        for line in uv.stderr:
            m = re.search(r"running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port is not None

        def ask(source: tuple[str, int]) -> dict:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(source)
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            s.close()
            return json.loads(data.split(b"\r\n\r\n", 1)[1])

        seen = ask(("127.0.0.2", nat_port))
        if which == "app":
            assert seen == {"client": ["2001:db8::9", 9999], "nat64": ["127.0.0.2", nat_port]}
        else:
            assert seen == {"client": ["127.0.0.2", nat_port], "nat64": []}
        other = ask(("127.0.0.3", 0))
        assert other["client"][0] == "127.0.0.3" and other["nat64"] == []
    finally:
        uv.terminate()
        uv.wait(10)


def test_an_entry_is_answered_from_memory_only_once_committed(tmp_path):
    """In-process, one port: the MAP that takes it from an older client is
    decided at once, but until its commit the API does not answer the new
    client from memory (the NAT64 has not been told); after it, it does."""
    import asyncio

    from nat64ho.daemon import api as api_mod
    from nat64ho.daemon.api import Api
    from nat64ho.peer import Peer
    from tests.test_server_inproc import NAT, replies, settle, start, stop

    async def go():
        srv, rec = await start(tmp_path, first_port=1028, last_port=1028)
        api = Api(srv)
        peer = Peer(bytes(8))
        srv.datagram_received(peer.hello(), NAT)
        await settle(srv)
        replies(rec, peer)
        srv.datagram_received(peer.confirm(), NAT)
        srv.datagram_received(peer.request([wire.Map(v6(1), 1)]), NAT)
        await settle(srv)
        assert [type(m) for m in replies(rec, peer)] == [wire.Mapping]
        query = b"nat=192.0.2.7&port=1028"
        first = api.client(query)
        assert isinstance(first, httpd.Reply) and json.loads(first.body)["address"] == "2001:db8::1"

        srv.datagram_received(peer.request([wire.Map(v6(2), 2)]), NAT)
        assert srv.tables.nats[0xC0000207].table.by_port[1028].addr == v6(2)  # decided
        pending = api.client(query)
        assert not isinstance(pending, httpd.Reply)  # not from memory: read instead
        pending.close()
        await settle(srv)
        assert [type(m) for m in replies(rec, peer)] == [wire.Deleted, wire.Mapping]
        after = api.client(query)
        assert isinstance(after, httpd.Reply) and json.loads(after.body)["address"] == "2001:db8::2"
        # A query padded past MAX_CACHED_QUERY is answered alike, never cached.
        cached = api_mod._parse_cached.cache_info().currsize
        padded = api.client(query + b"&" * api_mod.MAX_CACHED_QUERY)
        assert isinstance(padded, httpd.Reply) and padded.body == after.body
        assert api_mod._parse_cached.cache_info().currsize == cached
        api.close()
        await stop(srv)

    asyncio.run(go())


def test_pipelined_requests_are_answered_in_order(api_server):
    _, sock = api_server()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
        s.settimeout(5)
        s.sendall(
            b"GET /v1/client?nat=127.0.0.1&port=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /v1/client?nat=127.0.0.1&port=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := s.recv(65536):  # the server closes after the third
            data += chunk
    statuses = re.findall(rb"^HTTP/1.1 (\d+) ", data, re.M)
    assert statuses == [b"200", b"404", b"200"]
    assert data.index(b'"port": 1,') < data.index(b'"port": 2,')
    assert data.count(b"connection: close") == 1


def test_tcp_only_where_given_and_bad_values_in_one_line(server_factory, tmp_path):
    srv = server_factory("--api", "127.0.0.1:0")
    host, port = wait_for(lambda: re.search(r"API on http://([\d.]+):(\d+) ", srv.stderr)).groups()
    assert client.lookup("127.0.0.1", 1028, api=f"{host}:{port}") is None
    for value, line in (
        ("localhost", "Error: --api 'localhost': expected ADDR:PORT, e.g. 127.0.0.1:6464"),
        ("unix:", "Error: --api 'unix:': expected unix:PATH (at most 107 octets)"),
    ):
        out = nat64ho("serve", "--db", str(tmp_path / "x.db"), "--api", value, "--check-config")
        assert (out.returncode, out.stderr.strip()) == (2, line)
    taken = nat64ho("serve", "--db", str(tmp_path / "y.db"), "--listen", "127.0.0.1:0",
                    "--api", f"{host}:{port}")  # fmt: skip
    assert taken.returncode == 1
    assert (
        f"--api {host}:{port}: cannot listen: " in taken.stderr and "Traceback" not in taken.stderr
    )


# ------------------------------------------------------------------ answers, in-process


@given(
    nat=st.integers(0, 2**32 - 1),
    port=st.integers(1, 65535),
    addr=st.one_of(
        st.binary(min_size=16, max_size=16),
        st.binary(min_size=4, max_size=4).map(lambda v4: bytes(10) + b"\xff\xff" + v4),
        st.binary(min_size=6, max_size=6).map(lambda tail: bytes(10) + tail),
    ),
    aport=st.integers(0, 65535),
    since=st.integers(0, 2**41),
)
@settings(max_examples=300, deadline=None)
def test_a_found_answer_is_what_json_dumps_would_write(nat, port, addr, aport, since):
    """The answer a lookup gets, written without json.dumps, is byte for
    byte json.dumps of its fields, for any address (IPv4-mapped and other
    mixed notations included) and time."""
    from nat64ho.daemon.api import _answer
    from nat64ho.eventlog import ipv4_str, ipv6_str, ts_rfc3339

    reply = _answer(nat, port, addr, aport, since)
    fields = {
        "nat": ipv4_str(nat),
        "port": port,
        "address": ipv6_str(addr),
        "client_port": aport,
        "since": ts_rfc3339(since),
    }
    assert reply.body == json.dumps(fields).encode() + b"\n"
    assert json.loads(reply.body) == fields
    assert dict(reply.headers) == {
        b"x-nat64ho-client": fields["address"].encode(),
        b"x-nat64ho-client-port": str(aport).encode(),
    }


def test_a_query_is_parsed_once_and_a_long_or_bad_one_every_time():
    from nat64ho.daemon import api

    api._parse_cached.cache_clear()
    ok = b"nat=192.0.2.9&port=14106"
    assert api._parse_cached(ok) == api.parse_query(ok) == (0xC0000209, 14106, None)
    assert api._parse_cached(ok) is api._parse_cached(ok)
    with pytest.raises(api.BadQuery):
        api._parse_cached(b"nat=192.0.2.9&port=0")
    assert api._parse_cached.cache_info().currsize == 1  # errors are not kept

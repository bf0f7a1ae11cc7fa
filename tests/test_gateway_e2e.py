"""Real kernel TCP, UDP and ICMP across ``nat64ho gateway``, in a test bed of
network namespaces built for each test and always deleted afterwards.

The client's sockets are made in the client namespace from this process
(``Testbed.inside``); the host's view is the services' log, which names the
address and port each connection came from.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import threading
import time

import pytest

from nat64ho.gateway import testbed as tb
from nat64ho.ops import db as opsdb
from nat64ho.ops import queries
from tests.helpers import nat64ho

pytestmark = pytest.mark.skipif(tb.available() is not None, reason=f"the test bed {tb.available()}")

HOST6 = "64:ff9b::" + tb.HOST4
POOL_INT = int.from_bytes(socket.inet_aton(tb.POOL), "big")
_names = itertools.count()


@pytest.fixture
def bed(tmp_path):
    # Unique per test run: a test bed from docs/testbed.md (or another run) may be up.
    bed = tb.Testbed(f"t{os.getpid() % 100000}-{next(_names)}", tmp_path / "state")
    try:
        bed.create()
        bed.services()
        yield bed
    finally:
        bed.destroy()
    assert not bed.exists()


def connect(bed: tb.Testbed, source: str | None = None, timeout: float = 15.0) -> socket.socket:
    with bed.inside(bed.client):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        if source is not None:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.connect((HOST6, tb.ECHO_PORT))
    return s


def line_exchange(s: socket.socket, text: str) -> None:
    s.sendall(text.encode() + b"\n")
    got = b""
    while not got.endswith(b"\n"):
        chunk = s.recv(4096)
        assert chunk, "connection closed"
        got += chunk
    assert got.decode() == text + "\n"


def services_seen(bed: tb.Testbed) -> dict[int, list[str]]:
    """Pool port -> the client endpoints that spoke first on it, as the host saw."""
    seen = {}
    for m in re.finditer(rf"tcp {re.escape(tb.POOL)}:(\d+) first (\S+)", bed.services_out()):
        seen.setdefault(int(m.group(1)), [])
        seen[int(m.group(1))].append(m.group(2))
    return seen


def endpoint(s: socket.socket) -> str:
    addr, port = s.getsockname()[:2]
    return f"[{addr}]:{port}"


def db(bed: tb.Testbed) -> sqlite3.Connection:
    return opsdb.SqliteConn(f"file:{bed.db}?mode=ro", uri=True)


# ------------------------------------------------------------------ HTTP


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_http_through_the_nat64_is_attributed_to_the_client(bed):
    bed.serve()
    bed.gateway()
    p = bed.run(
        bed.client,
        "curl",
        "-sS",
        "-m",
        "20",
        "-w",
        "\n%{local_ip} %{local_port}",
        f"http://[{HOST6}]:{tb.HTTP_PORT}/",
    )
    assert p.returncode == 0, p.stderr
    body, local = p.stdout.rsplit("\n", 1)
    local_ip, local_port = local.split()
    assert local_ip == tb.CLIENT6
    port = int(re.search(rf"You came from {re.escape(tb.POOL)}:(\d+)\.", body).group(1))
    assert re.search(
        rf"^http {re.escape(tb.POOL)}:{port} \"GET / HTTP/1.1\" 200", bed.services_out(), re.M
    )

    who = nat64ho("who", "--db", str(bed.db), f"{tb.POOL}:{port}", "--format", "json")
    assert who.returncode == 0, who.stderr
    [held] = json.loads(who.stdout)
    assert (held["holders"], held["ipv6"], held["ipv6_port"]) == (1, tb.CLIENT6, int(local_port))
    query = nat64ho("query", "--db", str(bed.db), "--port", str(port), "--format", "json")
    assert query.returncode == 0, query.stderr
    rows = json.loads(query.stdout)
    assert [(r["nat"], r["ipv6"], r["ipv6_port"]) for r in rows] == [
        (tb.POOL, tb.CLIENT6, int(local_port))
    ]


# ------------------------------------------------------------------ UDP, ping


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ping") is None, reason="needs ping (iputils-ping)")
def test_udp_request_response_and_ping_through_the_nat64(bed):
    bed.serve()
    bed.gateway()
    with bed.inside(bed.client):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with s:
        s.settimeout(5)
        for i in range(5):
            s.sendto(f"request {i}".encode(), (HOST6, tb.ECHO_PORT))
            data, (addr, port, *_) = s.recvfrom(100)
            assert (data, ipaddress.IPv6Address(addr), port) == (
                f"request {i}".encode(),
                ipaddress.IPv6Address(HOST6),
                tb.ECHO_PORT,
            )
        local = s.getsockname()[1]
    m = re.search(rf"^udp {re.escape(tb.POOL)}:(\d+) 9 octets", bed.services_out(), re.M)
    with db(bed) as conn:
        held = queries.who_port(conn, POOL_INT, int(m.group(1)), int(time.time() * 1e6))
    assert held is not None and held.aport == local

    ping = bed.run(bed.client, "ping", "-c", "3", "-i", "0.2", "-W", "5", HOST6)
    assert ping.returncode == 0 and " 3 received" in ping.stdout, ping.stdout + ping.stderr
    # A host without a handoff server: refused by the gateway, not silently lost.
    ping = bed.run(bed.client, "ping", "-c", "1", "-W", "5", "64:ff9b::192.0.2.5")
    assert ping.returncode != 0 and "Administratively prohibited" in ping.stdout, ping.stdout


@pytest.mark.slow
def test_icmp_errors_cross_the_nat64_both_ways(bed):
    bed.serve()
    gw = bed.gateway()
    # IPv4 -> IPv6: the host's port unreachable reaches the client's socket.
    with bed.inside(bed.client):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with s:
        s.settimeout(5)
        s.connect((HOST6, 9))
        s.send(b"anyone?")
        with pytest.raises(ConnectionRefusedError):
            s.recv(100)
    # IPv6 -> IPv4: a client link of IPv6 MTU 1400 makes the NAT64's kernel
    # send Packet Too Big for the host's 1408-octet reply; translated, the
    # host learns a path MTU of 1380 to the pool address.
    bed.sysctl(bed.nat64, "net.ipv6.conf.v6.mtu=1400")
    with bed.inside(bed.client):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with s:
        s.settimeout(2)
        s.sendto(b"x" * 1380, (HOST6, tb.ECHO_PORT))
        with pytest.raises(socket.timeout):
            s.recv(2000)  # that reply was too big for the client's link
    route = bed.run(bed.host, "ip", "route", "get", tb.POOL).stdout
    assert re.search(r"\bmtu 1380\b", route), route
    # The host now fragments such replies: out of scope, so counted.
    with bed.inside(bed.client):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with s:
        s.settimeout(2)
        s.sendto(b"x" * 1380, (HOST6, tb.ECHO_PORT))
        with pytest.raises(socket.timeout):
            s.recv(2000)
    gw.proc.send_signal(signal.SIGUSR1)
    counts = json.loads(gw.wait_for(r"counts (\{.*\})\n").group(1))
    assert counts["drop_fragment"] >= 2 and counts["to_ipv6"] >= 2, counts
    assert gw.stop() == 0 and "stopped: counts {" in gw.text()


# ------------------------------------------------------------------ restarts


class Talker:
    """One TCP connection: a line every 50 ms out, the echoes read back in
    order, for at most ``limit`` lines; stops by itself."""

    INTERVAL = 0.05

    def __init__(self, s: socket.socket, limit: int = 1200):
        self.s = s
        self.limit = limit
        self.sent = 0
        self.received: list[int] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._recv, daemon=True),
        ]
        for th in self.threads:
            th.start()

    def _send(self) -> None:
        try:
            while not self.stop.is_set() and self.sent < self.limit:
                self.s.sendall(f"line {self.sent}\n".encode())
                self.sent += 1
                self.stop.wait(self.INTERVAL)
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.error = exc

    def _recv(self) -> None:
        buf = b""
        try:
            while len(self.received) < self.limit:
                chunk = self.s.recv(65536)
                if not chunk:
                    raise ConnectionError("closed by the peer")
                buf += chunk
                *lines, buf = buf.split(b"\n")
                self.received += [int(x.split()[1]) for x in lines]
                if self.stop.is_set() and len(self.received) >= self.sent:
                    return
        except BaseException as exc:  # noqa: BLE001
            if not isinstance(exc, socket.timeout) or not self.stop.is_set():
                self.error = exc

    def wait_echoes(self, timeout: float) -> None:
        """Until every line sent so far has come back."""
        deadline = time.monotonic() + timeout
        target = self.sent
        while len(self.received) < target and time.monotonic() < deadline and self.error is None:
            time.sleep(0.02)
        assert self.error is None, repr(self.error)
        assert len(self.received) >= target, f"{len(self.received)} of {target} echoes"
        assert self.received == list(range(len(self.received))), "a line lost or reordered"

    def finish(self, timeout: float = 30.0) -> None:
        self.stop.set()
        self.threads[0].join(timeout)
        self.wait_echoes(timeout)
        self.s.close()


@pytest.mark.slow
def test_tcp_connection_survives_gateway_kill_and_server_restart(bed):
    bed.serve()
    gw = bed.gateway()
    s = connect(bed)
    talk = Talker(s)
    try:
        time.sleep(1.0)
        talk.wait_echoes(10)
        port = _accepted_port(bed)
        before = len(talk.received)

        gw.kill()  # SIGKILL: no goodbye, the cache is gone
        time.sleep(1.0)
        assert len(talk.received) <= talk.sent
        gw = bed.gateway()
        time.sleep(1.0)
        talk.wait_echoes(30)
        assert len(talk.received) > before + 20
        out = gw.text()
        assert "session with" in out

        serve = bed.serve_proc
        assert serve.stop() == 0
        time.sleep(1.0)  # lines keep flowing on the gateway's cache meanwhile
        mid = len(talk.received)
        bed.serve()
        time.sleep(1.5)
        talk.wait_echoes(30)
        assert len(talk.received) > mid + 10
    finally:
        talk.finish()
    assert talk.error is None, repr(talk.error)
    assert talk.received == list(range(talk.sent))

    # One connection as the host saw it, on one pool port, never reset.
    out = bed.services_out()
    assert re.findall(rf"tcp {re.escape(tb.POOL)}:(\d+) accepted", out) == [str(port)]
    assert not re.search(r"^tcp \S+ error", out, re.M), out
    with db(bed) as conn:
        assert [e.port for e in queries.query_entries(conn, nat=POOL_INT)] == [port]
    # The restarted gateway recovered the entry from the server (its MAP or
    # LOOKUP was answered with the same port); nothing was created again.
    events = bed.events.read_text()
    assert events.count(" Created ") == 1, events


def _accepted_port(bed: tb.Testbed) -> int:
    return int(re.search(rf"tcp {re.escape(tb.POOL)}:(\d+) accepted", bed.services_out()).group(1))


# ------------------------------------------------------------------ LRU


@pytest.mark.slow
def test_lru_deletion_under_200_connections_from_50_clients(bed):
    """150 ports for 200 connections: the 50 entries deleted are those of the
    connections idle longest, and `who` names, for every port at every time,
    the client the host saw on it."""
    bed.serve("--ports", "1028-1177")
    bed.gateway("--touch-interval", "0.2")
    clients = bed.add_clients(50)
    conns: list[tuple[socket.socket, str, float]] = []  # socket, endpoint, time seen

    def open_conns(n: int) -> list[int]:
        first = len(conns)
        deadline = time.monotonic() + 120
        for i in range(first, first + n):
            assert time.monotonic() < deadline
            s = connect(bed, clients[i % len(clients)])
            ep = endpoint(s)
            line_exchange(s, f"{ep} hello")
            conns.append((s, ep, time.time()))
        return list(range(first, first + n))

    def activity(idx: list[int]) -> None:
        for i in idx:
            line_exchange(conns[i][0], f"{conns[i][1]} again")

    def table() -> dict[str, int]:
        with db(bed) as conn:
            return {
                f"[{socket.inet_ntop(socket.AF_INET6, e.addr)}]:{e.aport}": e.port
                for e in queries.query_entries(conn, nat=POOL_INT)
            }

    def deleted() -> list[str]:
        return re.findall(r" Deleted \S+ (\S+)", bed.events.read_text())

    try:
        t1, t2, t3 = open_conns(25), open_conns(25), open_conns(100)
        assert len(table()) == 150 and deleted() == []
        time.sleep(0.6)  # every port touched since; now make the order explicit
        activity(t2)
        time.sleep(0.6)
        activity(t3)
        time.sleep(0.6)

        c1 = open_conns(25)
        assert sorted(deleted()) == sorted(conns[i][1] for i in t1)
        c2 = open_conns(25)
        assert sorted(deleted()) == sorted(conns[i][1] for i in t1 + t2)
        assert len(conns) == 200

        now_table = table()
        assert len(now_table) == 150
        assert not any(conns[i][1] in now_table for i in t1 + t2)
        activity(t3 + c1 + c2)  # the survivors all still work

        # The host's view: the endpoint each connection announced on its pool port.
        seen = services_seen(bed)
        assert sum(len(v) for v in seen.values()) == 200
        with db(bed) as conn:
            for _s, ep, at in conns:
                port = next(p for p, eps in seen.items() if f"{ep}" in eps)
                held = queries.who_port(conn, POOL_INT, port, int(at * 1e6))
                assert held is not None
                assert f"[{socket.inet_ntop(socket.AF_INET6, held.addr)}]:{held.aport}" == ep
        # And through the command, for a reused port: first holder, then the next.
        reused = next(p for p, eps in seen.items() if len(eps) == 2)
        for ep in seen[reused]:
            at = next(a for _, e, a in conns if e == ep)
            who = nat64ho(
                "who",
                "--db",
                str(bed.db),
                f"{tb.POOL}:{reused}",
                "--format",
                "json",
                "--at",
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))
                + f".{int(at * 1e6) % 1000000:06d}",
            )
            [held] = json.loads(who.stdout)
            assert f"[{held['ipv6']}]:{held['ipv6_port']}" == ep
    finally:
        for s, _, _ in conns:
            s.close()

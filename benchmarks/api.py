"""The attribution API (``serve --api``) under load: its own rate and
latency, what it adds to nginx, and what it costs the UDP service.

    python benchmarks/api.py lookups --seconds 10      # lookups/s and p99, Unix socket, keep-alive
    python benchmarks/api.py lookups --distinct-heads  # the same, no request head seen before
    python benchmarks/api.py nginx --seconds 10        # nginx at 2,000 req/s, with and without the include
    python benchmarks/api.py udp --seconds 10          # MAP p99, API idle vs 5,000 lookups/s

Each starts ``nat64ho serve`` on a temporary SQLite database, gives NAT64
127.0.0.2 ``--entries`` entries and asks about them (memory hits, as for a
live connection). The load generator is ours: asyncio on uvloop (as the
server runs), raw HTTP/1.1 on keep-alive connections, in processes of its
own; closed loop for the rate, open loop (latency from the scheduled
instant) for the fixed rates. Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import uvloop

from nat64ho.core import wire
from nat64ho.gateway.testbed import CONTRIB_NGINX
from nat64ho.peer import Client, Peer
from nat64ho.testing import Child, proc_tree_cpu, start_server

NAT64 = "127.0.0.2"
PLAIN_PORT, NAT64HO_PORT = 18480, 18481


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summary(what: str, lat: list[float], seconds: float, errors: int, **more) -> dict:
    return {
        "what": what,
        "requests": len(lat),
        "per_s": round(len(lat) / seconds),
        "median_ms": round(statistics.median(lat) * 1e3, 3) if lat else None,
        "p99_ms": round(pct(lat, 0.99) * 1e3, 3),
        "errors": errors,
        **more,
    }


# ------------------------------------------------------------------ the server


def start(tmp: Path) -> tuple[Child, str]:
    sock = str(tmp / "api.sock")
    srv = start_server(tmp / "t.db", tmp / "events.log", "normal", ["--api", f"unix:{sock}"])
    deadline = time.monotonic() + 30
    while not any("API on" in ln for ln in srv.lines):
        if time.monotonic() > deadline:
            raise RuntimeError("".join(srv.lines))
        time.sleep(0.05)
    return srv, sock


async def prefill(address: tuple[str, int], n: int) -> list[int]:
    """``n`` entries for NAT64 127.0.0.2; their NAT ports."""
    c = await Client.connect(*address, local=NAT64, peer=Peer())
    await c.hello()
    ports: list[int] = []
    while len(ports) < n:
        batch = [
            wire.Map((0x20010DB8 << 96 | len(ports) + k).to_bytes(16, "big"), 1) for k in range(50)
        ]
        ports += [
            m.nat_port for m in await c.exchange(batch, timeout=5) if isinstance(m, wire.Mapping)
        ]
    c.close()
    return ports[:n]


# ------------------------------------------------------------------ load


async def _open(where: str | tuple[str, int], local: tuple[str, int] | None = None):
    if isinstance(where, str):
        return await asyncio.open_unix_connection(where)
    return await asyncio.open_connection(*where, local_addr=local)


async def _ask(r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes) -> int:
    w.write(request)
    head = await r.readuntil(b"\r\n\r\n")
    low = head.lower()
    i = low.index(b"content-length:") + 15
    await r.readexactly(int(low[i : low.index(b"\r\n", i)]))
    return int(head[9:12])


def _lookup(port: int, n: int | None = None) -> bytes:
    # With ``n``, a header no request repeats: the server cannot answer from
    # a request it remembers, and h11 parses each one.
    tag = "" if n is None else f"X-N: {n}\r\n"
    return f"GET /v1/client?nat={NAT64}&port={port} HTTP/1.1\r\nHost: x\r\n{tag}\r\n".encode()


def closed_loop(
    where: str, ports: list[int], conns: int, seconds: float, distinct: bool, out
) -> None:
    """As fast as answers come, on ``conns`` keep-alive connections."""

    async def one(lat: list[float], errors: list[int]) -> None:
        r, w = await _open(where)
        rng = random.Random()
        deadline = time.perf_counter() + seconds
        n = rng.randrange(1 << 40)
        while (t0 := time.perf_counter()) < deadline:
            n += 1
            if await _ask(r, w, _lookup(rng.choice(ports), n if distinct else None)) != 200:
                errors[0] += 1
            lat.append(time.perf_counter() - t0)
        w.close()

    async def main() -> None:
        lat: list[float] = []
        errors = [0]
        await asyncio.gather(*(one(lat, errors) for _ in range(conns)))
        out.put((lat, errors[0]))

    uvloop.run(main())


def open_loop(
    where, requests: list[bytes], rate: float, conns: int, seconds: float, out, local=None
):
    """``rate`` requests/s spread over ``conns`` connections, each request at
    its scheduled instant (a late one is measured from that instant)."""

    async def one(i: int, lat: list[float], errors: list[int]) -> None:
        r, w = await _open(where, None if local is None else local[i])
        interval = conns / rate
        start = time.perf_counter() + interval * i / conns
        n = 0
        while (due := start + n * interval) < start + seconds:
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            try:
                if await _ask(r, w, requests[n % len(requests)]) != 200:
                    errors[0] += 1
            except (OSError, asyncio.IncompleteReadError):
                errors[0] += 1
                r, w = await _open(where, None if local is None else local[i])
            lat.append(time.perf_counter() - due)
            n += 1
        w.close()

    async def main() -> None:
        lat: list[float] = []
        errors = [0]
        await asyncio.gather(*(one(i, lat, errors) for i in range(conns)))
        out.put((lat, errors[0]))

    uvloop.run(main())


def in_processes(target, procs: int, *args) -> tuple[list[float], int]:
    q: multiprocessing.Queue = multiprocessing.Queue()
    ps = [multiprocessing.Process(target=target, args=(*args, q)) for _ in range(procs)]
    for p in ps:
        p.start()
    lat: list[float] = []
    errors = 0
    for _ in ps:
        got, e = q.get()
        lat += got
        errors += e
    for p in ps:
        p.join()
    return lat, errors


# ------------------------------------------------------------------ measurements


def lookups(args, tmp: Path) -> None:
    srv, sock = start(tmp)
    try:
        ports = asyncio.run(prefill(srv.address, args.entries))
        cpu = proc_tree_cpu(srv.pid)
        lat, errors = in_processes(
            closed_loop, args.procs, sock, ports, args.conns, args.seconds, args.distinct_heads
        )
        cpu = proc_tree_cpu(srv.pid) - cpu
        # The server's CPU per lookup: what the rate would be were the
        # server alone on a core (here it shares two with the load).
        per = cpu / max(len(lat), 1)
        what = "api lookups, closed loop" + (", distinct heads" if args.distinct_heads else "")
        print(json.dumps(summary(what, lat, args.seconds, errors,
                                 conns=args.conns * args.procs, server_cpu_us=round(per * 1e6, 1),
                                 server_cpu_share=round(cpu / args.seconds, 2),
                                 one_core_per_s=round(1 / per) if per else None)))  # fmt: skip
    finally:
        srv.stop()


def udp(args, tmp: Path) -> None:
    """MAPs of new endpoints at ``--map-rate`` from NAT64 127.0.0.3, each
    answer timed; with the API idle, then serving 5,000 lookups/s, twice."""
    srv, sock = start(tmp)
    try:
        ports = asyncio.run(prefill(srv.address, args.entries))
        requests = [_lookup(p) for p in ports]
        for rnd in range(2):
            for loaded in (False, True):
                load = None
                if loaded:
                    q: multiprocessing.Queue = multiprocessing.Queue()
                    load = multiprocessing.Process(
                        target=open_loop, args=(sock, requests, 5000, 16, args.seconds, q)
                    )
                    load.start()
                    time.sleep(0.3)
                lat, lost = asyncio.run(maps(srv.address, args.map_rate, args.seconds, rnd, loaded))
                more = {}
                if load is not None:
                    api_lat, api_err = q.get()
                    load.join()
                    more = {"api_per_s": round(len(api_lat) / args.seconds),
                            "api_p99_ms": round(pct(api_lat, 0.99) * 1e3, 3)}  # fmt: skip
                print(json.dumps(summary(f"udp MAP, API {'at 5000/s' if loaded else 'idle'}",
                                         lat, args.seconds, lost, round=rnd, **more)))  # fmt: skip
    finally:
        srv.stop()


async def maps(address, rate: float, seconds: float, rnd: int, loaded: bool):
    c = await Client.connect(*address, local="127.0.0.3", peer=Peer())
    await c.hello()
    lat: list[float] = []
    lost = 0
    base = (rnd * 2 + loaded) << 24
    interval = 1 / rate
    start = time.perf_counter()
    n = 0
    while (due := start + n * interval) < start + seconds:
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        addr = (0x20010DB8 << 96 | 1 << 64 | base | n).to_bytes(16, "big")
        got = await c.exchange([wire.Map(addr, 1)], timeout=1)
        if any(isinstance(m, wire.Mapping) for m in got):
            lat.append(time.perf_counter() - due)
        else:
            lost += 1
        n += 1
    c.close()
    return lat, lost


NGINX_CONF = """daemon off;
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {tmp}/ngt; proxy_temp_path {tmp}/ngt;
    fastcgi_temp_path {tmp}/ngt; uwsgi_temp_path {tmp}/ngt; scgi_temp_path {tmp}/ngt;
    include {tmp}/nat64ho.conf;
    access_log off;
    keepalive_requests 1000000;  # one connection per NAT64 endpoint for the whole run
    server {{ listen 127.0.0.1:{plain}; root {tmp}/www; location / {{ }} }}
    server {{
        listen 127.0.0.1:{with_api};
        include {contrib}/nat64ho-server.conf;
        access_log {tmp}/access.log nat64ho;
        root {tmp}/www;
        location / {{ }}
    }}
}}
"""


def bindable(port: int) -> bool:
    """Whether a TCP socket can take (NAT64, port) now (another process on
    the machine may hold that port on every address)."""
    with socket.socket() as s:
        try:
            s.bind((NAT64, port))
        except OSError:
            return False
    return True


def nginx(args, tmp: Path) -> None:
    """A small static page at ``--rate`` requests/s from the NAT64's entries'
    endpoints: nginx alone, then with the include (one lookup per request)."""
    if shutil.which("nginx") is None:
        raise SystemExit("needs nginx")
    srv, sock = start(tmp)
    (tmp / "www").mkdir()
    (tmp / "ngt").mkdir()
    (tmp / "www/index.html").write_text("<p>a small static page</p>\n")
    (tmp / "nat64ho.conf").write_text(
        (CONTRIB_NGINX / "nat64ho.conf").read_text().replace("/run/nat64ho/api.sock", sock)
    )
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, plain=PLAIN_PORT, with_api=NAT64HO_PORT,
                                      contrib=CONTRIB_NGINX))  # fmt: skip
    ng = subprocess.Popen(["nginx", "-e", str(tmp / "error.log"), "-c", str(conf)])
    try:
        ports = [p for p in asyncio.run(prefill(srv.address, args.conns * 4)) if bindable(p)]
        time.sleep(1)
        # The page by its name: "/" would be an internal redirect (index),
        # which runs the access phase, and so the lookup, a second time.
        page = [b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n"]
        for rnd in range(2):
            for port, what in ((PLAIN_PORT, "nginx alone"), (NAT64HO_PORT, "nginx + nat64ho.conf")):
                # Each connection from a NAT64 endpoint with an entry; the
                # two rounds use different ones (TIME_WAIT).
                local = [(NAT64, 0)] * args.conns
                if port == NAT64HO_PORT:
                    local = [(NAT64, p) for p in ports[rnd * args.conns : (rnd + 1) * args.conns]]
                q: multiprocessing.Queue = multiprocessing.Queue()
                p = multiprocessing.Process(
                    target=open_loop,
                    args=(("127.0.0.1", port), page, args.rate, args.conns, args.seconds, q, local),
                )
                p.start()
                lat, errors = q.get()
                p.join()
                print(json.dumps(summary(what, lat, args.seconds, errors, round=rnd)))
        logged = (tmp / "access.log").read_text().splitlines()
        real = sum(ln.startswith("2001:db8::") for ln in logged)
        print(json.dumps({"what": "access log", "lines": len(logged), "naming_the_client": real}))
    finally:
        ng.terminate()
        ng.wait(10)
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("lookups", "nginx", "udp"))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--conns", type=int, default=8, help="connections per load process")
    ap.add_argument("--procs", type=int, default=1, help="load processes (lookups)")
    ap.add_argument(
        "--distinct-heads",
        action="store_true",
        help="no request repeats another (lookups): each is parsed by h11, none remembered",
    )
    ap.add_argument("--rate", type=float, default=2000.0, help="requests/s (nginx)")
    ap.add_argument(
        "--map-rate", type=float, default=100.0, help="MAPs/s, one awaited at a time (udp)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nat64ho-api-") as d:
        {"lookups": lookups, "nginx": nginx, "udp": udp}[args.what](args, Path(d))


if __name__ == "__main__":
    main()

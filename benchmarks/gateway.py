"""Packets per second and added latency of ``nat64ho gateway``, per
direction, in a test bed of its own (root; deleted afterwards).

- Throughput: a sender process floods UDP datagrams of --size octets for
  --seconds (and at most --count) through the gateway; this process counts
  what arrives on the far side. Reported: offered and delivered packets/s,
  and the gateway's CPU while it lasted (delivered / CPU share is what one
  core of it would carry); "direct" is the same flood over the veth pair that
  bypasses the gateway: the ceiling of the sender and counter themselves.
- Latency: one datagram at a time, --probes of them, sent from one namespace
  and timed on arrival in the other by this process (one clock), through the
  gateway and, for comparison, over a veth pair straight from the client to
  the host. The difference of the medians is the gateway's share: the TUN
  device, two translations and the extra forwarding hop.

    sudo .venv/bin/python benchmarks/gateway.py [--seconds 3] [--probes 300]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat64ho.gateway import testbed as tb  # noqa: E402

SINK_PORT = 9000
DIRECT_CLIENT = "2001:db8:2::1"
DIRECT_HOST = "2001:db8:2::2"
HOST6 = "64:ff9b::" + tb.HOST4


def flood_main(
    family: str, dst: str, port: int, src_port: int, size: int, seconds: float, count: int
) -> None:
    """Run by the sender process, inside a namespace: prints packets sent."""
    s = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("::" if family == "6" else "0.0.0.0", src_port))
    payload = b"x" * size
    sent = 0
    end = time.monotonic() + seconds
    while sent < count and time.monotonic() < end:
        for _ in range(64):
            try:
                s.sendto(payload, (dst, port))
                sent += 1
            except BlockingIOError:
                pass
            except OSError:  # ENOBUFS when a queue is full: keep offering
                pass
    print(sent)


class Counter(threading.Thread):
    """Counts datagrams on ``sock`` until it has been quiet for a while."""

    def __init__(self, sock: socket.socket):
        super().__init__(daemon=True)
        self.sock = sock
        self.n = 0
        self.first = self.last = None
        sock.settimeout(1.0)
        self.start()

    def run(self) -> None:
        while True:
            try:
                self.sock.recv(65536)
            except TimeoutError:
                if self.n:
                    return
                continue
            now = time.monotonic()
            if self.first is None:
                self.first = now
            self.last = now
            self.n += 1


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(bed: tb.Testbed, gw_pid: int, direction: str, args) -> dict:
    if direction == "direct":
        with bed.inside(bed.host):
            sink = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sink.bind((DIRECT_HOST, SINK_PORT))
        ns, family, dst, port, src_port = bed.client, "6", DIRECT_HOST, SINK_PORT, 40002
    elif direction == "6to4":
        with bed.inside(bed.host):
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind((tb.HOST4, SINK_PORT))
        ns, family, dst, port, src_port = bed.client, "6", HOST6, SINK_PORT, 40000
    else:
        # The host answers the pool port the gateway gave the client's socket.
        with bed.inside(bed.client):
            sink = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sink.bind(("::", 40001))
        with bed.inside(bed.host):
            h = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        h.bind((tb.HOST4, SINK_PORT + 1))
        h.settimeout(10)
        sink.sendto(b"open", (HOST6, SINK_PORT + 1))
        _, (pool, pool_port) = h.recvfrom(100)
        h.close()
        ns, family, dst, port, src_port = bed.host, "4", pool, pool_port, SINK_PORT + 1
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    counter = Counter(sink)
    cpu0, t0 = cpu_seconds(gw_pid), time.monotonic()
    p = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            __file__,
            "--flood",
            family,
            dst,
            str(port),
            str(src_port),
            str(args.size),
            str(args.seconds),
            str(args.count),
        ],
        capture_output=True,
        text=True,
        timeout=args.seconds + 60,
    )
    sent = int(p.stdout.strip() or 0)
    counter.join(args.seconds + 30)
    cpu1, t1 = cpu_seconds(gw_pid), time.monotonic()
    sink.close()
    span = max((counter.last or t1) - (counter.first or t0), 1e-6)
    return {
        "sent": sent,
        "received": counter.n,
        "offered_pps": sent / args.seconds,
        "delivered_pps": counter.n / span,
        "gateway_cpu": (cpu1 - cpu0) / (t1 - t0),
    }


def one_way(bed: tb.Testbed, via_gateway: bool, direction: str, probes: int) -> list[float]:
    """One-way delays in microseconds, measured on one clock."""
    with bed.inside(bed.client):
        c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    c.bind(("::", 0))
    if via_gateway:
        with bed.inside(bed.host):
            h = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        h.bind((tb.HOST4, 0))
        to_host = (HOST6, h.getsockname()[1])
    else:
        with bed.inside(bed.host):
            h = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        h.bind((DIRECT_HOST, 0))
        to_host = (DIRECT_HOST, h.getsockname()[1])
    for s in (c, h):
        s.settimeout(5)
    c.sendto(b"open", to_host)  # the mapping exists before timing starts
    _, back = h.recvfrom(100)
    src, dst = (c, h) if direction == "6to4" else (h, c)
    target = to_host if direction == "6to4" else back
    out = []
    for _ in range(probes):
        t = time.perf_counter_ns()
        src.sendto(struct.pack("!Q", t), target)
        data = dst.recv(100)
        out.append((time.perf_counter_ns() - struct.unpack("!Q", data)[0]) / 1000)
        time.sleep(0.002)
    c.close()
    h.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="Packets/s and added latency of nat64ho gateway.")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each flood")
    ap.add_argument("--count", type=int, default=2_000_000, help="most datagrams per flood")
    ap.add_argument("--size", type=int, default=64, help="UDP payload octets")
    ap.add_argument("--probes", type=int, default=300, help="latency probes per path and direction")
    ap.add_argument("--flood", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flood:
        f = args.flood
        flood_main(f[0], f[1], int(f[2]), int(f[3]), int(f[4]), float(f[5]), int(f[6]))
        return
    if (why := tb.available()) is not None:
        sys.exit(f"gateway benchmark: the test bed {why}")
    with tempfile.TemporaryDirectory() as tmp:
        bed = tb.Testbed(f"bench{os.getpid() % 100000}", Path(tmp))
        bed.create()
        try:
            subprocess.run(
                [
                    "ip",
                    "link",
                    "add",
                    "direct",
                    "netns",
                    bed.client,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "direct",
                    "netns",
                    bed.host,
                ],
                check=True,
            )
            for ns, addr in ((bed.client, DIRECT_CLIENT), (bed.host, DIRECT_HOST)):
                subprocess.run(
                    ["ip", "-n", ns, "addr", "add", f"{addr}/64", "dev", "direct", "nodad"],
                    check=True,
                )
                subprocess.run(["ip", "-n", ns, "link", "set", "direct", "up"], check=True)
            bed.serve("--hello-rate", "0")
            gw = bed.gateway()
            print(
                f"nat64ho gateway benchmark: {args.size}-octet UDP payloads, floods of "
                f"{args.seconds:g} s, {args.probes} latency probes; {os.cpu_count()} CPUs, "
                f"load {os.getloadavg()[0]:.2f}"
            )
            for direction in ("direct", "6to4", "4to6"):
                r = throughput(bed, gw.pid, direction, args)
                print(
                    f"  {direction}: offered {r['offered_pps']:9,.0f} pps, delivered "
                    f"{r['delivered_pps']:9,.0f} pps ({r['received']:,} of {r['sent']:,})"
                    + (
                        f", gateway CPU {r['gateway_cpu']:.0%}, "
                        f"{r['delivered_pps'] / max(r['gateway_cpu'], 0.01):,.0f} pps per gateway "
                        "CPU-second"
                        if direction != "direct"
                        else " (no gateway)"
                    )
                )
            for direction in ("6to4", "4to6"):
                gw_lat = one_way(bed, True, direction, args.probes)
                direct = one_way(bed, False, direction, args.probes)
                m_gw, m_d = statistics.median(gw_lat), statistics.median(direct)
                p99 = sorted(gw_lat)[int(len(gw_lat) * 0.99) - 1]
                print(
                    f"  {direction} one-way: via gateway median {m_gw:6.0f} us (p99 {p99:.0f}), "
                    f"direct veth {m_d:6.0f} us, added {m_gw - m_d:6.0f} us"
                )
        finally:
            bed.destroy()


if __name__ == "__main__":
    main()

"""What a refused datagram costs the event loop (docs/protocol.md §2, §7), in
process, without sockets: the server of `benchmarks/hotpath.py` on a real
SQLite file, fed datagrams it must refuse, timed per datagram (µs of CPU):

- forged cookie: 65,507 octets opened by a wrong COOKIE, each from another
  source address, as a spoofing flood sends them;
- no cookie: 65,507 octets of LOOKUPs with no COOKIE, from another source each;
- over share: a proven NAT64 in debt with its share, its error budget spent,
  sending 65,507-octet and MTU-size datagrams of TOUCHes;
- forged HELLO: HELLOs beyond the server-wide budget, dropped at random;
- forged confirmation: a COOKIE with a HELLO after it that does not match.

For comparison, one ``wire.parse`` of the 65,507-octet datagram: what each
of them cost before the first message was checked first.

    python benchmarks/refusals.py --count 20000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.hotpath import confirmed, settle  # noqa: E402
from nat64ho.bench.floods import BIGGEST  # noqa: E402
from nat64ho.core import wire  # noqa: E402
from nat64ho.daemon.config import Config  # noqa: E402
from nat64ho.daemon.protocol import Server  # noqa: E402
from nat64ho.peer import Peer  # noqa: E402

NAT = ("192.0.2.7", 40000)


def sources(n: int) -> list[tuple[str, int]]:
    """``n`` distinct source addresses: more than the server remembers."""
    return [(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1024 + i % 60000) for i in range(n)]


def timed(srv: Server, datagrams: list[bytes], addrs: list[tuple[str, int]], count: int) -> float:
    """µs of CPU per datagram of ``count`` handed to the server."""
    n, m = len(datagrams), len(addrs)
    receive = srv.datagram_received
    t0 = time.process_time()
    for i in range(count):
        receive(datagrams[i % n], addrs[i % m])
    return (time.process_time() - t0) / count * 1e6


async def run(tmp: Path, count: int) -> dict[str, float]:
    config = Config(db=tmp / "t.db", log_file=str(tmp / "t.log"), request_rate=1000)
    store, srv, out, peer = await confirmed(config, "normal", NAT)
    await settle(srv)
    out.keep = False
    spoofed = sources(50_000)
    big_forged = b"\x30\x04" + bytes(8) + b"\x35\x01\x04\x04" * ((BIGGEST - 10) // 4)
    big_bare = b"\x35\x01\x04\x04" * (BIGGEST // 4)
    ports = tuple(range(2000, 2255))
    big_touch = peer.request([wire.Touch(ports)] * ((BIGGEST - 10) // 512))
    mtu_touch = peer.request([wire.Touch(ports), wire.Touch(ports), wire.Touch(ports[:217])])
    results = {}
    t0 = time.process_time()
    for _ in range(20):
        wire.parse(big_forged)
    results["wire.parse of 65,507 octets (before v1.2)"] = (time.process_time() - t0) / 20 * 1e6
    results["forged cookie, 65,507 octets"] = timed(srv, [big_forged], spoofed, count)
    results["no cookie, 65,507 octets"] = timed(srv, [big_bare], spoofed, count)
    # Put the NAT64 deep in debt with its share, and spend its error budget
    # (ERROR RATE_LIMITED answers, 100 a second at this request rate).
    srv.datagram_received(big_touch, NAT)
    for _ in range(200):
        srv.datagram_received(mtu_touch, NAT)
    await settle(srv)
    before = srv.drops["request_rate"]
    results["over share, 65,507 octets"] = timed(srv, [big_touch], [NAT], count)
    results["over share, MTU-size TOUCHes"] = timed(srv, [mtu_touch], [NAT], count)
    assert srv.drops["request_rate"] - before == 2 * count, srv.drops
    hellos = [Peer().hello() for _ in range(1000)]
    for _ in range(10 * int(config.hello_rate)):  # spend the budget: the flood is on
        srv.datagram_received(hellos[0], spoofed[0])
    results["forged HELLO beyond the budget"] = timed(srv, hellos, spoofed, count)
    confirm = bytes.fromhex("3004") + bytes(8) + Peer(b"X" * 8).hello()
    results["forged COOKIE+HELLO"] = timed(srv, [confirm], spoofed, count)
    await store.close()
    srv.logfile.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20_000, help="datagrams per kind")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nat64ho-refusals-") as tmp:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = runner.run(run(Path(tmp), args.count))
    for what, us in results.items():
        print(f"{what:45} {us:10.2f} µs of CPU a datagram")


if __name__ == "__main__":
    main()

"""Floods a forger or a greedy NAT64 can send, against what a neighbour
NAT64 gets meanwhile (docs/protocol.md §2, §4, §7), each with ``--workers``
1 and 2. Loopback only; the forged sources need root (a raw socket).

- spoofed: 100 datagrams of 65,507 octets a second from random sources, each
  opened by a forged COOKIE; a NAT64's MAP latency meanwhile.
- hellos: 1,000 forged HELLOs a second (``--hello-flood``) from a rebooting
  NAT64's address and port: the time from its first HELLO (retried every
  250 ms) to its first MAPPING, over reboots; then the same flood, one
  datagram a second a BAD_COOKIE trigger, against a working NAT64 asking
  for an endpoint every 10 ms.
- touches: a validated NAT64 sending MTU-size datagrams of TOUCHes (727
  ports each) at 3,400 a second, 10,000 TOUCH messages; a neighbour's MAPs.
- open: a validated NAT64 replaying one LOOKUP datagram from one process,
  open loop at each ``--rates`` (0: as fast as the process sends), against
  two neighbours, one steered to the flood's worker and one to the other.

Each flood runs ``--seconds``; the neighbours measure all but the first
half second of it. Prints one JSON object a line.

    python benchmarks/floods.py --seconds 4
    python benchmarks/floods.py --only open --rates 20000 50000 0
    python benchmarks/floods.py --only hellos --hello-flood 4000 --serve --hello-rate 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat64ho.bench.floods import (  # noqa: E402
    Flood,
    Forged,
    Replay,
    big_junk,
    drops_logged,
    map_key,
    maps_under_way,
    new_endpoint,
    paced,
    reboot,
)
from nat64ho.core import wire  # noqa: E402
from nat64ho.peer import Client, Peer  # noqa: E402
from nat64ho.testing import Child, serve_command  # noqa: E402

#: The flooding NAT64 (odd: worker 1 of 2), a neighbour on its worker and
#: one on the other (worker_of is the address modulo the workers).
FLOODER, SAME, OTHER = "127.0.0.41", "127.0.0.43", "127.0.0.42"


def drops(server: Child) -> dict[str, int]:
    server.stop()
    time.sleep(0.2)  # the last lines of its stderr
    return drops_logged(server.lines)


async def validated(
    address: tuple[str, int], local: str, request: list[wire.Message], peer: Peer | None = None
) -> bytes:
    """A session from ``local``; the datagram of ``request`` with its cookie."""
    c = await Client.connect(*address, local=local, peer=peer)
    await c.hello()
    await c.quiet(0.05)
    c.close()
    return c.peer.request(request)


def spoofed(address, seconds: float) -> dict:
    with Flood(address, big_junk, rate=100, seconds=seconds) as flood:
        time.sleep(0.5)
        latency = asyncio.run(maps_under_way(address, SAME, seconds - 0.5))
    return {"flood_sent": flood.sent.value, "neighbour": latency._asdict()}


def hellos(address, seconds: float, rate: float, reboots: int = 5) -> dict:
    async def rebooting() -> list[float]:
        took = []
        for i in range(reboots):
            c = await Client.connect(*address, local=SAME, peer=Peer(b"reboot" + bytes([i, 0])))
            port = c.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
            with Flood(address, Forged((SAME, port)), rate=rate, seconds=3.0):
                await asyncio.sleep(0.3)
                took.append(round(await reboot(c), 3))
            c.close()
        return took

    async def working() -> tuple[dict, int]:
        c = await Client.connect(*address, local=OTHER)
        await reboot(c)  # its HELLO retried: the budget may still be spent
        port = c.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        triggers = Forged((OTHER, port), every=int(rate))
        with Flood(address, triggers, rate=rate, seconds=seconds):
            await asyncio.sleep(0.5)
            latency = await paced(c, seconds - 0.5, new_endpoint(6), map_key)
        c.close()
        return latency._asdict(), c.rehellos

    took = asyncio.run(rebooting())
    latency, rehellos = asyncio.run(working())
    return {
        "reboot_seconds": took,
        "working": latency,
        "working_rehellos": rehellos,
    }


def touches(address, seconds: float) -> dict:
    ports = tuple(range(2000, 2727))
    request = [wire.Touch(ports[:255]), wire.Touch(ports[255:510]), wire.Touch(ports[510:])]
    datagram = asyncio.run(validated(address, FLOODER, list(request)))
    with Flood(address, Replay((FLOODER, 40000), datagram), rate=3400, seconds=seconds) as flood:
        time.sleep(0.5)
        latency = asyncio.run(maps_under_way(address, SAME, seconds - 0.5))
    return {"flood_sent": flood.sent.value, "neighbour": latency._asdict()}


def open_loop(address, seconds: float, rate: float) -> dict:
    datagram = asyncio.run(validated(address, FLOODER, [wire.Lookup(1028 + i) for i in range(8)]))
    # The neighbours' sessions are made before the flood: what is measured
    # is their requests, not their HELLOs in a full kernel queue.
    peers = [Peer(), Peer()]
    for peer, local in zip(peers, (SAME, OTHER), strict=True):
        asyncio.run(validated(address, local, [], peer))

    async def neighbours() -> list:
        return await asyncio.gather(
            maps_under_way(address, SAME, seconds - 0.5, net=7, peer=peers[0]),
            maps_under_way(address, OTHER, seconds - 0.5, net=8, peer=peers[1]),
        )

    with Flood(address, Replay((FLOODER, 40000), datagram), rate=rate, seconds=seconds) as flood:
        time.sleep(0.5)
        same, other = asyncio.run(neighbours())
    return {
        "offered": rate or "open",
        "flood_sent_per_s": round(flood.sent.value / seconds),
        "same_worker": same._asdict(),
        "other_worker": other._asdict(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="each flood")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--only", choices=["spoofed", "hellos", "touches", "open"], nargs="+")
    ap.add_argument("--hello-flood", type=float, default=1000, help="forged HELLOs a second")
    ap.add_argument(
        "--serve", nargs=argparse.REMAINDER, default=[], help="more `nat64ho serve` options"
    )
    ap.add_argument(
        "--rates", type=float, nargs="+", default=[20_000, 50_000, 0], help="open-loop rates"
    )
    args = ap.parse_args()
    runs = args.only or ["spoofed", "hellos", "touches", "open"]
    for workers in args.workers:
        for what in runs:
            for rate in args.rates if what == "open" else [None]:
                with tempfile.TemporaryDirectory(prefix="nat64ho-floods-") as tmp:
                    db, log = Path(tmp) / "t.db", Path(tmp) / "t.log"
                    extra = ["--sync", "normal", "--workers", str(workers), *args.serve]
                    server = Child(serve_command(db, log, *extra))
                    out: dict = {}
                    try:
                        address = server.address
                        if what == "spoofed":
                            out = spoofed(address, args.seconds)
                        elif what == "hellos":
                            out = hellos(address, args.seconds, args.hello_flood)
                        elif what == "touches":
                            out = touches(address, args.seconds)
                        else:
                            assert rate is not None
                            out = open_loop(address, args.seconds, rate)
                    finally:
                        out["server_drops"] = drops(server)
                    print(json.dumps({"flood": what, "workers": workers, **out}), flush=True)


if __name__ == "__main__":
    main()

"""One NAT64 floods, another keeps its answers (docs/protocol.md §7).

Starts ``nat64ho serve`` with its default limits on a temporary database,
gives a flooding NAT64 a table of entries that are then only in the database
(a restart empties the cache), and runs, side by side:

- the flood: one client process from 127.3.0.1, as fast as it goes with
  ``--window`` datagrams in flight, alternating 20 new MAPs and 50 LOOKUPs of
  random ports (each a database read);
- the victim: another NAT64 (127.4.0.1) sending one MAP of a new endpoint
  every 10 ms, each answer awaited for up to a second.

Prints the victim's losses and latency and what the flood got through.

    python benchmarks/fairness.py --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import multiprocessing
import os
import random
import tempfile
import time
from pathlib import Path

from nat64ho.bench.floods import maps_under_way
from nat64ho.core import wire
from nat64ho.peer import Client, Peer
from nat64ho.testing import Child, serve_command

FLOOD_SOURCE = "127.3.0.1"
VICTIM_SOURCE = "127.4.0.1"
PREFILL = 2000


def v6(i: int, net: int) -> bytes:
    return (int(ipaddress.IPv6Address("2001:db8::")) + (net << 32) + i).to_bytes(16, "big")


def start(db: Path, log: Path) -> Child:
    return Child(serve_command(db, log))  # the default limits: they are what is measured


async def prefill(address: tuple[str, int], boot_id: bytes) -> None:
    """PREFILL entries for the flooding NAT64, at the default create rate."""
    c = await Client.connect(*address, local=FLOOD_SOURCE, peer=Peer(boot_id))
    await c.hello()
    done = 0
    while done < PREFILL:
        out = await c.exchange([wire.Map(v6(done + k, 1), 1) for k in range(100)], timeout=5)
        done += sum(isinstance(m, wire.Mapping) for m in out)
        if len(out) < 100 or any(isinstance(m, wire.Error) for m in out):
            await asyncio.sleep(0.2)  # over the create rate: let the bucket refill
    c.close()


def flood_process(address, boot_id, seconds, window, result) -> None:
    result.put(asyncio.run(flood(address, boot_id, seconds, window)))


async def flood(address, boot_id: bytes, seconds: float, window: int) -> dict:
    c = await Client.connect(*address, local=FLOOD_SOURCE, peer=Peer(boot_id))
    await c.hello()
    loop = asyncio.get_running_loop()
    got = asyncio.Event()
    answers = 0
    receive = c.datagram_received

    def counted(data, addr):
        nonlocal answers
        answers += 1
        got.set()
        receive(data, addr)

    c.datagram_received = counted
    rng = random.Random(7)
    end = loop.time() + seconds
    sent = in_flight = 0
    seen = 0
    n = 0
    while loop.time() < end:
        while in_flight < window and c.peer.cookie is not None:
            if n % 2:
                c.send([wire.Lookup(rng.randrange(1028, 65536)) for _ in range(50)])
            else:
                c.send([wire.Map(v6(10**6 + n * 20 + k, 2), 1) for k in range(20)])
            n += 1
            sent += 1
            in_flight += 1
        got.clear()
        try:
            await asyncio.wait_for(got.wait(), 0.1)
        except TimeoutError:
            in_flight = 0  # answers dropped over the share: start a new window
        in_flight = max(0, in_flight - (answers - seen))
        seen = answers
        while not c.inbox.empty():
            c.inbox.get_nowait()
    c.close()
    return {"datagrams_sent": sent, "datagrams_answered": answers, "seconds": seconds}


def run(seconds: float, window: int, flood_on: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        db, log = Path(tmp) / "t.db", Path(tmp) / "t.log"
        boot_id = os.urandom(8)
        server = start(db, log)
        asyncio.run(prefill(server.address, boot_id))
        server.stop()  # a clean restart: the flooder's entries are only on disk now
        server = start(db, log)
        try:
            result = multiprocessing.Queue()
            proc = None
            if flood_on:
                proc = multiprocessing.Process(
                    target=flood_process,
                    args=(server.address, boot_id, seconds + 1, window, result),
                )
                proc.start()
                time.sleep(1.0)  # the flood is under way before the victim starts
            victim = maps_under_way(server.address, VICTIM_SOURCE, seconds)
            out = {"victim": asyncio.run(victim)._asdict()}
            if proc is not None:
                out["flood"] = result.get(timeout=30)
                proc.join(30)
        finally:
            server.stop()
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="how long the victim sends")
    p.add_argument("--window", type=int, default=64, help="flood datagrams in flight")
    p.add_argument("--no-flood", action="store_true", help="the victim alone, for comparison")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    out = run(args.seconds, args.window, not args.no_flood)
    if args.json:
        print(json.dumps(out))
        return
    v = out["victim"]
    print(
        f"victim: {v['sent']} MAPs, {v['answered']} answered, {v['lost']} lost, "
        f"{v['errors']} errors; p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms, max {v['max_ms']} ms"
    )
    if "flood" in out:
        f = out["flood"]
        print(
            f"flood: {f['datagrams_sent']} datagrams sent, {f['datagrams_answered']} answer "
            f"datagrams, {f['datagrams_sent'] / f['seconds']:.0f} datagrams/s"
        )


if __name__ == "__main__":
    main()

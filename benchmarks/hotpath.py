"""The event loop's cost per message, without UDP sockets: an in-process
server on a real SQLite file (and its writer process) and a transport that
only counts. Lookups of cached entries, batch 1, are timed per datagram;
new entries, batch 1, committed 12 at a time (4 ms of 3,000/s), by this
process's CPU per entry (deciding, the round trip to the writer, the log,
the answers; not the writer's own work). Steadier than a run over sockets
for A/B runs of the per-message code; `benchmarks/efficiency.py` measures
the whole server.

    python benchmarks/hotpath.py --count 200000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat64ho.core import wire  # noqa: E402
from nat64ho.daemon.config import Config  # noqa: E402
from nat64ho.daemon.logfile import LogFile  # noqa: E402
from nat64ho.daemon.protocol import Server  # noqa: E402
from nat64ho.peer import Peer  # noqa: E402
from nat64ho.storage.sqlite import Store  # noqa: E402
from nat64ho.testing import proc_tree_cpu  # noqa: E402

NAT = ("192.0.2.7", 40000)
#: New entries per commit in the create rounds: what 4 ms of 3,000/s make.
GROUP = 12


class Counting:
    """A transport that counts what the server sends."""

    def __init__(self) -> None:
        self.sent = 0
        self.keep = True
        self.kept: list[bytes] = []

    def sendto(self, data, addr) -> None:
        self.sent += 1
        if self.keep:
            self.kept.append(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name, default=None):
        return default


async def settle(srv: Server) -> None:
    """Until every datagram is decided and every answer held for a commit
    has left (polled: the server, not storage, holds the answers)."""
    while srv.tasks or srv.waiting:
        if srv.tasks:
            await asyncio.gather(*list(srv.tasks))
        await asyncio.sleep(0.001)


async def confirmed(
    config: Config, sync: str, nat: tuple[str, int] = NAT
) -> tuple[Store, Server, Counting, Peer]:
    """An in-process server on ``config`` with one NAT64 (``nat``) confirmed."""
    store = await Store.open(config.db, sync=sync)
    srv = Server(config, store, LogFile(config.log_file))
    out = Counting()
    srv.connection_made(out)
    peer = Peer(bytes(8))
    srv.datagram_received(peer.hello(), nat)
    peer.receive(out.kept.pop())
    srv.datagram_received(peer.confirm(), nat)
    return store, srv, out, peer


async def run(
    tmp: Path, count: int, entries: int, rounds: int, create_count: int
) -> tuple[list[float], list[float], list[float]]:
    config = Config(
        db=tmp / "t.db", log_file=str(tmp / "t.log"), request_rate=10**9, create_rate=10**9
    )
    store, srv, out, peer = await confirmed(config, "full")
    for i in range(entries):
        v6 = ipaddress.IPv6Address(0x20010DB8 << 96 | i).packed
        srv.datagram_received(peer.request([wire.Map(v6, 1024 + i % 60000)]), NAT)
        if i % 100 == 99:
            await settle(srv)
    await settle(srv)
    ports = [m.nat_port for d in out.kept for m in peer.receive(d) if type(m) is wire.Mapping]
    assert len(ports) == entries, len(ports)
    out.keep = False
    lookups = [peer.request([wire.Lookup(p)]) for p in ports[:256]]
    results = []
    gc.collect()
    for _ in range(rounds):
        sent = out.sent
        t0 = time.perf_counter()
        n = len(lookups)
        for i in range(count):
            srv.datagram_received(lookups[i % n], NAT)
        results.append((time.perf_counter() - t0) / count * 1e6)
        assert out.sent - sent == count, (out.sent - sent, srv.drops)
        await asyncio.sleep(0)
    await settle(srv)
    creates, writer = [], []
    assert store._writer is not None and store._writer.proc is not None
    writer_pid = store._writer.proc.pid
    base = entries
    for _ in range(rounds):
        maps = [
            peer.request([wire.Map(ipaddress.IPv6Address(0x20010DB8 << 96 | base + i).packed, 443)])
            for i in range(create_count)
        ]
        base += create_count
        t0, w0 = time.process_time(), proc_tree_cpu(writer_pid)
        for i, d in enumerate(maps):
            srv.datagram_received(d, NAT)
            if i % GROUP == GROUP - 1:
                await settle(srv)
        await settle(srv)
        creates.append((time.process_time() - t0) / create_count * 1e6)
        writer.append((proc_tree_cpu(writer_pid) - w0) / create_count * 1e6)
    await store.close()
    srv.logfile.close()
    return results, creates, writer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200_000, help="datagrams per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--entries", type=int, default=1000, help="cached entries looked up")
    ap.add_argument("--creates", type=int, default=6000, help="new entries per round")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nat64ho-hot-") as tmp:
        # The server's event loop (uvloop), as `nat64ho serve` runs it.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            looks, creates, writer = runner.run(
                run(Path(tmp), args.count, args.entries, args.rounds, args.creates)
            )
    print("lookup, batch 1, µs of CPU a datagram, per round:", *(f"{r:.2f}" for r in looks))
    print(f"  best {min(looks):.2f}")
    print(
        f"create, batch 1, {GROUP} a commit, µs of this process's CPU an entry, per round:",
        *(f"{r:.1f}" for r in creates),
    )
    print(f"  best {min(creates):.1f}")
    print("  the writer process's CPU an entry, per round:", *(f"{w:.1f}" for w in writer))


if __name__ == "__main__":
    main()

"""One registry of counters: each one the server keeps is exported by
/metrics, under the name and labels the registry gives it."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from nat64ho.core import session, wire
from nat64ho.core.counters import DROP_METRICS, METRICS, Count, Drop
from nat64ho.daemon.config import Config
from nat64ho.daemon.logfile import LogFile
from nat64ho.daemon.metrics import Metrics
from nat64ho.daemon.protocol import Server
from nat64ho.peer import Peer
from nat64ho.storage.sqlite import Store
from tests.helpers import committed

NAT = ("192.0.2.7", 40000)


class Recorder:
    def __init__(self):
        self.sent = []

    def sendto(self, data, addr):
        self.sent.append((data, addr))

    def is_closing(self):
        return False


def scrape(tmp_path: Path) -> tuple[dict, set, set]:
    """Samples of /metrics after some traffic, and the keys the server counted."""

    async def go():
        config = Config(db=tmp_path / "t.db", log_file=str(tmp_path / "events.log"))
        store = await Store.open(config.db, sync="normal")
        srv = Server(config, store, LogFile(config.log_file))
        srv.connection_made(Recorder())
        metrics = Metrics(srv)
        peer = Peer(bytes(8))
        srv.datagram_received(peer.hello(), NAT)
        for data, _ in srv.transport.sent:
            peer.receive(data)
        srv.datagram_received(peer.confirm(), NAT)
        srv.datagram_received(peer.request([wire.Map(bytes(16), 1), wire.Lookup(5000)]), NAT)
        srv.datagram_received(b"\xff", NAT)  # malformed
        srv.datagram_received(b"", ("::1", 5))  # not IPv4
        while srv.tasks or srv.waiting:
            if srv.tasks:
                await asyncio.gather(*list(srv.tasks))
            await committed(store)
        text = metrics.render().decode()
        counted, dropped = set(srv.counts), set(srv.drops)
        await store.close()
        srv.logfile.close()
        return text, counted, dropped

    text, counted, dropped = asyncio.run(go())
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, counted, dropped


def test_every_counter_and_drop_reason_is_exported(tmp_path):
    samples, counted, dropped = scrape(tmp_path)
    for count in Count:
        m = METRICS[count]
        key = (f"nat64ho_{m.name}_total", (m.label,) if m.label else ())
        assert key in samples, count
    for reason in Drop:
        assert ("nat64ho_datagrams_dropped_total", (("reason", str(reason)),)) in samples
    for _reason, m in DROP_METRICS.items():
        assert (f"nat64ho_{m.name}_total", (m.label,)) in samples
    # The traffic moved some of them, and every key counted is registered.
    assert samples[("nat64ho_datagrams_received_total", ())] == 5
    assert samples[("nat64ho_entries_created_total", ())] == 1
    assert samples[("nat64ho_messages_total", (("type", "lookup"),))] == 1
    assert samples[("nat64ho_datagrams_dropped_total", (("reason", "not_ipv4"),))] == 1
    assert counted and counted <= set(Count)
    assert dropped and dropped <= set(Drop)


def test_every_reason_the_code_names_is_a_drop():
    named = {
        getattr(wire, n)
        for n in (
            "EMPTY",
            "RESERVED_GROUP",
            "TRUNCATED",
            "BAD_LENGTH",
            "WRONG_DIRECTION",
            "BAD_PACKET",
        )
    }
    named |= set(re.findall(r'_refuse\(\s*"([a-z_]+)"', Path(session.__file__).read_text()))
    assert len(named) > 10
    assert named <= set(Drop)

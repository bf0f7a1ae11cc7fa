"""Prometheus metrics for ``serve --metrics``: exposition and the collector.

The datagram path only bumps plain counters on the server; this module turns
them into metric families when scraped, on the event loop, so the hot path
pays nothing for observability and no other thread reads server state.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.registry import Collector

from nat64ho import __version__
from nat64ho.core.counters import DROP_METRICS, METRICS, Count, Drop, Metric
from nat64ho.daemon.http import HttpServer, Reply
from nat64ho.eventlog import ipv4_str

if TYPE_CHECKING:
    from nat64ho.daemon.ipfix_export import Exporter
    from nat64ho.daemon.protocol import Server

log = logging.getLogger("nat64ho")


class ServerCollector(Collector):
    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Family]:
        s = self.server
        yield from counter_families(s.counts, s.drops)
        store = s.store.stats
        yield CounterMetricFamily(
            "nat64ho_commits",
            "Transactions committed (each one fsync with --sync full).",
            value=store["commits"],
        )
        yield CounterMetricFamily(
            "nat64ho_commit_failures",
            "Commits that failed and were retried (disk full, locked database).",
            value=store["commit_failures"],
        )
        occupancy = GaugeMetricFamily(
            "nat64ho_table_entries", "Entries in a NAT64's table.", labels=["nat64"]
        )
        capacity = GaugeMetricFamily(
            "nat64ho_table_capacity", "Ports in a NAT64's table.", labels=["nat64"]
        )
        for nat, state in sorted(s.tables.nats.items()):
            if state.table.loaded:
                occupancy.add_metric([ipv4_str(nat)], state.table.total)
                capacity.add_metric([ipv4_str(nat)], state.table.capacity)
        yield occupancy
        yield capacity
        yield GaugeMetricFamily(
            "nat64ho_nat64s", "NAT64s known (confirmed at some time).", value=len(s.sessions.boots)
        )
        yield GaugeMetricFamily(
            "nat64ho_cache_entries", "Table entries held in memory.", value=s.tables.cached
        )
        yield GaugeMetricFamily(
            "nat64ho_commit_backlog", "Rows waiting to be committed.", value=s.store.backlog
        )
        yield GaugeMetricFamily(
            "nat64ho_log_lines_waiting",
            "Event lines committed but not yet in the log file (it could "
            "not be written); copied from the history when it can.",
            value=s.logfile.waiting,
        )
        yield GaugeMetricFamily(
            "nat64ho_store_failing",
            "1 while commits to the database fail (disk full, locked).",
            value=1 if s.store.failing else 0,
        )
        if s.ipfix is not None:
            yield from _ipfix_families(s.ipfix)


def counter_families(counts: Mapping[str, int], drops: Mapping[str, int]) -> list[Family]:
    """The families of the server's counters, each registered one (zero
    included) and each drop reason, from :mod:`nat64ho.core.counters`."""
    families: dict[str, CounterMetricFamily] = {}

    def add(metric: Metric, value: int) -> None:
        family = families.get(metric.name)
        if family is None:
            family = families[metric.name] = CounterMetricFamily(
                f"nat64ho_{metric.name}",
                metric.help,
                labels=[metric.label[0]] if metric.label else [],
            )
        family.add_metric([metric.label[1]] if metric.label else [], value)

    for count in Count:
        add(METRICS[count], counts.get(count, 0))
    dropped = Metric("datagrams_dropped", "Datagrams dropped, by named reason.", ("reason", ""))
    for reason in sorted(set(Drop) | set(drops)):
        add(dropped._replace(label=("reason", str(reason))), drops.get(reason, 0))
    for reason, metric in DROP_METRICS.items():
        add(metric, drops.get(reason, 0))
    return list(families.values())


def _ipfix_families(exporter: Exporter) -> Iterator[Family]:
    """What ``--ipfix`` sent, per collector (best effort: UDP)."""
    records = CounterMetricFamily(
        "nat64ho_ipfix_records_sent", "IPFIX data records sent, by collector.", labels=["collector"]
    )
    messages = CounterMetricFamily(
        "nat64ho_ipfix_messages_sent",
        "IPFIX messages (UDP datagrams) sent, by collector.",
        labels=["collector"],
    )
    failures = CounterMetricFamily(
        "nat64ho_ipfix_send_failures",
        "IPFIX messages not sent: buffer_full, refused (ICMP: nobody "
        "listening), unreachable, other.",
        labels=["collector", "reason"],
    )
    for c in exporter.collectors:
        records.add_metric([c.name], c.records)
        messages.add_metric([c.name], c.messages)
        for reason, n in sorted(c.failures.items()):
            failures.add_metric([c.name, reason], n)
    yield records
    yield messages
    yield failures
    yield CounterMetricFamily(
        "nat64ho_ipfix_errors",
        "Commits whose IPFIX export failed unexpectedly (a bug; logged once).",
        value=exporter.errors,
    )


class _HttpCollector(Collector):
    """Connections of the HTTP endpoints, and those refused at the cap."""

    def __init__(self, endpoints: Sequence[HttpServer]):
        self.endpoints = endpoints

    def collect(self) -> Iterator[Family]:
        open_ = GaugeMetricFamily(
            "nat64ho_http_connections",
            "Connections open to an HTTP endpoint (metrics, api).",
            labels=["endpoint"],
        )
        refused = CounterMetricFamily(
            "nat64ho_http_connections_refused",
            "Connections refused (503) because the endpoint held its maximum.",
            labels=["endpoint"],
        )
        for http in self.endpoints:
            open_.add_metric([http.what], len(http.connections))
            refused.add_metric([http.what], http.refused)
        yield open_
        yield refused


class Metrics:
    """The registry of one server; its endpoint is a route of
    :class:`nat64ho.daemon.http.HttpServer`."""

    def __init__(self, server: Server, endpoints: Sequence[HttpServer] = ()) -> None:
        """``endpoints``: the HTTP endpoints (--metrics, --api), a list
        that fills once they listen."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(ServerCollector(server))
        self.batch_rows = Histogram(
            "nat64ho_commit_batch_rows",
            "Rows written per commit (group commit size).",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000),
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "nat64ho_commit_seconds",
            "Time from BEGIN to COMMIT of one batch, fsync included.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=self.registry,
        )
        # The process's CPU, memory and descriptors (process_*), and which
        # build is running (nat64ho_build_info), for dashboards and alerts.
        ProcessCollector(registry=self.registry)
        Info("nat64ho_build", "The running nat64ho.", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self.registry.register(_HttpCollector(endpoints))

    def observe_commit(self, rows: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.commit_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def route(self, query: bytes) -> Reply:
        return Reply(200, self.render(), CONTENT_TYPE_LATEST.encode())

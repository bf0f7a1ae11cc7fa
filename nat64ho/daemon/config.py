"""What ``nat64ho serve`` is told: one plain record, filled by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from nat64ho.core import wire
from nat64ho.core.session import DEFAULT_COOKIE_LIFETIME, DEFAULT_HELLO_RATE


@dataclass
class Config:
    db: Path | str  #: an SQLite file, or a PostgreSQL URL
    host: str = "0.0.0.0"
    port: int = wire.DEFAULT_PORT
    log_file: str = "-"
    first_port: int = 1028
    last_port: int = 65535
    allow: list[IPv4Network] = field(default_factory=list)  # IPv4Network; empty = any
    min_idle: float = 0.0  # seconds
    #: HELLOs answered per second, all sources together (per process).
    hello_rate: float = DEFAULT_HELLO_RATE
    #: New entries per second per NAT64. At 1,000/s a full 64508-port table
    #: turns over in 65 s, under the 2-minute least lifetime RFC 4787 REQ-5
    #: asks of a UDP mapping: a NAT64 creating faster keeps nothing alive.
    create_rate: float = 1000.0
    #: Requests per second per NAT64; a TOUCH of n ports counts n.
    request_rate: float = 10_000.0
    cookie_lifetime: int = DEFAULT_COOKIE_LIFETIME
    sync: str = "full"
    cache_size: int = 100_000
    keep_history_days: float | None = None
    #: Seconds per sealed period of the history (nat64ho.archive); 0: never seal.
    seal_every: float = 3600.0
    archive: Path | None = None  #: where segments go (SQLite); None: as recorded
    max_nats: int = 4096
    metrics: tuple[str, int] | None = None
    api: tuple[str, int] | str | None = None  #: (host, port), or a Unix socket's path
    standby: bool = False  #: wait for another server to release the table
    ipfix: list[tuple[str, int]] = field(default_factory=list)  # (host, port) of IPFIX collectors
    ipfix_domain: int = 0  # IPFIX observation domain id
    workers: int = 1  #: front-end processes (serve --workers)
    #: Set in a worker process by nat64ho.daemon.workers: its index, the
    #: socket it serves (bound by the parent) and its end of the writer's.
    worker: int | None = None
    sock_fd: int | None = None
    writer_fd: int | None = None

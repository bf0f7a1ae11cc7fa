"""``gateway`` and ``testbed``: the NAT64 side (nat64ho.gateway), a
userspace NAT64 on a TUN device, and the namespaces to try it in."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer

from nat64ho.cli.options import (
    Endpoint,
    UsageError,
    fail,
    number,
    parse_ipv4,
    parse_listen,
    parse_port,
    parser,
    usage_help,
)

WELL_KNOWN_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


def parse_prefix96(text: str, what: str) -> ipaddress.IPv6Network:
    """The NAT64 prefix: an IPv6 /96 without host bits."""
    try:
        net = ipaddress.IPv6Network(text, strict=True)
    except ValueError:
        raise UsageError(f"{what} {text!r}: not an IPv6 prefix") from None
    if "/" not in text or net.prefixlen != 96:
        raise UsageError(f"{what} {text!r}: expected an IPv6 /96, e.g. 64:ff9b::/96")
    return net


def parse_server(text: str, what: str) -> Endpoint:
    """A handoff server: IPV4:PORT."""
    host, port = parse_listen(text, what)
    if ":" in host or port == 0:
        raise UsageError(f"{what} {text!r}: expected IPV4:PORT, e.g. 192.0.2.1:6464")
    return Endpoint(host, port)


def gateway(
    tun: Annotated[
        str,
        typer.Option(
            metavar="NAME",
            help="TUN device to attach to (created if "
            "missing; route the prefix and the pool address to it).",
        ),
    ],
    pool: Annotated[
        int,
        typer.Option(
            metavar="IPV4",
            parser=parser(parse_ipv4, "--pool"),
            help="The pool address: the source of translated packets and of handoff datagrams.",
        ),
    ],
    server: Annotated[
        list[Endpoint],
        typer.Option(
            metavar="ADDR:PORT",
            parser=parser(parse_server, "--server"),
            help="A handoff server; traffic to ADDR is translated with its table. "
            "Repeat for more hosts.",
        ),
    ],
    prefix: Annotated[
        ipaddress.IPv6Network,
        typer.Option(
            metavar="PREFIX/96",
            help="NAT64 prefix (RFC 6052).",
            parser=parser(parse_prefix96, "--prefix"),
            show_default="64:ff9b::/96",
        ),
    ] = WELL_KNOWN_PREFIX,
    handoff_port: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Source port of handoff datagrams; keep it outside the servers' port range.",
            parser=parser(parse_port, "--handoff-port"),
        ),
    ] = 1027,
    touch_interval: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="How often the ports in use are TOUCHed (the servers' LRU order is this precise).",
            parser=number("--touch-interval", 0.05, 3600),
        ),
    ] = 5.0,
) -> None:
    """Run a userspace stateful NAT64 whose port table lives in handoff servers.

    IPv6 packets to PREFIX::IPV4, where IPV4 has a handoff server, leave from
    POOL:PORT, PORT being what that server maps; packets to POOL:PORT return to
    the client the server names. Linux,
    root. SIGTERM: exit 0; SIGUSR1: log the counters.
    """
    from nat64ho.gateway import core
    from nat64ho.gateway import tun as tun_io

    servers = [(ipaddress.IPv4Address(host).packed, port) for host, port in server]
    if len({a for a, _ in servers}) != len(servers):
        fail("--server: one server per IPv4 address")
    if not tun or len(tun.encode()) > 15 or "/" in tun:
        fail(f"--tun {tun!r}: not an interface name (1-15 characters)")
    gw = core.Gateway(
        prefix.network_address.packed[:12],
        pool.to_bytes(4, "big"),
        servers,
        handoff_port=handoff_port,
        touch_interval=touch_interval,
    )
    banner = (
        f"tun {tun}, prefix {prefix}, pool {ipaddress.IPv4Address(pool)} (handoff from port "
        f"{handoff_port}), servers "
        + ", ".join(f"{host}:{port}" for host, port in server)
        + f", boot id {gw.boot_id.hex()}"
    )
    try:
        tun_io.run(gw, tun, banner)
    except OSError as exc:
        fail(f"--tun {tun}: {exc.strerror or exc}", 1)


testbed_app = typer.Typer(
    help="A NAT64 test bed in network namespaces (root): IPv6-only client, "
    "gateway, IPv4 host with 'nat64ho serve' and services.",
    short_help="Build or remove a NAT64 test bed in network namespaces.",
)
testbed_app.callback(invoke_without_command=True)(usage_help)
TestbedName = Annotated[
    str,
    typer.Option(
        "--name",
        metavar="NAME",
        help="Prefix of the namespaces: NAME-client, NAME-nat64, NAME-host.",
    ),
]
TestbedState = Annotated[Path, typer.Option("--state", metavar="DIR", help="Database and logs.")]


def _testbed(name: str) -> ModuleType:
    """The test bed module, once ``name`` is valid (exit 2) and the machine
    can build namespaces (exit 1)."""
    from nat64ho.gateway import testbed as tb

    try:
        tb.check_name(name)
    except tb.TestbedError as exc:
        fail(str(exc))
    if (why := tb.available()) is not None:
        fail(f"the test bed {why}", 1)
    return tb


@testbed_app.command("up")
def testbed_up(
    name: TestbedName = "nat64ho", state: TestbedState = Path("/tmp/nat64ho-testbed")
) -> None:
    """Build the namespaces and start the server, the services and the gateway."""
    tb = _testbed(name)
    try:
        bed = tb.up(name, state.absolute())
    except tb.TestbedError as exc:
        fail(str(exc), 1)
    typer.echo(
        f"""Test bed {name!r} is up; state in {bed.state}.
  client {tb.CLIENT6} (netns {bed.client}), NAT64 pool {tb.POOL} (netns {bed.nat64}),
  host {tb.HOST4} (netns {bed.host}): nat64ho serve :{tb.HANDOFF_PORT}, HTTP :{tb.HTTP_PORT}, echo :{tb.ECHO_PORT}
Try:
  ip netns exec {bed.client} curl http://[64:ff9b::{tb.HOST4}]:{tb.HTTP_PORT}/
  cat {bed.state}/services.out
  nat64ho who --db {bed.db} {tb.POOL}:PORT"""
        + (
            f"""
  ip netns exec {bed.client} curl http://[64:ff9b::{tb.HOST4}]/
  tail -1 {bed.nginx_log}   (nginx, port {tb.NGINX_PORT}: the client's IPv6 address)"""
            if bed.with_nginx
            else ""
        )
        + f"""
Stop: nat64ho testbed down --name {name}"""
    )


@testbed_app.command("down")
def testbed_down(
    name: TestbedName = "nat64ho", state: TestbedState = Path("/tmp/nat64ho-testbed")
) -> None:
    """Stop everything in the test bed's namespaces and delete them (the state stays)."""
    tb = _testbed(name)
    try:
        gone = tb.down(name, state)
    except tb.TestbedError as exc:
        fail(str(exc), 1)
    typer.echo(f"Test bed {name!r} " + ("removed." if gone else "was not up."))

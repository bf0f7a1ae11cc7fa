"""``gateway`` and ``testbed``: the NAT64 side (nat64ho.gateway), a
userspace NAT64 on a TUN device, and the namespaces to try it in."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer

from nat64ho.cli.options import UsageError, fail, parse_ipv4, parse_listen, parse_port


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
        str,
        typer.Option(
            metavar="IPV4",
            help="The pool address: the source of translated packets and of handoff datagrams.",
        ),
    ],
    server: Annotated[
        list[str],
        typer.Option(
            metavar="ADDR:PORT",
            help="A handoff server; traffic to ADDR is translated with its table. "
            "Repeat for more hosts.",
        ),
    ],
    prefix: Annotated[
        str, typer.Option(metavar="PREFIX/96", help="NAT64 prefix (RFC 6052).")
    ] = "64:ff9b::/96",
    handoff_port: Annotated[
        str,
        typer.Option(
            metavar="N",
            help="Source port of handoff datagrams; keep it outside the servers' port range.",
        ),
    ] = "1027",
    touch_interval: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="How often the ports in use are TOUCHed (the servers' LRU order is this precise).",
            min=0.05,
            max=3600,
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

    try:
        net = ipaddress.IPv6Network(prefix, strict=True) if "/" in prefix else None
        if net is None or net.prefixlen != 96:
            raise UsageError(f"--prefix {prefix!r}: expected an IPv6 /96, e.g. 64:ff9b::/96")
        pool_v = parse_ipv4(pool, "--pool")
        hport = parse_port(handoff_port, "--handoff-port")
        servers = []
        for text in server:
            host, port = parse_listen(text, "--server")
            if ":" in host or port == 0:
                raise UsageError(f"--server {text!r}: expected IPV4:PORT, e.g. 192.0.2.1:6464")
            servers.append((ipaddress.IPv4Address(host).packed, port))
        if len({a for a, _ in servers}) != len(servers):
            raise UsageError("--server: one server per IPv4 address")
        if not tun or len(tun.encode()) > 15 or "/" in tun:
            raise UsageError(f"--tun {tun!r}: not an interface name (1-15 characters)")
    except ValueError:
        fail(f"--prefix {prefix!r}: not an IPv6 prefix")
    except UsageError as exc:
        fail(str(exc))
    gw = core.Gateway(
        net.network_address.packed[:12],
        pool_v.to_bytes(4, "big"),
        servers,
        handoff_port=hport,
        touch_interval=touch_interval,
    )
    banner = (
        f"tun {tun}, prefix {net}, pool {pool} (handoff from port {hport}), servers "
        + ", ".join(server)
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
    no_args_is_help=True,
)
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

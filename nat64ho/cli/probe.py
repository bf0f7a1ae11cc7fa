"""``probe``: talk to a server as a NAT64 would and print each answer."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Annotated

import typer

from nat64ho.cli.options import (
    UsageError,
    fail,
    parse_ipv4,
    parse_ipv6_target,
    parse_listen,
    parse_port,
    parse_seconds,
)


def probe(
    server_addr: Annotated[
        str,
        typer.Argument(
            metavar="SERVER",
            help="The server: IPV4 or IPV4:PORT (port 6464 if not given); with --health, "
            "its --metrics ADDR:PORT or --api unix:PATH.",
            show_default=False,
        ),
    ],
    map_: Annotated[
        list[str] | None,
        typer.Option(
            "--map",
            metavar="[IPV6]:PORT",
            help="Send a MAP for this client endpoint (repeat for "
            "more). Creates an entry, as a NAT64 would.",
            show_default=False,
        ),
    ] = None,
    lookup: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PORT",
            help="Send a LOOKUP for this NAT port (repeat for more).",
            show_default=False,
        ),
    ] = None,
    touch: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PORT[,PORT...]",
            help="Send a TOUCH of these NAT ports (repeat for more "
            "TOUCHes); only ports without an entry are answered.",
            show_default=False,
        ),
    ] = None,
    source: Annotated[
        str,
        typer.Option(
            metavar="IPV4",
            help="Local address to send from: the server keeps one table per source address.",
        ),
    ] = "0.0.0.0",
    timeout: Annotated[
        str, typer.Option(metavar="SECONDS", help="How long to wait for each answer.")
    ] = "2",
    health: Annotated[
        bool,
        typer.Option(
            "--health",
            help="Only ask the server's HTTP endpoint (SERVER: its --metrics or --api) "
            "whether it serves: no HELLO, nothing stored or logged. Prints 'ok', exit 0; "
            "else one Error line, exit 1. For monitoring.",
        ),
    ] = False,
) -> None:
    """Say HELLO to a server and confirm the session as a NAT64 does, then send each
    --map, then each --lookup, then each --touch, printing every answer decoded with
    its round-trip time.

    Exit status 0 when the server answered every HELLO, MAP and LOOKUP, 1 when
    one went unanswered, 2 for bad values. A probe is a new NAT64 boot for the
    source address: never probe from the address of a NAT64 in service.
    """
    from nat64ho import probe as p

    if health:
        if map_ or lookup or touch or source != "0.0.0.0":
            fail(
                "--health asks the HTTP endpoint only: give no --map, --lookup, --touch or --source"
            )
        try:
            wait = parse_seconds(timeout, "--timeout") / 1e6
        except UsageError as exc:
            fail(str(exc))
        try:
            typer.echo(p.health(server_addr, wait))
        except p.Unhealthy as exc:
            fail(str(exc), 1)
        return
    try:
        if ":" in server_addr:
            host, port = parse_listen(server_addr, "SERVER")
        else:
            host, port = parse_listen(f"{server_addr}:6464", "SERVER")
        if ipaddress.ip_address(host).version != 4 or port == 0:
            raise UsageError(
                f"SERVER {server_addr!r}: give an IPv4 address (and a port "
                "1-65535): the protocol runs over IPv4"
            )
        parse_ipv4(source, "--source")
        wait = parse_seconds(timeout, "--timeout") / 1e6
        if not 0 < wait <= 60:
            raise UsageError(f"--timeout {timeout!r}: expected seconds, above 0 and at most 60")
        maps = []
        for text in map_ or []:
            net, aport = parse_ipv6_target(text, "--map")
            if net.prefixlen != 128 or aport is None:
                raise UsageError(f"--map {text!r}: expected [IPV6]:PORT, e.g. '[2001:db8::1]:4000'")
            maps.append((net.network_address.packed, aport))
        lookups = [parse_port(x, "--lookup") for x in lookup or []]
        touches = []
        for text in touch or []:
            ports = [parse_port(x.strip(), "--touch") for x in text.split(",")]
            if len(ports) > 255:
                raise UsageError(f"--touch {text!r}: at most 255 ports in one TOUCH")
            touches.append(ports)
    except UsageError as exc:
        fail(str(exc))
    plan = p.Plan(maps, lookups, touches)

    def say(line: str) -> None:
        typer.echo(line)

    try:
        ok = asyncio.run(p.run(host, port, source, plan, wait, say))
    except OSError as exc:
        fail(f"{host}:{port} from {source}: {exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if not ok:
        raise typer.Exit(1)

"""``probe``: talk to a server as a NAT64 would and print each answer."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Annotated, NamedTuple

import typer

from nat64ho.cli.options import (
    Endpoint,
    UsageError,
    fail,
    parse_ipv4,
    parse_ipv6_target,
    parse_listen,
    parse_port,
    parse_seconds,
    parser,
)


class Server(NamedTuple):
    """SERVER as given, and its UDP endpoint where it names one."""

    text: str
    udp: Endpoint | None


def parse_server(text: str, what: str) -> Server:
    """``IPV4`` or ``IPV4:PORT`` (port 6464 if not given); for --health also
    an HTTP endpoint: ``ADDR:PORT`` or ``unix:PATH``."""
    if text.startswith("unix:") and len(text) > 5:
        return Server(text, None)
    host, port = parse_listen(text if ":" in text else f"{text}:6464", what)
    if ipaddress.ip_address(host).version != 4 or port == 0:
        return Server(text, None)
    return Server(text, Endpoint(host, port))


def parse_source(text: str, what: str) -> str:
    parse_ipv4(text, what)
    return text


class Client(NamedTuple):
    addr: bytes  #: IPv6, 16 octets
    port: int


def parse_map(text: str, what: str) -> Client:
    """A client endpoint ``[IPV6]:PORT``, as MAP carries it."""
    try:
        net, aport = parse_ipv6_target(text, what)
    except UsageError:
        net, aport = None, None
    if net is None or net.prefixlen != 128 or aport is None:
        raise UsageError(f"{what} {text!r}: expected [IPV6]:PORT, e.g. '[2001:db8::1]:4000'")
    return Client(net.network_address.packed, aport)


class Touch(tuple[int, ...]):
    """The NAT ports of one TOUCH."""


def parse_touch(text: str, what: str) -> Touch:
    """``PORT[,PORT...]``, at most 255 of them."""
    ports = Touch(parse_port(x.strip(), what) for x in text.split(","))
    if len(ports) > 255:
        raise UsageError(f"{what} {text!r}: at most 255 ports in one TOUCH")
    return ports


def parse_timeout(text: str, what: str) -> float:
    wait = parse_seconds(text, what) / 1e6
    if not 0 < wait <= 60:
        raise UsageError(f"{what} {text!r}: expected seconds, above 0 and at most 60")
    return wait


def probe(
    server_addr: Annotated[
        Server,
        typer.Argument(
            metavar="SERVER",
            help="The server: IPV4 or IPV4:PORT (port 6464 if not given); with --health, "
            "its --metrics ADDR:PORT or --api unix:PATH.",
            parser=parser(parse_server, "SERVER"),
            show_default=False,
        ),
    ],
    map_: Annotated[
        list[Client] | None,
        typer.Option(
            "--map",
            metavar="[IPV6]:PORT",
            help="Send a MAP for this client endpoint (repeat for "
            "more). Creates an entry, as a NAT64 would.",
            parser=parser(parse_map, "--map"),
            show_default=False,
        ),
    ] = None,
    lookup: Annotated[
        list[int] | None,
        typer.Option(
            metavar="PORT",
            help="Send a LOOKUP for this NAT port (repeat for more).",
            parser=parser(parse_port, "--lookup"),
            show_default=False,
        ),
    ] = None,
    touch: Annotated[
        list[Touch] | None,
        typer.Option(
            metavar="PORT[,PORT...]",
            help="Send a TOUCH of these NAT ports (repeat for more "
            "TOUCHes); only ports without an entry are answered.",
            parser=parser(parse_touch, "--touch"),
            show_default=False,
        ),
    ] = None,
    source: Annotated[
        str,
        typer.Option(
            metavar="IPV4",
            help="Local address to send from: the server keeps one table per source address.",
            parser=parser(parse_source, "--source"),
        ),
    ] = "0.0.0.0",
    timeout: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="How long to wait for each answer.",
            parser=parser(parse_timeout, "--timeout"),
        ),
    ] = 2.0,
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
            typer.echo(p.health(server_addr.text, timeout))
        except p.Unhealthy as exc:
            fail(str(exc), 1)
        return
    if server_addr.udp is None:
        fail(
            f"SERVER {server_addr.text!r}: give an IPv4 address (and a port 1-65535): "
            "the protocol runs over IPv4"
        )
    host, port = server_addr.udp
    plan = p.Plan(list(map_ or []), lookup or [], [list(t) for t in touch or []])

    def say(line: str) -> None:
        typer.echo(line)

    try:
        ok = asyncio.run(p.run(host, port, source, plan, timeout, say))
    except OSError as exc:
        fail(f"{host}:{port} from {source}: {exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if not ok:
        raise typer.Exit(1)

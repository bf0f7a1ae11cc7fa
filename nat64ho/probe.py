"""``nat64ho probe``: one short conversation with a server as a NAT64 would
have it, each answer decoded on a line with its round-trip time.

Owns only the sequencing and the wording; the session and the wire format
are :mod:`nat64ho.peer` and :mod:`nat64ho.core.wire`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NamedTuple

from nat64ho.core import wire
from nat64ho.eventlog import ipv6_str
from nat64ho.peer import ANSWERS, Client, Peer

#: How long a TOUCH waits for UNMAPPED answers: a port with an entry gets
#: none, so silence is the answer and only a bound ends the wait.
TOUCH_QUIET_S = 0.5


class Plan(NamedTuple):
    """What to ask, in this order after HELLO and the confirming COOKIE."""

    maps: list[tuple[bytes, int]]  #: (IPv6 address, port) of each MAP
    lookups: list[int]  #: NAT port of each LOOKUP
    touches: list[list[int]]  #: the ports of each TOUCH


def describe(m: wire.Message) -> str:
    """One server message in words."""
    if isinstance(m, wire.Welcome):
        return (
            f"WELCOME ports {m.first_port}-{m.last_port}, cookie {m.cookie.hex()}, "
            f"boot id {m.boot_id.hex()}"
        )
    if isinstance(m, wire.Mapping):
        return f"MAPPING {m.nat_port} [{ipv6_str(m.addr)}]:{m.port}"
    if isinstance(m, wire.Deleted):
        return f"DELETED {m.nat_port} [{ipv6_str(m.addr)}]:{m.port}"
    if isinstance(m, wire.Unmapped):
        return f"UNMAPPED {m.nat_port}"
    if isinstance(m, wire.Error):
        try:
            name = wire.ErrorCode(m.code).name
        except ValueError:
            name = f"code {m.code}"
        return f"ERROR {name} (to 0x{m.offending:02x})"
    return repr(m)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


async def run(
    host: str, port: int, source: str, plan: Plan, timeout: float, say: Callable[[str], None]
) -> bool:
    """Talk to the server at ``host``:``port`` from ``source``; ``say`` each
    line. True when every request that expects an answer got one."""
    loop = asyncio.get_running_loop()
    client = await Client.connect(host, port, local=source, peer=Peer())
    answered = True
    try:
        t0 = loop.time()
        client.send_raw(client.peer.hello())
        got = await client.collect(1, timeout)
        welcome = next((m for m in got if isinstance(m, wire.Welcome)), None)
        head = f"HELLO boot id {client.peer.boot_id.hex()} -> "
        if not got:
            say(head + f"no answer within {timeout:g} s")
            return False
        say(head + "; ".join(map(describe, got)) + f"  ({_ms(loop.time() - t0)})")
        if welcome is None:
            say("no session: nothing more to ask")
            return False
        # docs/protocol.md §4.5: COOKIE then HELLO confirms the boot at
        # once; nothing answers it.
        client.send_raw(client.peer.confirm())
        say("COOKIE, HELLO -> sent to confirm the session (no answer expected)")

        async def ask(
            messages: list[wire.Message], answers: int, wait: float
        ) -> tuple[list[wire.Message], str]:
            t0 = loop.time()
            client.send(messages)
            got = await client.collect(answers, wait)
            rtt = loop.time() - t0
            complete = sum(isinstance(m, ANSWERS) for m in got) >= answers
            # An incomplete TOUCH waited out its bound: that is no round trip.
            timing = f"  ({_ms(rtt)})" if complete else f"  (waited {_ms(rtt)})" if got else ""
            return got, timing

        requests: list[tuple[str, list[wire.Message]]] = [
            (f"MAP [{ipv6_str(a)}]:{p}", [wire.Map(a, p)]) for a, p in plan.maps
        ]
        requests += [(f"LOOKUP {n}", [wire.Lookup(n)]) for n in plan.lookups]
        for label, messages in requests:
            got, timing = await ask(messages, 1, timeout)
            if got:
                say(f"{label} -> " + "; ".join(map(describe, got)) + timing)
            else:
                say(f"{label} -> no answer within {timeout:g} s")
                answered = False
        for ports in plan.touches:
            got, timing = await ask(
                [wire.Touch(tuple(ports))], len(ports), min(timeout, TOUCH_QUIET_S)
            )
            quiet = [
                p
                for p in ports
                if not any(isinstance(m, wire.Unmapped) and m.nat_port == p for m in got)
            ]
            parts = list(map(describe, got))
            if quiet:
                parts.append(
                    "no answer for " + " ".join(map(str, quiet)) + " (entries there: refreshed)"
                )
            say("TOUCH " + " ".join(map(str, ports)) + " -> " + "; ".join(parts) + timing)
    finally:
        client.close()
    return answered


class Unhealthy(Exception):
    """The server's HTTP endpoint did not say it serves; the message says why."""


def health(endpoint: str, timeout: float) -> str:
    """``ok`` when the server behind ``endpoint`` (its ``--metrics``
    ADDR:PORT or ``--api`` unix:PATH) says it serves. Asks ``/health``, which
    the server answers from its own state: unlike a HELLO, nothing is
    stored or logged, so a monitoring check leaves no trace."""
    from nat64ho.client import ApiError, fetch

    try:
        status, body = fetch(endpoint, "/health", timeout)
    except ApiError as exc:
        raise Unhealthy(str(exc)) from None
    if status != 200:
        raise Unhealthy(f"{endpoint}: {status} {body.decode(errors='replace').strip()}")
    return "ok"

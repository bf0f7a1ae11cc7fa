"""An ASGI middleware that shows an application its real clients: for a
connection from a NAT64, ``scope["client"]`` becomes the IPv6 client that
holds the NAT64's port, as the running nat64ho server says (docs/api.md).

    from nat64ho.asgi import RealClient
    app = RealClient(app, nat64s=["192.0.2.9/32"])

The NAT64's own endpoint stays in ``scope["nat64ho.nat64"]``. When the API
cannot be asked, the request goes on with the NAT64's address (fail open):
an attribution API must never take the application down.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from nat64ho.client import DEFAULT_API, TIMEOUT, ApiError, alookup

log = logging.getLogger("nat64ho.asgi")

Scope = MutableMapping[str, Any]
App = Callable[
    [Scope, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]
]

#: Seconds between two log lines about an API that cannot be asked: one
#: per request would flood the application's log while the API is down.
WARN_INTERVAL = 60.0


class RealClient:
    """Wraps ``app``. ``nat64s``: the NAT64 addresses or prefixes to ask
    about (default: every IPv4 client; IPv6 clients never come through a
    NAT64 and are never asked about)."""

    def __init__(
        self,
        app: App,
        *,
        api: str = DEFAULT_API,
        nat64s: Iterable[str] | None = None,
        timeout: float = TIMEOUT,
    ):
        self.app = app
        self.api = api
        self.timeout = timeout
        self.nat64s = None if nat64s is None else [ipaddress.IPv4Network(n) for n in nat64s]
        self._quiet_until = 0.0

    def _asks(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False  # a Unix socket's client, or a proxy's name
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is None:
                return False
            ip = ip.ipv4_mapped
        return self.nat64s is None or any(ip in n for n in self.nat64s)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        client = scope.get("client")
        if scope["type"] in ("http", "websocket") and client and self._asks(client[0]):
            host = client[0].removeprefix("::ffff:")
            try:
                holder = await alookup(host, client[1], api=self.api, timeout=self.timeout)
            except ApiError as exc:
                holder = None
                now = time.monotonic()
                if now >= self._quiet_until:
                    log.warning("nat64ho API: %s; clients keep their NAT64's address", exc)
                    self._quiet_until = now + WARN_INTERVAL
            if holder is not None:
                scope = dict(scope)
                scope["nat64ho.nat64"] = (host, client[1])
                scope["client"] = (holder.address, holder.port)
        await self.app(scope, receive, send)

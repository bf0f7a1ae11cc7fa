"""The HTTP endpoints ``serve`` runs beside the UDP socket: ``--metrics``
(Prometheus) and ``--api`` (attribution), each with ``/health``, started and
stopped together."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nat64ho.daemon.config import Config
from nat64ho.daemon.http import HttpServer

if TYPE_CHECKING:
    from nat64ho.daemon.api import Api
    from nat64ho.daemon.protocol import Server

log = logging.getLogger("nat64ho")


class Endpoints:
    def __init__(self) -> None:
        self.servers: list[HttpServer] = []
        self.api: Api | None = None

    async def start(self, config: Config, server: Server) -> None:
        """Listen where ``config`` says (nothing when neither is set); on a
        failure, what was started is stopped and the OSError raised."""
        from nat64ho.daemon.api import health

        metrics = server.metrics  # made by the server when config.metrics is set
        try:
            if config.metrics is not None and metrics is not None:
                http = HttpServer(
                    {b"/metrics": metrics.route, b"/": metrics.route, b"/health": health(server)},
                    "metrics",
                )
                self.servers.append(http)
                at = await http.start(config.metrics)
                log.info("metrics on %s/metrics", at)
            if config.api is not None:
                from nat64ho.daemon.api import PATH, Api

                self.api = Api(server)
                http = HttpServer({PATH: self.api.client, b"/health": health(server)}, "api")
                self.servers.append(http)
                at = await http.start(config.api)
                log.info("API on %s (GET %s)", at, PATH.decode())
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for http in self.servers:
            await http.stop()
        self.servers.clear()
        if self.api is not None:
            self.api.close()
            self.api = None

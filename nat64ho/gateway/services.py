"""The IPv4 host's services in the test bed: HTTP, a TCP line echo and a UDP
echo, each logging the peer address *and port* it saw, one line per event on
stdout (``http.server`` logs no port, which is the part to attribute).

    python -m nat64ho.gateway.services --bind 192.0.2.1 --http 8080 --echo 7007
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Longest line the echo keeps before echoing it anyway.
MAX_LINE = 65536


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Http(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        body = f"Hello from the IPv4 host. You came from {peer}.\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: Any) -> None:
        say(f"http {self.client_address[0]}:{self.client_address[1]} {fmt % args}")


async def _echo_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    ip, port = writer.get_extra_info("peername")[:2]
    say(f"tcp {ip}:{port} accepted")
    first = True
    try:
        while line := await reader.readline():
            if first:
                say(f"tcp {ip}:{port} first {line[:200].decode(errors='replace').strip()}")
                first = False
            writer.write(line)
            await writer.drain()
    except (ConnectionError, OSError) as exc:
        say(f"tcp {ip}:{port} error {exc.__class__.__name__}")
    else:
        say(f"tcp {ip}:{port} closed")
    writer.close()


class _EchoUdp(asyncio.DatagramProtocol):
    # A datagram endpoint always hands over a DatagramTransport; typeshed's
    # DatagramProtocol narrows the base the same way, with the same ignore.
    def connection_made(self, transport: asyncio.DatagramTransport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        say(f"udp {addr[0]}:{addr[1]} {len(data)} octets")
        self.transport.sendto(data, addr)


async def _main(bind: str, echo: int) -> None:
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(_echo_tcp, bind, echo, limit=MAX_LINE, backlog=1024)
    await loop.create_datagram_endpoint(_EchoUdp, local_addr=(bind, echo))
    say(f"echo on {bind}:{echo} (tcp, udp)")
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bind", default="192.0.2.1")
    ap.add_argument("--http", type=int, default=8080)
    ap.add_argument("--echo", type=int, default=7007)
    args = ap.parse_args(argv)
    httpd = ThreadingHTTPServer((args.bind, args.http), _Http)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    say(f"http on {args.bind}:{args.http}")
    try:
        asyncio.run(_main(args.bind, args.echo))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

"""The gateway's I/O: a TUN device (Linux, no packet information header)
read from the asyncio loop, fed to :class:`~nat64ho.gateway.core.Gateway`,
and written back with whatever it returns; a timer drives its retransmissions.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import struct
import sys
import time

from nat64ho.gateway.core import Gateway

log = logging.getLogger("nat64ho.gateway")

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
#: Packets read per wake-up before answering: bounds the latency one burst
#: adds to the handoff datagrams and packets queued behind it.
READ_BATCH = 256
#: How often timers are checked (retransmissions, HELLO, TOUCH), seconds.
TICK = 0.05
#: Largest packet read from the device (its MTU is far below).
READ_SIZE = 65535


def open_tun(name: str) -> int:
    """A non-blocking fd on TUN device ``name`` (attached if it exists,
    created otherwise). Raises OSError."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


async def serve(gw: Gateway, fd: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    clock = time.monotonic

    def write(packets: list[bytes]) -> None:
        for pkt in packets:
            try:
                os.write(fd, pkt)
            except BlockingIOError:
                gw.counts["drop_tun_full"] += 1
            except OSError:
                gw.counts["drop_tun_error"] += 1

    def readable() -> None:
        now = clock()
        for _ in range(READ_BATCH):
            try:
                pkt = os.read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                gw.counts["drop_tun_error"] += 1
                break
            gw.packet(pkt, now)
        write(gw.flush(now))

    async def ticker() -> None:
        while True:
            await asyncio.sleep(TICK)
            write(gw.flush(clock()))

    loop.add_reader(fd, readable)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("counts %s", _counts(gw)))
    write(gw.flush(clock()))  # the HELLOs
    task = asyncio.ensure_future(ticker())
    try:
        await stop.wait()
    finally:
        task.cancel()
        loop.remove_reader(fd)
        log.info("stopped: counts %s", _counts(gw))


def _counts(gw: Gateway) -> str:
    return json.dumps(dict(sorted(gw.counts.items())), separators=(",", ":"))


def run(gw: Gateway, tun: str, banner: str) -> None:
    """Blocking entry point for ``nat64ho gateway``. Raises OSError if the
    device cannot be opened."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="nat64ho gateway: %(message)s"
    )
    gw.log = log.info
    existed = os.path.exists(f"/sys/class/net/{tun}")
    fd = open_tun(tun)
    log.info("%s", banner)
    if not existed:
        # Ours until we exit: nothing routes to it until someone does.
        log.info("created tun %s: set it up and route the prefix and the pool address to it", tun)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(gw, fd))
        else:
            uvloop.run(serve(gw, fd))
    finally:
        os.close(fd)

"""The UDP sockets ``serve`` listens on: one bound with a large receive
buffer, or a group that a BPF program steers each NAT64 to one worker of."""

from __future__ import annotations

import ctypes
import logging
import socket
import struct
from pathlib import Path

#: Kernel receive buffer asked for: a burst from a busy NAT64 waits here
#: rather than being dropped while a commit runs. The kernel caps it at
#: net.core.rmem_max (install.sh raises that: contrib/sysctl).
RCVBUF = 4 * 1024 * 1024
RMEM_MAX = Path("/proc/sys/net/core/rmem_max")
#: From <asm-generic/socket.h>: a classic BPF program choosing the socket of
#: a SO_REUSEPORT group by its index (the order the sockets were bound).
SO_ATTACH_REUSEPORT_CBPF = 51
#: Negative offsets of classic BPF load from the network header.
SKF_NET_OFF = -0x100000


class ListenError(OSError):
    """The UDP socket could not be bound; the message says where and why."""


def bind(host: str, port: int, reuseport: bool = False) -> socket.socket:
    # Bound here rather than by the event loop, whose errors (uvloop's in
    # particular) do not say why a bind failed.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if reuseport:  # one of a group (bind_group)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        except OSError:
            pass
        if sock.family == socket.AF_INET6:
            # Only [::] gets here (the CLI refuses other IPv6 addresses): it
            # serves IPv4 NAT64s, which arrive as ::ffff:a.b.c.d.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def rcvbuf_line(sock: socket.socket) -> tuple[int, str]:
    """The log level and line that say what receive buffer ``sock`` got:
    the kernel cuts RCVBUF to net.core.rmem_max without an error."""
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # Linux reports twice what it grants (the other half is its bookkeeping).
    if got >= 2 * RCVBUF:
        return logging.INFO, f"UDP receive buffer {got // 1024} KiB (SO_RCVBUF), as asked"
    try:
        limit = f"net.core.rmem_max is {int(RMEM_MAX.read_text())}"
    except (OSError, ValueError):
        limit = "net.core.rmem_max is lower"
    return logging.WARNING, (
        f"UDP receive buffer {got // 1024} KiB (SO_RCVBUF), not the {RCVBUF // 1024} KiB "
        f"asked for: {limit}, and bursts beyond the buffer are dropped by the kernel; "
        f"set net.core.rmem_max to {RCVBUF} or more (install.sh does: "
        "/etc/sysctl.d/60-nat64ho.conf)"
    )


def steering(n: int) -> bytes:
    """The program: A = source IPv4 address; A %= n; return A."""
    code = [
        (0x20, 0, 0, (SKF_NET_OFF + 12) & 0xFFFFFFFF),  # ld [net + 12]: saddr
        (0x94, 0, 0, n),  # mod #n
        (0x16, 0, 0, 0),  # ret a
    ]
    return b"".join(struct.pack("HBBI", *insn) for insn in code)


def worker_of(nat: int, n: int) -> int:
    """The worker that serves NAT64 ``nat`` (what the program computes)."""
    return nat % n


def bind_group(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` sockets on one address, steered by :func:`steering`."""
    socks: list[socket.socket] = []
    try:
        for i in range(n):
            socks.append(bind(host, port if i == 0 else socks[0].getsockname()[1], reuseport=True))
        prog = ctypes.create_string_buffer(steering(n))
        fprog = struct.pack("HL", len(prog.raw) // 8, ctypes.addressof(prog))
        socks[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks

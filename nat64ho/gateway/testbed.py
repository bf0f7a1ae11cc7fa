"""Three network namespaces around the gateway, on documentation addresses
only: an IPv6-only client, the NAT64 and an IPv4 host running ``nat64ho
serve`` and the services. Nothing in them is routed out of the machine.

    client 2001:db8:1::10 --- 2001:db8:1::1  NAT64  192.0.2.2 --- 192.0.2.1 host
                                  tun "nat64": 64:ff9b::/96 and 192.0.2.9 (the pool)

Used by ``nat64ho testbed up|down`` and by the end-to-end tests. Needs root
(ip netns) and /dev/net/tun.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

PREFIX = "64:ff9b::/96"
POOL = "192.0.2.9"
HOST4 = "192.0.2.1"
NAT4 = "192.0.2.2"
CLIENT6 = "2001:db8:1::10"
ROUTER6 = "2001:db8:1::1"
#: Extra client addresses come from here (``add_clients``).
CLIENTS_NET = "2001:db8:1::"
HANDOFF_PORT = 6464
HTTP_PORT = 8080
#: Debian's nginx, where installed, with contrib/nginx (docs/api.md).
NGINX_PORT = 80
ECHO_PORT = 7007
TUN = "nat64"
#: Packets the kernel queues for the gateway (default 500): a Python process
#: on a busy machine is descheduled for milliseconds at a time.
TUN_QUEUE = 5000
#: How long a started process may take to say it is ready (a busy 2-core CI
#: machine starts Python slowly).
READY_S = 30.0

_CLONE_NEWNET = 0x40000000


class TestbedError(RuntimeError):
    """A step of building or running the test bed failed."""


def available() -> str | None:
    """Why the test bed cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns, TUN)"
    if shutil.which("ip") is None:
        return "needs iproute2 (the 'ip' command)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def check_name(name: str) -> None:
    """Raises TestbedError unless ``name`` can prefix namespace names."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,20}", name):
        raise TestbedError(f"--name {name!r}: use 1-21 characters of a-z, 0-9 and '-'")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise TestbedError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


class Proc:
    """A process started in a namespace, its output in a file."""

    def __init__(
        self,
        ns: str,
        cmd: list[str],
        out: Path,
        ready: str | None,
        detach: bool = False,
        timeout: float = READY_S,
    ):
        self.out = out
        self.cmd = cmd
        self._file = open(out, "ab")
        self.start_at = out.stat().st_size
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self._file.close()
        if ready is not None:
            self.wait_for(ready, timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.out.read_bytes()[self.start_at :].decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = READY_S) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.text())
            if m:
                return m
            if self.proc.poll() is not None:
                raise TestbedError(f"{self.cmd[:4]} exited {self.proc.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise TestbedError(
                    f"{self.cmd[:4]} not ready ({pattern!r}) after {timeout:.0f} s:\n{self.text()}"
                )
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(30)


class Testbed:
    """The namespaces ``NAME-client``, ``NAME-nat64`` and ``NAME-host``,
    with state (database, logs) under ``state``."""

    def __init__(self, name: str, state: Path):
        check_name(name)
        self.name = name
        self.state = Path(state)
        self.client = f"{name}-client"
        self.nat64 = f"{name}-nat64"
        self.host = f"{name}-host"
        self.namespaces = (self.client, self.nat64, self.host)
        self.db = self.state / "table.db"
        self.events = self.state / "events.log"
        self.api = self.state / "api.sock"
        self.nginx_log = self.state / "nginx-access.log"
        self.with_nginx = False  #: up() started nginx

    def exists(self) -> bool:
        listed = _ip("netns", "list").stdout.split()
        return any(ns in listed for ns in self.namespaces)

    # ------------------------------------------------------------ build
    def create(self) -> None:
        """Namespaces, links, addresses, routes and the TUN device; undone
        by :meth:`destroy` even when this fails half-way."""
        if self.exists():
            raise TestbedError(
                f"test bed {self.name!r} exists: 'nat64ho testbed down --name {self.name}' first"
            )
        self.state.mkdir(parents=True, exist_ok=True)
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise

    def _build(self) -> None:
        c, n, h = self.namespaces
        for ns in self.namespaces:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # Links are created inside the namespaces, so their names never meet
        # another test bed's in the root namespace.
        _ip("link", "add", "eth0", "netns", c, "type", "veth", "peer", "name", "v6", "netns", n)
        _ip("link", "add", "v4", "netns", n, "type", "veth", "peer", "name", "eth0", "netns", h)
        self.sysctl(c, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        self.sysctl(
            n,
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        )
        _ip("-n", c, "addr", "add", f"{CLIENT6}/64", "dev", "eth0", "nodad")
        _ip("-n", c, "link", "set", "eth0", "up")
        _ip("-n", c, "-6", "route", "add", "default", "via", ROUTER6)
        _ip("-n", n, "addr", "add", f"{ROUTER6}/64", "dev", "v6", "nodad")
        _ip("-n", n, "link", "set", "v6", "up")
        _ip("-n", n, "addr", "add", f"{NAT4}/29", "dev", "v4")
        _ip("-n", n, "link", "set", "v4", "up")
        # A persistent TUN device: it and its routes outlive a gateway that
        # is killed, so a restarted one picks up the same connections.
        _ip("-n", n, "tuntap", "add", "dev", TUN, "mode", "tun")
        _ip("-n", n, "link", "set", TUN, "up", "txqueuelen", str(TUN_QUEUE))
        _ip("-n", n, "-6", "route", "add", PREFIX, "dev", TUN)
        _ip("-n", n, "route", "add", f"{POOL}/32", "dev", TUN)
        _ip("-n", h, "addr", "add", f"{HOST4}/29", "dev", "eth0")
        _ip("-n", h, "link", "set", "eth0", "up")
        _ip("-n", h, "route", "add", f"{POOL}/32", "via", NAT4)

    def sysctl(self, ns: str, *settings: str) -> None:
        p = subprocess.run(
            ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings],
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            raise TestbedError(f"sysctl in {ns}: {p.stderr.strip()}")

    def add_clients(self, count: int) -> list[str]:
        """``count`` more client addresses (2001:db8:1::1:0 onwards)."""
        addrs = [f"{CLIENTS_NET}1:{i:x}" for i in range(count)]
        batch = "".join(f"addr add {a}/64 dev eth0 nodad\n" for a in addrs)
        p = subprocess.run(
            ["ip", "-n", self.client, "-batch", "-"], input=batch, capture_output=True, text=True
        )
        if p.returncode != 0:
            raise TestbedError(f"adding client addresses: {p.stderr.strip()}")
        return addrs

    def destroy(self) -> None:
        """Kill every process in the namespaces, then delete them."""
        for ns in self.namespaces:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), sig)
                deadline = time.monotonic() + 5
                while pids and time.monotonic() < deadline:
                    pids = _ip("netns", "pids", ns, check=False).stdout.split()
                    if pids:
                        time.sleep(0.05)
                if not pids:
                    break
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)

    # ------------------------------------------------------------ processes
    def serve(self, *args: str, detach: bool = False, api: bool = True) -> Proc:
        self.serve_proc = Proc(
            self.host,
            [
                sys.executable,
                "-m",
                "nat64ho",
                "serve",
                "--db",
                str(self.db),
                "--listen",
                f"{HOST4}:{HANDOFF_PORT}",
                "--log-file",
                str(self.events),
                *(["--api", f"unix:{self.api}"] if api else []),
                *args,
            ],
            self.state / "serve.out",
            r"listening on",
            detach,
        )
        return self.serve_proc

    def gateway(
        self, *args: str, detach: bool = False, ready: str | None = r"session with"
    ) -> Proc:
        return Proc(
            self.nat64,
            [
                sys.executable,
                "-m",
                "nat64ho",
                "gateway",
                "--tun",
                TUN,
                "--prefix",
                PREFIX,
                "--pool",
                POOL,
                "--server",
                f"{HOST4}:{HANDOFF_PORT}",
                *args,
            ],
            self.state / "gateway.out",
            ready,
            detach,
        )

    def services(self, detach: bool = False) -> Proc:
        return Proc(
            self.host,
            [
                sys.executable,
                "-m",
                "nat64ho.gateway.services",
                "--bind",
                HOST4,
                "--http",
                str(HTTP_PORT),
                "--echo",
                str(ECHO_PORT),
            ],
            self.state / "services.out",
            r"echo on",
            detach,
        )

    def nginx(
        self, server_extra: str = "", http_extra: str = "", detach: bool = False
    ) -> Proc | None:
        """Debian's nginx on HOST4:NGINX_PORT with contrib/nginx's files, a
        static page, and its access log in ``nginx-access.log``; None where
        nginx or the files are missing. ``*_extra``: more directives."""
        conf = nginx_conf(self.state, server_extra, http_extra)
        if conf is None:
            return None
        proc = Proc(
            self.host,
            ["nginx", "-e", str(self.state / "nginx-error.log"), "-c", str(conf)],
            self.state / "nginx.out",
            None,
            detach,
        )
        deadline = time.monotonic() + READY_S
        while not self._listening(HOST4, NGINX_PORT):
            if proc.proc.poll() is not None or time.monotonic() > deadline:
                raise TestbedError(f"nginx did not start: {proc.text()}")
            time.sleep(0.05)
        return proc

    def _listening(self, host: str, port: int) -> bool:
        with self.inside(self.host), socket.socket() as s:
            return s.connect_ex((host, port)) == 0

    def services_out(self) -> str:
        return (self.state / "services.out").read_text()

    def run(self, ns: str, *cmd: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout
        )

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """Run this thread in ``ns``: sockets made here stay in it."""
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/run/netns/{ns}", "rb") as new, open("/proc/thread-self/ns/net", "rb") as old:
            if libc.setns(new.fileno(), _CLONE_NEWNET) != 0:
                raise TestbedError(f"setns {ns}: {os.strerror(ctypes.get_errno())}")
            try:
                yield
            finally:
                libc.setns(old.fileno(), _CLONE_NEWNET)


#: contrib/nginx of the checkout this runs from (not in an installed wheel).
CONTRIB_NGINX = Path(__file__).resolve().parents[2] / "contrib" / "nginx"


def nginx_conf(state: Path, server_extra: str = "", http_extra: str = "") -> Path | None:
    """Write the test bed's nginx.conf (with contrib/nginx's files, the API
    socket in ``state``); None where nginx or those files are missing."""
    if shutil.which("nginx") is None or not (CONTRIB_NGINX / "nat64ho.conf").exists():
        return None
    # The installed unit's socket path, swapped for the test bed's own.
    http_conf = (CONTRIB_NGINX / "nat64ho.conf").read_text()
    (state / "nat64ho.conf").write_text(
        http_conf.replace("/run/nat64ho/api.sock", str(state / "api.sock"))
    )
    www = state / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text("Hello from nginx on the IPv4 host.\n")
    (state / "nginx-tmp").mkdir(exist_ok=True)
    conf = state / "nginx.conf"
    conf.write_text(
        f"""daemon off;
user root;  # the test bed's files and API socket are root's
worker_processes 1;
pid {state}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {state}/nginx-tmp;
    proxy_temp_path {state}/nginx-tmp;
    fastcgi_temp_path {state}/nginx-tmp;
    uwsgi_temp_path {state}/nginx-tmp;
    scgi_temp_path {state}/nginx-tmp;
    include {state}/nat64ho.conf;
    access_log {state}/nginx-access.log nat64ho;
    {http_extra}
    server {{
        listen {HOST4}:{NGINX_PORT};
        include {CONTRIB_NGINX}/nat64ho-server.conf;
        root {www};
        location / {{ }}
        {server_extra}
    }}
}}
"""
    )
    return conf


def up(name: str, state: Path) -> Testbed:
    """Build the test bed and start the server, the services and the gateway,
    detached; :func:`down` stops them."""
    tb = Testbed(name, state)
    tb.create()
    try:
        tb.serve("--hello-rate", "0", detach=True)
        tb.services(detach=True)
        tb.gateway("--touch-interval", "1", detach=True)
        tb.with_nginx = tb.nginx(detach=True) is not None
    except BaseException:
        tb.destroy()
        raise
    return tb


def down(name: str, state: Path) -> bool:
    """Stop everything in the test bed and delete it; False if there was none."""
    tb = Testbed(name, state)
    if not tb.exists():
        return False
    tb.destroy()
    return True

"""contrib/keepalived: the configuration passes keepalived's own check, the
track script passes shellcheck, and the script says "active" exactly when
this host's nat64ho serves (a standby that waits for the table does not), and
a server bound to the VIP answers from it where one bound to 0.0.0.0 does not."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import serve_args, wait_for

KEEPALIVED = Path(__file__).resolve().parent.parent / "contrib/keepalived"
CONF = KEEPALIVED / "keepalived.conf"
CHECK = KEEPALIVED / "nat64ho-vrrp-check"
INSTALLED = "/usr/local/bin/nat64ho-vrrp-check"

needs_keepalived = pytest.mark.skipif(
    shutil.which("keepalived") is None, reason="keepalived is not installed"
)


def config_test(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    conf = tmp_path / "keepalived.conf"
    conf.write_text(text)
    return subprocess.run(
        ["keepalived", "--config-test", "-f", str(conf)], capture_output=True, text=True, timeout=30
    )


@needs_keepalived
def test_the_configuration_passes_keepalived_config_test(tmp_path):
    # The script where this checkout has it: keepalived refuses a missing one.
    text = CONF.read_text()
    assert INSTALLED in text
    r = config_test(text.replace(INSTALLED, str(CHECK)), tmp_path)
    assert r.returncode == 0, r.stderr
    # ... and the check is one that can fail.
    broken = config_test(
        text.replace(INSTALLED, str(CHECK)).replace("weight 50", "wieght 50"), tmp_path
    )
    assert broken.returncode != 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_check_script_is_shellcheck_clean():
    r = subprocess.run(["shellcheck", str(CHECK)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout


def check(port: int | str) -> int:
    return subprocess.run([str(CHECK), str(port)], capture_output=True, timeout=10).returncode


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
def test_the_script_follows_the_active_server_not_the_standby(tmp_path, pg_url, procs):
    assert check("x1") == 2
    port_a, port_b = free_port(), free_port()
    assert check(port_a) == 1
    # The last --listen counts.
    a = procs(*serve_args(pg_url, tmp_path / "a.log", "--listen", f"127.0.0.1:{port_a}"))
    a.port()
    b = procs(
        *serve_args(pg_url, tmp_path / "b.log", "--standby", "--listen", f"127.0.0.1:{port_b}")
    )
    b.wait_line("standby: owned by")
    assert (check(port_a), check(port_b)) == (0, 1)
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(30) == 0
    b.port()
    assert (check(port_a), check(port_b)) == (1, 0)


def _ns(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("ss") is None,
    reason="needs root, ip and ss (network namespaces)",
)
def test_a_server_on_the_vip_answers_from_it_and_one_on_any_address_does_not(tmp_path):
    # Two namespaces on one link: the server's host (its own address .1,
    # the VIP .64 added later, as keepalived does) and a NAT64 (.2).
    tag = f"n64vip{os.getpid() % 100000}"
    srv, nat = f"{tag}s", f"{tag}c"
    vip = "10.64.0.64"
    servers: list[subprocess.Popen] = []

    def serve(listen: str) -> subprocess.Popen:
        p = subprocess.Popen(
            ["ip", "netns", "exec", srv, sys.executable, "-m", "nat64ho"]
            + serve_args(tmp_path / "t.db", tmp_path / "t.log", "--listen", listen),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        servers.append(p)
        wait_for(lambda: in_ns(srv, str(CHECK), "6464") == 0, timeout=20)
        return p

    def probe() -> int:
        return in_ns(nat, sys.executable, "-m", "nat64ho", "probe", vip, "--timeout", "1")

    try:
        _ns("ip", "netns", "add", srv)
        _ns("ip", "netns", "add", nat)
        _ns(
            "ip",
            "link",
            "add",
            f"{tag}a",
            "netns",
            srv,
            "type",
            "veth",
            "peer",
            "name",
            f"{tag}b",
            "netns",
            nat,
        )
        _ns("ip", "-n", srv, "addr", "add", "10.64.0.1/24", "dev", f"{tag}a")
        _ns("ip", "-n", nat, "addr", "add", "10.64.0.2/24", "dev", f"{tag}b")
        for ns, dev in ((srv, f"{tag}a"), (nat, f"{tag}b")):
            _ns("ip", "-n", ns, "link", "set", dev, "up")
            _ns("ip", "-n", ns, "link", "set", "lo", "up")
        _ns("ip", "netns", "exec", srv, "sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1")
        # Bound to the VIP before this host holds it: the check says active
        # (keepalived then brings the VIP here) ...
        first = serve(f"{vip}:6464")
        _ns("ip", "-n", srv, "addr", "add", f"{vip}/24", "dev", f"{tag}a")
        # ... and once it is here, the NAT64 gets its answers from it.
        assert probe() == 0
        first.terminate()
        assert first.wait(30) == 0
        # Bound to any address, the answers leave from 10.64.0.1: not taken.
        serve("0.0.0.0:6464")
        assert probe() == 1
    finally:
        for p in servers:
            p.kill()
            p.wait(30)
        for ns in (srv, nat):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def in_ns(ns: str, *cmd: str) -> int:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], capture_output=True, timeout=30
    ).returncode

"""contrib/keepalived: the configuration passes keepalived's own check, the
track script passes shellcheck, and the script says "active" exactly when
this host's nat64ho serves (a standby that waits for the table does not)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers import serve_args

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

"""``nat64ho testbed up|down`` as docs/testbed.md tells a newcomer to use it, and the
gateway's answers to bad command lines."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from nat64ho.gateway import testbed as tb
from tests.helpers import nat64ho


@pytest.mark.slow
@pytest.mark.skipif(tb.available() is not None, reason=f"the test bed {tb.available()}")
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_up_curl_who_down(tmp_path):
    name = f"readme{os.getpid() % 100000}"
    state = tmp_path / "state"
    try:
        up = nat64ho("testbed", "up", "--name", name, "--state", str(state), timeout=120)
        assert up.returncode == 0, up.stderr
        assert f"ip netns exec {name}-client curl" in up.stdout
        again = nat64ho("testbed", "up", "--name", name, "--state", str(state), timeout=120)
        assert again.returncode == 1
        assert again.stderr.startswith(f"Error: test bed {name!r} exists")

        curl = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                f"{name}-client",
                "curl",
                "-sS",
                "-m",
                "20",
                "-w",
                " local %{local_port}",
                "http://[64:ff9b::192.0.2.1]:8080/",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert curl.returncode == 0, curl.stderr
        port = re.search(r"You came from 192\.0\.2\.9:(\d+)\.", curl.stdout).group(1)
        local = curl.stdout.rsplit(" local ", 1)[1]
        log = (state / "services.out").read_text()
        assert f'http 192.0.2.9:{port} "GET / HTTP/1.1" 200' in log
        who = nat64ho("who", "--db", str(state / "table.db"), f"192.0.2.9:{port}")
        assert who.returncode == 0, who.stderr
        assert who.stdout.startswith(f"192.0.2.9:{port} at ")
        assert who.stdout.splitlines()[0].endswith(f": [2001:db8:1::10]:{local}")
        if shutil.which("nginx") is not None:
            # nginx on port 80 of the host, with contrib/nginx: its access
            # log names the client, not the NAT64.
            page = subprocess.run(
                ["ip", "netns", "exec", f"{name}-client", "curl", "-sS", "-m", "20",
                 "http://[64:ff9b::192.0.2.1]/"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert page.stdout == "Hello from nginx on the IPv4 host.\n", page.stderr
            line = (state / "nginx-access.log").read_text().splitlines()[-1]
            assert line.startswith("2001:db8:1::10 - - ["), line
            assert '"GET / HTTP/1.1" 200 ' in line and " via 192.0.2.9:" in line
    finally:
        down = nat64ho("testbed", "down", "--name", name, "--state", str(state), timeout=120)
    assert down.returncode == 0, down.stderr
    assert down.stdout == f"Test bed {name!r} removed.\n"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in listed
    gone = nat64ho("testbed", "down", "--name", name, timeout=120)
    assert gone.stdout == f"Test bed {name!r} was not up.\n"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pool", "192.0.2.300"], "Error: --pool '192.0.2.300': not an IPv4 address"),
        (["--prefix", "64:ff9b::/64"], "Error: --prefix '64:ff9b::/64': expected an IPv6 /96"),
        (["--prefix", "nonsense/96"], "Error: --prefix 'nonsense/96': not an IPv6 prefix"),
        (["--server", "192.0.2.1"], "Error: --server '192.0.2.1': expected ADDR:PORT"),
        (
            ["--server", "[2001:db8::1]:6464"],
            "Error: --server '[2001:db8::1]:6464': expected IPV4:PORT",
        ),
        (["--handoff-port", "70000"], "Error: --handoff-port '70000': not a port number"),
        (
            ["--tun", "a-name-far-too-long"],
            "Error: --tun 'a-name-far-too-long': not an interface name",
        ),
    ],
)
def test_gateway_bad_values_exit_2_with_one_error_line(args, message):
    base = {"--tun": "nat64", "--pool": "192.0.2.9", "--server": "192.0.2.1:6464"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    p = nat64ho("gateway", *[x for kv in base.items() for x in kv], timeout=60)
    assert p.returncode == 2
    assert p.stderr.startswith(message) and p.stderr.count("\n") == 1, p.stderr


def test_testbed_bad_name_exit_2():
    p = nat64ho("testbed", "up", "--name", "Has Space", timeout=60)
    assert p.returncode == 2
    assert p.stderr == "Error: --name 'Has Space': use 1-21 characters of a-z, 0-9 and '-'\n"

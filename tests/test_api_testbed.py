"""The attribution API and nginx with contrib/nginx, over real TCP through
``nat64ho gateway`` in the namespace test bed: the host's applications learn
the IPv6 client of every connection from the NAT64."""

from __future__ import annotations

import re
import shutil
import socket
import threading

import pytest

from nat64ho import client
from nat64ho.gateway import testbed as tb
from tests.test_gateway_e2e import HOST6, bed  # noqa: F401  (the fixture)

pytestmark = [
    pytest.mark.skipif(tb.available() is not None, reason=f"the test bed {tb.available()}"),
    pytest.mark.slow,
]

needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None or shutil.which("curl") is None, reason="needs nginx and curl"
)
#: A service of this test on the IPv4 host.
PROBE_PORT = 9099


def test_a_connection_just_accepted_is_always_found(bed):  # noqa: F811
    """The host asks the API the instant it accepts each connection, before
    reading a byte: the NAT64 had its port only after the commit, so the
    entry is always there, naming the client's own address and port."""
    bed.serve()
    bed.gateway()
    sources = [tb.CLIENT6, *bed.add_clients(3)]
    count = 24
    seen: list[tuple[tuple[str, int], client.Holder | None]] = []
    with bed.inside(bed.host):
        listener = socket.create_server((tb.HOST4, PROBE_PORT))

    def accept() -> None:
        for _ in range(count):
            conn, peer = listener.accept()
            seen.append((peer, client.lookup(peer[0], peer[1], api=f"unix:{bed.api}")))
            conn.close()

    t = threading.Thread(target=accept)
    t.start()
    mine = []
    try:
        for i in range(count):
            with bed.inside(bed.client):
                s = socket.socket(socket.AF_INET6)
                s.bind((sources[i % len(sources)], 0))
                s.settimeout(15)
                s.connect((HOST6, PROBE_PORT))
            mine.append(s.getsockname()[:2])
            s.recv(1)  # until the host closed it
            s.close()
    finally:
        t.join(30)
        listener.close()
    assert len(seen) == count
    for (peer, holder), (addr, port) in zip(seen, mine, strict=True):
        assert peer[0] == tb.POOL
        assert holder is not None and (holder.address, holder.port) == (addr, port)


def curl(testbed: tb.Testbed, path: str = "/", source: str = tb.CLIENT6) -> str:
    p = testbed.run(
        testbed.client,
        "curl", "-sS", "-m", "20", "--interface", source, "-o", "/dev/null",
        "-w", "%{http_code} %{local_port}", f"http://[{HOST6}]:{tb.NGINX_PORT}{path}",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return p.stdout


@needs_nginx
def test_nginx_logs_the_client_and_fails_open(bed):  # noqa: F811
    serve = bed.serve()
    bed.gateway()
    bed.nginx()
    status, port = curl(bed).split()
    assert status == "200"
    line = bed.nginx_log.read_text().splitlines()[-1]
    assert re.match(rf"{re.escape(tb.CLIENT6)} - - \[.*\] \"GET / HTTP/1.1\" 200 ", line), line
    assert re.search(rf" via {re.escape(tb.POOL)}:\d+$", line), line
    # The API gone (the server restarted without it; the handoff goes on):
    # nginx still serves, and logs the NAT64's address.
    serve.stop()
    bed.serve(api=False)
    status, _ = curl(bed).split()
    assert status == "200"
    line = bed.nginx_log.read_text().splitlines()[-1]
    assert line.startswith(f"{tb.POOL} - - ["), line


LIMITED = """
    location = /limited {
        # limit_req runs before auth_request in nginx's phases: limit in a
        # named location reached after the lookup (docs/api.md).
        try_files /.none @limited;
    }
    location @limited {
        auth_request off;
        limit_req zone=perclient;
        try_files /index.html =404;
    }
"""


@needs_nginx
def test_limit_req_keyed_by_the_real_client(bed):  # noqa: F811
    """Two IPv6 clients behind one NAT64: the one that comes back too soon
    is limited, the other is not, though nginx sees one address for both."""
    bed.serve()
    bed.gateway()
    bed.nginx(
        server_extra=LIMITED,
        http_extra="limit_req_zone $nat64ho_client zone=perclient:1m rate=1r/m;",
    )
    other = bed.add_clients(1)[0]
    assert curl(bed, "/limited").split()[0] == "200"
    assert curl(bed, "/limited").split()[0] == "503"  # a second one within the minute
    assert curl(bed, "/limited", source=other).split()[0] == "200"
    clients = [ln.split()[0] for ln in bed.nginx_log.read_text().splitlines()]
    assert clients == [tb.CLIENT6, tb.CLIENT6, other]

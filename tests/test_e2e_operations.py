"""End to end: what an operator watches — Prometheus metrics, systemd
notifications, and SIGHUP reopening the log under logrotate."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nat64ho.core import wire
from nat64ho.testing import proc_tree
from tests.helpers import connect, mappings, run, v6, wait_for


def scrape(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}, text


def test_metrics_follow_traffic(server_factory):
    srv = server_factory("--ports", "1028-1031", "--metrics", "127.0.0.1:0")
    m = wait_for(lambda: re.search(r"metrics on (http://\S+)", srv.stderr))
    url = m.group(1)

    async def go():
        c = await connect(srv)
        for i in range(6):  # 4 ports: two evictions
            await c.map(v6(i), 1)
        await c.exchange([wire.Lookup(1028), wire.Touch((1029,))], answers=1)
        c.send_raw(b"\xff\xff")
        c.send_raw(b"\x33\x01")
        await c.quiet(0.3)
        c.close()

    run(go())
    families, text = scrape(url)

    def value(name, **labels):
        for s in families[name]:
            if s.name.endswith("_total") or s.name == name or s.name.endswith(("_count",)):
                if all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        raise KeyError(name, labels)

    assert value("nat64ho_entries_created") == 6
    assert value("nat64ho_entries_deleted") == 2
    assert value("nat64ho_datagrams_dropped", reason="reserved_group") == 1
    assert value("nat64ho_datagrams_dropped", reason="truncated") == 1
    assert value("nat64ho_messages", type="map") == 6
    assert value("nat64ho_messages", type="hello") == 1
    assert value("nat64ho_table_entries", nat64="127.0.0.1") == 4
    assert value("nat64ho_table_capacity", nat64="127.0.0.1") == 4
    assert value("nat64ho_nat64s") == 1
    assert value("nat64ho_initialized") == 1
    assert value("nat64ho_commits") >= 1 and value("nat64ho_commit_failures") == 0
    assert value("nat64ho_datagrams_received") >= 10
    assert any(
        s.name == "nat64ho_commit_seconds_bucket" for s in families["nat64ho_commit_seconds"]
    )
    # No label carries a client's IPv6 address or port.
    assert "2001:db8" not in text
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, text=True, capture_output=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
    assert srv.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_systemd_notify_ready_watchdog_stopping(server_factory, tmp_path, workers):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    try:
        srv = server_factory(
            "--workers", workers, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
        )
        got = []
        while not any(m.startswith("READY=1") for m in got):
            got.append(sock.recv(4096).decode())
        ready = next(m for m in got if m.startswith("READY=1"))
        assert f"127.0.0.1:{srv.port}" in ready
        watchdogs = 0
        while watchdogs < 3:
            if sock.recv(4096).decode() == "WATCHDOG=1":
                watchdogs += 1
        srv.proc.send_signal(signal.SIGTERM)
        while sock.recv(4096).decode() != "STOPPING=1":
            pass
        assert srv.proc.wait(20) == 0
    finally:
        sock.close()


async def _until(predicate, timeout: float = 10.0) -> None:
    """Serve the event loop until ``predicate()``; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def _notes(sock: socket.socket) -> list[str]:
    """The notifications waiting on ``sock``, without waiting for more."""
    got = []
    while True:
        try:
            got.append(sock.recv(4096, socket.MSG_DONTWAIT).decode())
        except BlockingIOError:
            return got


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_writer_that_stops_committing_stops_the_watchdog_until_it_resumes(
    server_factory, tmp_path, workers
):
    # WATCHDOG_USEC 2 s: keep-alives every second, and a commit unanswered
    # for over a second (serve.stall_bound) stops them.
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"}
    srv = server_factory("--workers", workers, env=env)
    stall = "has not returned for"
    [writer] = [
        p
        for p in proc_tree(srv.proc.pid)
        if b"nat64ho.storage.writer" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]

    async def go() -> list:
        c = await connect(srv)
        wait_for(lambda: "WATCHDOG=1" in _notes(sock))
        os.kill(writer, signal.SIGSTOP)
        try:
            c.send([wire.Map(v6(i), 7) for i in range(8)])  # their commit hangs
            await _until(lambda: stall in srv.stderr)
            _notes(sock)  # what was sent before the line
            await asyncio.sleep(2.5)  # two keep-alive intervals and more
            assert "WATCHDOG=1" not in _notes(sock)
        finally:
            os.kill(writer, signal.SIGCONT)
        answers = await c.collect(8, timeout=10)
        c.close()
        return answers

    try:
        answers = run(go())
        assert len(mappings(answers)) == 8  # answered once committed, nothing lost
        wait_for(lambda: "WATCHDOG=1" in _notes(sock), timeout=10)
        wait_for(lambda: "watchdog keep-alives resume" in srv.stderr)
        assert srv.stderr.count(stall) == 1, srv.stderr
        assert srv.stop() == 0
    finally:
        sock.close()


def test_a_worker_whose_event_loop_stops_stops_the_watchdog(server_factory, tmp_path):
    # The parent alone speaks to systemd: a worker that no longer beats (its
    # loop hung; here stopped) stops the keep-alives, with one line.
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"}
    srv = server_factory("--workers", "2", env=env)
    [worker] = [
        p for p in proc_tree(srv.proc.pid) if Path(f"/proc/{p}/comm").read_text() == "nat64ho-w1\n"
    ]
    try:
        # A worker counts once it has beaten: it starts right after this line.
        wait_for(lambda: "[worker 1]: INFO: listening on" in srv.stderr)
        time.sleep(0.5)  # two of its beats
        wait_for(lambda: "WATCHDOG=1" in _notes(sock))
        os.kill(worker, signal.SIGSTOP)
        try:
            wait_for(lambda: "worker 1 silent for over 1 s" in srv.stderr)
            _notes(sock)
            time.sleep(2.5)
            assert "WATCHDOG=1" not in _notes(sock)
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_for(lambda: "WATCHDOG=1" in _notes(sock))
        assert srv.stderr.count("silent for over") == 1, srv.stderr
        assert srv.stop() == 0
    finally:
        sock.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_reopens_the_log_and_loses_no_line(server_factory, workers):
    srv = server_factory("--workers", workers)
    rotated = srv.log.with_name("events.log.1")

    async def go():
        c = await connect(srv)
        for i in range(50):
            await c.map(v6(i), 1)
        srv.log.rename(rotated)  # what logrotate's "create" does first
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: srv.log.exists())
        for i in range(50, 100):
            await c.map(v6(i), 1)
        c.close()

    run(go())
    assert srv.stop() == 0
    old, new = rotated.read_text().splitlines(), srv.log.read_text().splitlines()
    created = [line for line in old + new if " Created " in line]
    assert len(created) == 100
    assert len(new) == 50 and all(" Created " in line for line in new)


def test_a_reopen_that_runs_out_of_descriptors_keeps_the_old_file_and_retries(server_factory):
    # What logrotate's SIGHUP met when a flood of connections had taken every
    # descriptor: the soft limit is lowered to 0 for the server process, so
    # no open() can succeed until it is raised again.
    import resource

    srv = server_factory()
    rotated = srv.log.with_name("events.log.1")
    limits = resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE)
    failed = "cannot reopen log file"

    async def go():
        c = await connect(srv)
        for i in range(10):
            await c.map(v6(i), 1)
        srv.log.rename(rotated)
        resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE, (0, limits[1]))
        try:
            srv.proc.send_signal(signal.SIGHUP)
            await _until(lambda: failed in srv.stderr)
            for i in range(10, 20):  # answered, and logged to the old file
                await c.map(v6(i), 1)
            srv.proc.send_signal(signal.SIGHUP)  # fails again, said once
            await asyncio.sleep(2.5)  # and two periodic tries
            assert not srv.log.exists()
        finally:
            resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE, limits)
        await _until(srv.log.exists)  # the next periodic try, with no SIGHUP
        for i in range(20, 30):
            await c.map(v6(i), 1)
        c.close()

    run(go())
    assert srv.stop() == 0
    assert srv.stderr.count(failed) == 1, srv.stderr
    assert "EMFILE" in srv.stderr or "Too many open files" in srv.stderr
    assert "Traceback" not in srv.stderr
    old, new = rotated.read_text().splitlines(), srv.log.read_text().splitlines()
    assert sum(" Created " in line for line in old) == 20
    assert len(new) == 10 and all(" Created " in line for line in new)


#: SO_RCVBUFFORCE (<asm-generic/socket.h>): as root, past net.core.rmem_max.
SO_RCVBUFFORCE = 33


def test_the_receive_buffer_line_says_what_the_kernel_granted():
    from nat64ho.daemon.serve import RCVBUF, rcvbuf_line

    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as small:
        small.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        level, line = rcvbuf_line(small)
    assert level == logging.WARNING
    assert line.startswith("UDP receive buffer 128 KiB (SO_RCVBUF), not the 4096 KiB asked for")
    assert f"net.core.rmem_max is {rmem_max}," in line
    assert f"set net.core.rmem_max to {RCVBUF} or more" in line
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as full:
        full.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)  # tests run as root
        assert rcvbuf_line(full) == (
            logging.INFO,
            "UDP receive buffer 8192 KiB (SO_RCVBUF), as asked",
        )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_server_says_once_what_receive_buffer_it_got(server_factory, workers):
    from nat64ho.daemon.serve import RCVBUF

    srv = server_factory("--workers", workers)
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    wait_for(lambda: "UDP receive buffer" in srv.stderr)
    assert srv.stop() == 0
    lines = [line for line in srv.stderr.splitlines() if "UDP receive buffer" in line]
    assert len(lines) == 1, srv.stderr
    # As this host's kernel allows: the full buffer, or the cut said.
    if rmem_max >= RCVBUF:
        assert lines[0].endswith("UDP receive buffer 8192 KiB (SO_RCVBUF), as asked")
    else:
        assert f"UDP receive buffer {2 * rmem_max // 1024} KiB" in lines[0]
        assert f"net.core.rmem_max is {rmem_max}" in lines[0]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--listen", "nowhere"], "Error: --listen 'nowhere': expected ADDR:PORT"),
        (["--ports", "9-3"], "Error: --ports '9-3': first port is above last port"),
        (["--allow", "300.1.1.1/8"], "Error: --allow '300.1.1.1/8': not an IPv4 address or prefix"),
        (["--sync", "sometimes"], "Error: --sync 'sometimes': expected 'full' or 'normal'"),
        (["--metrics", "localhost"], "Error: --metrics 'localhost': expected ADDR:PORT"),
    ],
)
def test_serve_rejects_bad_options_in_one_line(tmp_path, args, message):
    import sys

    db = tmp_path / "never.db"
    r = subprocess.run(
        [sys.executable, "-m", "nat64ho", "serve", "--db", str(db), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == [r.stderr.splitlines()[0]] and r.stderr.startswith(message)
    assert not db.exists()


def test_port_in_use_is_a_clear_error(tmp_path):
    import sys

    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        start = time.monotonic()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "nat64ho",
                "serve",
                "--db",
                str(tmp_path / "x.db"),
                "--listen",
                f"127.0.0.1:{port}",
                "--log-file",
                str(tmp_path / "l"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.close()
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert re.search(rf"^Error: cannot listen on 127\.0\.0\.1:{port}: .*in use", r.stderr, re.M), (
        r.stderr
    )
    assert time.monotonic() - start < 30


def test_settings_from_the_environment(server_factory):
    # What the systemd unit's EnvironmentFile sets; empty means unset.
    srv = server_factory(env={"NAT64HO_ALLOW": "10.0.0.0/8 192.0.2.0/24", "NAT64HO_METRICS": ""})
    assert "metrics on" not in srv.stderr

    async def go():
        c = await connect(srv, hello=False)
        c.send_raw(c.peer.hello())
        assert await c.collect(1) == [wire.Error(wire.ErrorCode.NOT_ALLOWED, 0x31)]
        c.close()

    run(go())


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
def test_real_logrotate_under_a_running_server_loses_no_line(server_factory, tmp_path):
    from tests.test_contrib import local_config

    logs = tmp_path / "logs"
    pidfile = tmp_path / "pid"
    conf = local_config(tmp_path, f"kill -HUP $(cat {pidfile})")
    srv = server_factory(log=logs / "nat64ho.log")
    pidfile.write_text(str(srv.proc.pid))

    async def go():
        c = await connect(srv)
        for i in range(300):
            c.send([wire.Map(v6(i), 1)])
            if i == 150:
                # Rotate while MAPs are in flight, as cron would.
                subprocess.run(
                    ["logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
                    check=True,
                    capture_output=True,
                )
            await asyncio.sleep(0.002)
        await c.collect(300, timeout=5)
        c.close()

    run(go())
    assert srv.stop() == 0
    lines = []
    for f in sorted(logs.iterdir()):
        lines += f.read_text().splitlines()
    created = {line.split()[4] for line in lines if " Created " in line}
    assert len(created) == 300
    assert (logs / "nat64ho.log.1").exists()

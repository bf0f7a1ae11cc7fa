"""Operator commands against live things: a progress bar on a real
pseudo-terminal (and none on a pipe), Ctrl-C of long work, ``export
--follow`` beside a real server that restarts, and ``probe``."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import ipaddress
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from tests.helpers import Follower, connect, db_rows, is_postgres, run, v6

PY = [sys.executable, "-m", "nat64ho"]
BASE = int(ipaddress.IPv6Address("2001:db8::"))


def log_lines(n: int, start_s: int = 1_552_903_588) -> str:
    """``n`` Created lines, one per second, over distinct ports and clients."""
    import datetime as dt

    out = []
    for i in range(n):
        when = dt.datetime.fromtimestamp(start_s + i, dt.UTC)
        out.append(
            f"{when:%Y-%m-%d %H:%M:%S}.{i % 1_000_000:06d} Created "
            f"192.0.2.{i // 60000 + 1}:{1028 + i % 60000} "
            f"[{ipaddress.IPv6Address(BASE + i + 1)}]:{1024 + i % 50000}\n"
        )
    return "".join(out)


def in_pty(
    args: list[str],
    *,
    stop_when: str | None = None,
    sig: int | None = None,
    then=None,
    timeout: float = 240.0,
    stdin: int = subprocess.DEVNULL,
) -> tuple[int, str]:
    """Run ``nat64ho args`` with stderr on a real pseudo-terminal (stdout a
    pipe); optionally send ``sig`` once the terminal shows ``stop_when``.
    Returns the exit status and everything the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(PY + args, stdin=stdin, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    sent = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the last writer closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            if (
                sig is not None
                and not sent
                and stop_when
                and re.search(stop_when, seen.decode("utf-8", "replace"))
            ):
                proc.send_signal(sig)
                sent = True
                if then is not None:
                    threading.Timer(0.5, then).start()
            if proc.poll() is not None and not ready:
                break
        status = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    if sig is not None:
        assert sent, seen
    return status, seen.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def big_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("logs") / "big.log"
    path.write_text(log_lines(120_000))
    return path


# ---------------------------------------------------------------- progress


def test_import_export_prune_show_a_bar_on_a_terminal_only(tmp_path, big_log, db_target):
    small = tmp_path / "small.log"
    small.write_text(log_lines(30_000))
    db = db_target
    status, screen = in_pty(["import", str(small), "--rebuild-table", "--db", str(db)])
    assert status == 0, screen
    assert re.search(r"\d+%", screen) and re.search(r"[\d,]+ lines\s+[\d,]+ lines/s", screen), (
        screen
    )
    assert "30000 lines read, 30000 events added" in screen and "Traceback" not in screen
    assert "import, now rebuilding the table" in screen, screen
    assert "30000 entries added to the table" in screen

    status, screen = in_pty(["export", "--db", str(db), "-o", str(tmp_path / "out.log")])
    assert status == 0 and re.search(r"\d+%", screen) and "events/s" in screen, screen
    assert "30000 events written" in screen
    assert (tmp_path / "out.log").read_text() == small.read_text()

    status, screen = in_pty(["prune", "--yes", "--db", str(db), "--before", "2019-03-18 12:00"])
    assert status == 0 and re.search(r"\d+%", screen) and "events/s" in screen, screen

    # The same commands on pipes: only their one summary line.
    r = subprocess.run(
        PY + ["import", str(small), "--db", str(db)], capture_output=True, text=True, timeout=240
    )
    assert r.stderr == "30000 lines read, 6812 events added, 23188 already present, 0 skipped\n"
    r = subprocess.run(
        PY + ["export", "--db", str(db), "-o", str(tmp_path / "o2.log")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert (r.stdout, r.stderr) == ("", f"30000 events written to {tmp_path / 'o2.log'}\n")
    r = subprocess.run(
        PY + ["prune", "--yes", "--db", str(db), "--before", "2019-03-18 12:00"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert (r.stdout, r.stderr) == (
        "6812 history events before 2019-03-18 12:00:00.000000 deleted\n",
        "",
    )


def test_ctrl_c_of_import_says_how_far_and_rerunning_finishes(big_log, db_target):
    # The import reads half the log from a pipe whose other half is held
    # back until the command has ended: however fast it imports, Ctrl-C
    # lands mid-way.
    db = db_target
    lines = big_log.read_bytes().splitlines(keepends=True)
    read_end, write_end = os.pipe()

    def first_half() -> None:
        data = memoryview(b"".join(lines[:60_000]))
        with contextlib.suppress(BrokenPipeError):  # the import ended first
            while data:
                data = data[os.write(write_end, data) :]

    feeder = threading.Thread(target=first_half, daemon=True)
    feeder.start()
    try:
        status, screen = in_pty(
            ["import", "-", "--db", str(db)],
            stop_when=r"\b[2-9]\d,\d{3} lines ",
            sig=signal.SIGINT,
            stdin=read_end,
        )
    finally:
        os.close(read_end)  # a write still blocked fails with EPIPE
        feeder.join(10)
        os.close(write_end)
    assert status == 130, screen
    assert "Traceback" not in screen and "KeyboardInterrupt" not in screen
    m = re.search(
        r"Interrupted: (\d+) lines read and (\d+) events added so far .*run the "
        r"same command again to finish",
        " ".join(screen.split()),
    )
    assert m, screen
    [(kept,)] = db_rows(db, "SELECT count(*) FROM event")
    assert 0 < kept <= 60_000 and kept >= int(m.group(2))
    r = subprocess.run(
        PY + ["import", str(big_log), "--db", str(db)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == (
        f"120000 lines read, {120_000 - kept} events added, {kept} already present, 0 skipped\n"
    )


@pytest.mark.parametrize("sealed", [False, True], ids=["hot", "sealed"])
def test_ctrl_c_of_export_names_the_sequence_to_resume_after(tmp_path, big_log, db_target, sealed):
    db = db_target
    assert (
        subprocess.run(
            PY + ["import", str(big_log), "--db", str(db)], capture_output=True, timeout=300
        ).returncode
        == 0
    )
    if sealed:  # hourly segments: the export writes them a block at a time
        r = subprocess.run(
            PY + ["seal", "--db", str(db), "--period", "3600"], capture_output=True, timeout=300
        )
        assert r.returncode == 0 and db_rows(db, "SELECT count(*) FROM segment")[0][0] > 20
    # The export writes into a FIFO that is read only in part until the
    # interrupt has landed: the command is mid-way when Ctrl-C comes.
    fifo = tmp_path / "part.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    release = threading.Event()

    def reader():
        with open(fifo, "rb") as f:
            got.append(f.read(65536))
            release.wait(120)
            got.append(f.read())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    status, screen = in_pty(
        ["export", "--db", str(db), "-o", str(fifo)],
        stop_when=r"[1-9][\d,]* events ",
        sig=signal.SIGINT,
        then=release.set,
    )
    t.join(60)
    assert status == 130 and "Traceback" not in screen, screen
    m = re.search(
        r"(\d+) events written to \S+, the last one seq (\d+) at .* run the same "
        r"command with --after (\d+)",
        " ".join(screen.split()),
    )
    assert m and m.group(2) == m.group(3), screen
    part = b"".join(got).decode()
    assert 0 < len(part.splitlines()) == int(m.group(1)) == int(m.group(2)) < 120_000
    r = subprocess.run(
        PY + ["export", "--db", str(db), "--after", m.group(2)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0
    # The interrupted part and the rest are the whole history, once each.
    assert part + r.stdout == big_log.read_text()


# ---------------------------------------------------------------- export --follow


def last_seq(db) -> int:
    return db_rows(db, "SELECT max(id) FROM event")[0][0]


async def make_events(server, n: int, first: int) -> None:
    c = await connect(server)
    for i in range(first, first + n):
        answers = await c.map(v6(i), 4000)
        assert answers, "no MAPPING"
    c.close()


def test_follow_loses_nothing_across_a_kill_and_a_server_restart(server_factory, db_target):
    server = server_factory(db=db_target)
    run(make_events(server, 5, 0))  # Initialized + 5 Created
    first = Follower(server.db)
    got = first.take_until(last_seq(server.db))
    run(make_events(server, 20, 100))  # more while following
    got += first.take_until(last_seq(server.db))
    first.proc.kill()  # no chance to say goodbye
    first.proc.wait(10)
    last = got[-1]["seq"]
    run(make_events(server, 10, 200))  # while nobody follows
    server.restart()
    run(make_events(server, 10, 300))  # a new boot: Initialized + 10 Created
    second = Follower(server.db, "--after", str(last))
    got += second.take_until(last_seq(server.db))
    run(make_events(server, 5, 400))
    got += second.take_until(last_seq(server.db))
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(20) == 0
    err = second.proc.stderr.read()
    assert err == f"stopped after seq {got[-1]['seq']}; resume with --after {got[-1]['seq']}\n"
    assert second.lines.empty()
    # Every event once, in order, exactly as a plain export gives it.
    export = subprocess.run(
        PY + ["export", "--format", "jsonl", "--db", str(server.db)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert got == [json.loads(x) for x in export.splitlines()]
    seqs = [e["seq"] for e in got]
    if is_postgres(db_target):
        # A sequence may skip values (a rolled-back insert keeps its id).
        assert seqs == sorted(set(seqs))
    else:
        assert seqs == list(range(1, len(got) + 1))
    # Each make_events is a new NAT64 boot: five Initialized, two before the kill.
    assert [e["event"] for e in got].count("Initialized") == 5


def test_follow_in_log_format_and_sigint(server_factory, db_target):
    server = server_factory(db=db_target)
    run(make_events(server, 3, 0))
    proc = subprocess.Popen(
        PY + ["export", "--follow", "--db", str(server.db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = [proc.stdout.readline() for _ in range(4)]
    assert lines == server.log.read_text().splitlines(True)[:4]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 130
    assert proc.stderr.read() == "stopped after seq 4; resume with --after 4\n"


def test_follow_in_csv_carries_the_seq_it_resumes_from(server_factory):
    server = server_factory()
    run(make_events(server, 3, 0))
    proc = subprocess.Popen(
        PY + ["export", "--follow", "--format", "csv", "--db", str(server.db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rows = list(csv.DictReader(proc.stdout.readline() for _ in range(5)))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert [r["seq"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["event"] for r in rows] == ["Initialized", "Created", "Created", "Created"]
    assert proc.stderr.read() == f"stopped after seq {rows[-1]['seq']}; resume with --after 4\n"


# ---------------------------------------------------------------- probe


def test_probe_hello_confirm_map_lookup_touch(server_factory):
    server = server_factory("--ports", "1028-1031")
    r = subprocess.run(
        PY
        + [
            "probe",
            f"127.0.0.1:{server.port}",
            "--source",
            "127.0.0.3",
            "--map",
            "[2001:db8::1]:4000",
            "--lookup",
            "1030",
            "--touch",
            "1028,1029,1030,1031",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    ms = r"  \(\d+\.\d\d ms\)"
    assert re.fullmatch(
        r"HELLO boot id [0-9a-f]{16} -> WELCOME ports 1028-1031, cookie "
        r"[0-9a-f]{16}, boot id [0-9a-f]{16}" + ms,
        lines[0],
    ), lines[0]
    assert lines[1] == "COOKIE, HELLO -> sent to confirm the session (no answer expected)"
    m = re.fullmatch(
        r"MAP \[2001:db8::1\]:4000 -> MAPPING (\d+) \[2001:db8::1\]:4000" + ms, lines[2]
    )
    assert m, lines[2]
    port = int(m.group(1))
    if port == 1030:
        assert re.fullmatch(r"LOOKUP 1030 -> MAPPING 1030 \[2001:db8::1\]:4000" + ms, lines[3])
    else:
        assert re.fullmatch(r"LOOKUP 1030 -> UNMAPPED 1030" + ms, lines[3]), lines[3]
    others = [p for p in range(1028, 1032) if p != port]
    assert lines[4].startswith(
        "TOUCH 1028 1029 1030 1031 -> "
        + "; ".join(f"UNMAPPED {p}" for p in others)
        + f"; no answer for {port} (entries there: refreshed)"
    )
    assert len(lines) == 5
    # The confirmed boot and its entry are in the table of the source address.
    q = subprocess.run(
        PY + ["query", "--nat", "127.0.0.3", "--db", str(server.db), "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert q.stdout.splitlines()[1].startswith(f"127.0.0.3,{port},2001:db8::1,4000,")
    assert "Initialized 127.0.0.3" in server.log.read_text()


def test_probe_of_a_silent_address_exits_1(tmp_path):
    import socket

    quiet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    quiet.bind(("127.0.0.1", 0))  # bound, never answers
    try:
        started = time.monotonic()
        r = subprocess.run(
            PY
            + [
                "probe",
                f"127.0.0.1:{quiet.getsockname()[1]}",
                "--timeout",
                "0.5",
                "--map",
                "[2001:db8::1]:1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert time.monotonic() - started < 30
    finally:
        quiet.close()
    assert r.returncode == 1
    assert re.fullmatch(r"HELLO boot id [0-9a-f]{16} -> no answer within 0.5 s\n", r.stdout)

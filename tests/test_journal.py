"""stderr under systemd: a real ``nat64ho serve`` whose stderr is the file that
JOURNAL_STREAM names writes every line with its sd-daemon priority; with any
other stderr, the same lines without one. ``-v``/``-q`` set how many."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys

import pytest

from nat64ho.daemon import journal
from tests.helpers import wait_for

PRIORITY = re.compile(r"<[0-7]>")


def _serve(tmp_path, name: str, *extra: str, journal_file: bool, env: dict | None = None):
    """``serve`` with stderr into ``tmp_path/name``, and JOURNAL_STREAM naming
    that file (or, with ``journal_file`` false, a different file)."""
    err = tmp_path / name
    err.touch()
    named = err if journal_file else tmp_path / "elsewhere"
    named.touch()
    st = os.stat(named)
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", **(env or {}))
    with open(err, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nat64ho", *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=out,
            env=env,
        )
    return proc, err


def _serve_args(tmp_path) -> list[str]:
    db, log = tmp_path / "table.db", tmp_path / "events.log"
    return ["serve", "--db", str(db), "--listen", "127.0.0.1:0", "--log-file", str(log)]


def _run_and_stop(tmp_path, journal_file: bool, *root: str) -> tuple[str, str]:
    """A server that warns (systemd's notify socket is missing) and stops,
    and a second one refused the same database: their stderr texts."""
    bogus = {"NOTIFY_SOCKET": str(tmp_path / "no-such-socket")}
    first, err = _serve(
        tmp_path, "first.err", *root, *_serve_args(tmp_path), journal_file=journal_file, env=bogus
    )
    try:
        wait_for(lambda: "cannot notify systemd" in err.read_text(), timeout=20)
        second, err2 = _serve(
            tmp_path, "second.err", *_serve_args(tmp_path), journal_file=journal_file
        )
        assert second.wait(30) == 1
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
    return err.read_text(), err2.read_text()


def test_under_the_journal_every_line_has_its_priority(tmp_path):
    text, refused = _run_and_stop(tmp_path, True)
    lines = text.splitlines()
    assert lines and all(PRIORITY.match(line) for line in lines), text
    assert any(line.startswith("<6>nat64ho: INFO: listening on ") for line in lines)
    assert any(line.startswith("<4>nat64ho: WARNING: cannot notify systemd") for line in lines)
    assert lines[-1].startswith("<6>nat64ho: INFO: stopped: ")
    [line] = refused.splitlines()
    assert line.startswith("<3>Error: "), refused


def test_on_another_stderr_no_line_has_a_priority(tmp_path):
    text, refused = _run_and_stop(tmp_path, False)
    assert "listening on" in text and "cannot notify systemd" in text
    assert not any(PRIORITY.match(line) for line in (text + refused).splitlines())
    assert refused.startswith("Error: ")


def test_quiet_keeps_warnings_and_verbose_adds_debug_lines(tmp_path):
    text, _ = _run_and_stop(tmp_path, True, "-q")
    assert text.splitlines() == [
        line for line in text.splitlines() if line.startswith(("<4>", "<3>"))
    ]
    assert "cannot notify systemd" in text
    text, _ = _run_and_stop(tmp_path, True, "--verbose")
    assert any(line.startswith("<7>nat64ho: DEBUG: limits: ") for line in text.splitlines())


def test_verbose_and_quiet_together_is_one_error():
    r = subprocess.run(
        [sys.executable, "-m", "nat64ho", "-v", "-q", "query"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stderr) == (2, "Error: --verbose and --quiet: give one of them\n")


def test_a_traceback_carries_the_priority_on_every_line():
    fmt = journal.Formatter("nat64ho: %(levelname)s: %(message)s", True)
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("nat64ho", logging.ERROR, "", 0, "bug", (), sys.exc_info())
    lines = fmt.format(record).splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)
    assert lines[0] == "<3>nat64ho: ERROR: bug"


@pytest.mark.parametrize(
    "writes, out",
    [
        (["Error: bad\n"], "<3>Error: bad\n"),
        (["Warning: so", "on\nmore\n"], "<4>Warning: soon\n<6>more\n"),
        (["<4>nat64ho: WARNING: x\n"], "<4>nat64ho: WARNING: x\n"),
        (["Error: part", None, "ial\n"], "<3>Error: partial\n"),
    ],
)
def test_prefixed_stream_tags_whole_lines(writes, out):
    import io

    raw = io.StringIO()
    s = journal.PrefixedStream(raw)  # type: ignore[arg-type]
    for w in writes:
        if w is None:
            s.flush()
        else:
            s.write(w)
    s.flush()
    assert raw.getvalue() == out
    with pytest.raises(TypeError):
        s.write(b"")  # type: ignore[arg-type]  # click asks, to tell text streams

"""Starting a server (or any child that prints "listening on ADDR:PORT")
in its own process and reading its CPU and memory: shared by the tests, the
benchmark and the scripts in benchmarks/. The server never imports it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from nat64ho.storage import schema

_LISTENING = re.compile(r"listening on ([0-9.]+):(\d+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_SUM_EXEC = re.compile(r"^se\.sum_exec_runtime\s*:\s*([0-9.]+)", re.M)  # ms


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_tree(pid: int) -> list[int]:
    """``pid`` and its descendants alive now (a server with workers and a
    writer is a tree of processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                todo += [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except OSError:
                pass
    return out


def _thread_cpu(pid: int) -> float:
    """CPU seconds of every thread of ``pid``: to the nanosecond from
    /proc/PID/task/TID/sched where the kernel has it, else in clock ticks."""
    total = 0.0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/sched").read_text()
        except OSError:
            text = ""
        m = _SUM_EXEC.search(text)
        if m is None:
            try:
                return proc_cpu(pid)
            except (OSError, IndexError):
                return 0.0
        total += float(m.group(1)) / 1000
    return total


def proc_tree_cpu(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its descendants, every thread
    of each. A process or thread that exits between two readings takes its
    share with it: measure while the tree is stable."""
    return sum(_thread_cpu(p) for p in proc_tree(pid))


def proc_tree_cpu_by_role(pid: int) -> dict[str, float]:
    """:func:`proc_tree_cpu` split into the server's SQLite writer process
    ("writer") and the rest ("front": the event loops of the server or its
    workers, and their parent)."""
    out = {"front": 0.0, "writer": 0.0}
    for p in proc_tree(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        out["writer" if b"nat64ho.storage.writer" in cmd else "front"] += _thread_cpu(p)
    return out


def proc_peak_rss(pid: int) -> int:
    """Peak resident set of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def proc_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def spawn_logged(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """``cmd`` with only its stderr kept (a pipe of text lines, unbuffered),
    as tests and benchmarks watch the server's log lines."""
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
    )


class Child:
    """A server (or echo server) in a child process on an ephemeral loopback port."""

    def __init__(self, cmd: list[str], timeout: float = 60.0, env: dict[str, str] | None = None):
        self.lines: list[str] = []
        self.proc = spawn_logged(cmd, env)
        listening: list[tuple[str, int]] = []
        found = threading.Event()

        stderr = self.proc.stderr
        assert stderr is not None  # stderr=PIPE above

        def pump() -> None:
            for line in stderr:
                self.lines.append(line)
                m = _LISTENING.search(line)
                if m and not found.is_set():
                    listening.append((m.group(1), int(m.group(2))))
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(timeout) or not listening:
            self.stop()
            raise RuntimeError("child did not start:\n" + "".join(self.lines))
        self.address: tuple[str, int] = listening[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve_command(db: Path | str | None, log: Path, *extra: str) -> list[str]:
    """``nat64ho serve`` on an ephemeral port of 127.0.0.1, with ``extra``
    options; without ``--db`` when ``db`` is None ($NAT64HO_DB then)."""
    cmd = [sys.executable, "-m", "nat64ho", "serve"]
    cmd += [] if db is None else ["--db", str(db)]
    return cmd + ["--listen", "127.0.0.1:0", "--log-file", str(log), *extra]


def start_server(db: Path | str, log: Path, sync: str, extra: list[str]) -> Child:
    """``nat64ho serve`` on 127.0.0.1, without rate limits (they are policy,
    not capacity) unless ``extra`` sets them."""
    limits = ["--hello-rate", "0", "--create-rate", "0", "--request-rate", "0"]
    if schema.is_postgres(db):
        # A URL may hold a password: the child's environment, not its
        # command line, which ps shows to every user.
        cmd = serve_command(None, log, "--sync", sync, *limits, *extra)
        return Child(cmd, env={"NAT64HO_DB": str(db)})
    return Child(serve_command(db, log, "--sync", sync, *limits, *extra))

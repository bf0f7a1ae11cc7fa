"""Boots a Debian 12 tree that install.sh --root made, under systemd-nspawn
with its own network: the unit starts at boot, answers HELLO on the tree's
loopback, logs to the tree's journal, and `nat64ho` on PATH reads the
installed database with no options, for root and for group nat64ho.

The debootstrapped base tree is cached under /var/cache/nat64ho-test (keyed by
BASE_KEY) and built when missing; each run boots a fresh copy of it."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = Path("/var/cache/nat64ho-test")
PACKAGES = "python3,python3-venv,systemd,systemd-sysv,dbus,procps"
# Change it with PACKAGES: a cached tree is only reused under its own key.
BASE_KEY = "bookworm-minbase-1"
MIRROR = "http://deb.debian.org/debian"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, systemd-nspawn)"
    for tool, package in (
        ("debootstrap", "debootstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
        ("setpriv", "util-linux"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    return None


if missing():
    pytest.skip(missing(), allow_module_level=True)


def base_tree() -> Path:
    """The cached Debian 12 tree, debootstrapped first if it is not there."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tree = CACHE / BASE_KEY
    with open(CACHE / f"{BASE_KEY}.lock", "w") as lock:
        # Two test runs at once build it once.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (tree / ".complete").exists():
            work = CACHE / f"{BASE_KEY}.partial"
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(tree, ignore_errors=True)
            proc = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={PACKAGES}",
                    "bookworm",
                    str(work),
                    MIRROR,
                ],
                capture_output=True,
                text=True,
                timeout=1200,
            )
            if proc.returncode != 0:
                pytest.fail(f"debootstrap failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            work.rename(tree)
            (tree / ".complete").write_text(f"{BASE_KEY}\n")
    return tree


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Container:
    """A booted copy of a tree; commands run inside through nsenter."""

    def __init__(self, tree: Path, console: Path):
        self.console = console
        self.proc = subprocess.Popen(
            [
                "systemd-nspawn",
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "-b",
                "-D",
                str(tree),
                "-M",
                f"nat64ho-test-{os.getpid()}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=console.open("w"),
            stderr=subprocess.STDOUT,
        )
        self.leader = self._find_leader()

    def _find_leader(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"systemd-nspawn exited {self.proc.returncode}:\n{self.console.read_text()[-3000:]}"
                )
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    comm = (entry / "comm").read_text().strip()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid and comm == "systemd":
                    return int(entry.name)
            time.sleep(0.2)
        pytest.fail("the container's init did not start")

    def run(self, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.leader),
                "-a",
                "env",
                "-i",
                "PATH=/usr/local/bin:/usr/bin:/bin",
                "LANG=C.UTF-8",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            # nspawn turns SIGTERM into an orderly shutdown of the container.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


HELLO = """
import asyncio, sys
from nat64ho.peer import Client

async def main():
    client = await Client.connect("127.0.0.1", int(sys.argv[1]))
    welcome = await client.hello(timeout=5.0)
    answers = await client.map(bytes.fromhex("20010db8" + "00" * 11 + "07"), 40000)
    print(welcome.first_port, welcome.last_port, len(answers))
    client.close()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def booted():
    base = base_tree()
    scratch = Path(tempfile.mkdtemp(prefix="nat64ho-boot-", dir="/var/tmp"))
    # The service user builds inside the tree: let it through.
    scratch.chmod(0o755)
    tree = scratch / "tree"
    container = None
    try:
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(tree)], check=True)
        port = free_port(socket.SOCK_DGRAM)
        proc = subprocess.run(
            [
                "bash",
                str(REPO / "install.sh"),
                "--root",
                str(tree),
                "--listen",
                f"127.0.0.1:{port}",
                "--metrics",
                "",
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        container = Container(tree, scratch / "console.log")
        # Boot done: running, or degraded by units a container lacks. Until
        # init has its socket, systemctl cannot ask.
        deadline = time.monotonic() + 120
        while True:
            state = container.run("systemctl", "is-system-running", "--wait", timeout=120)
            if state.stdout.strip() in ("running", "degraded") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert state.stdout.strip() in ("running", "degraded"), (
            state.stdout,
            state.stderr,
            (scratch / "console.log").read_text()[-3000:],
        )
        yield container, tree, port
    finally:
        if container is not None:
            container.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def test_service_starts_at_boot_and_answers_hello(booted):
    container, _, port = booted
    active = container.run("systemctl", "is-active", "nat64ho.service")
    assert active.stdout.strip() == "active", (
        active.stdout + container.run("journalctl", "-u", "nat64ho", "--no-pager").stdout
    )
    hello = container.run("/home/nat64ho/venv/bin/python", "-c", HELLO, str(port))
    assert hello.returncode == 0, hello.stderr
    first, last, answers = hello.stdout.split()
    assert (first, last, answers) == ("1028", "65535", "1")


def test_service_logs_to_the_journal(booted):
    container, _, port = booted
    journal = container.run("journalctl", "-u", "nat64ho.service", "--no-pager", "-o", "cat")
    assert f"listening on 127.0.0.1:{port}" in journal.stdout, journal.stdout + journal.stderr


def test_operator_commands_work_with_no_options(booted):
    container, tree, port = booted
    # The HELLO test's MAP may still be on its way to the disk: wait for it.
    deadline = time.monotonic() + 30
    while True:
        root = container.run("nat64ho", "query", "--nat", "127.0.0.1")
        assert root.returncode == 0, root.stderr
        if "2001:db8::7" in root.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "2001:db8::7" in root.stdout, root.stdout
    gid = next(
        line.split(":")[2]
        for line in (tree / "etc/group").read_text().splitlines()
        if line.startswith("nat64ho:")
    )
    member = container.run(
        "setpriv",
        "--reuid=23456",
        "--regid=23456",
        f"--groups={gid}",
        "nat64ho",
        "query",
        "--nat",
        "127.0.0.1",
    )
    assert member.returncode == 0 and member.stdout == root.stdout, member.stderr
    outsider = container.run(
        "setpriv",
        "--reuid=23457",
        "--regid=23457",
        "--clear-groups",
        "nat64ho",
        "query",
        "--nat",
        "127.0.0.1",
    )
    assert outsider.returncode == 1
    assert outsider.stderr == (
        "Error: /home/nat64ho/data/nat64ho.db: permission denied "
        "(run as root or as a member of the file's group)\n"
    ), outsider.stderr
    # The unit's UMask keeps the table from others; the group may read.
    modes = container.run(
        "stat", "-c", "%a %G %n", "/home/nat64ho/data", "/home/nat64ho/data/nat64ho.db"
    )
    assert modes.stdout.splitlines() == [
        "750 nat64ho /home/nat64ho/data",
        "640 nat64ho /home/nat64ho/data/nat64ho.db",
    ]

"""Shared fixtures: a real ``nat64ho serve`` process on 127.0.0.1, and a
NAT64 client for it."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nat64ho.testing import Child
from nat64ho.peer import Client, Peer


def v6(i: int, prefix: str = "2001:db8::") -> bytes:
    """A distinct test IPv6 address."""
    return (int(ipaddress.IPv6Address(prefix)) + i).to_bytes(16, "big")


class ServerProcess:
    """``nat64ho serve`` in a child process, bound to an ephemeral port."""

    def __init__(self, tmp: Path, *args: str, db: Path | None = None, log: Path | None = None,
                 env: dict | None = None):
        self.tmp = tmp
        self.db = db or tmp / "table.db"
        self.log = log or tmp / "events.log"
        self.args = list(args)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.stderr_lines: list[str] = []

    def start(self, timeout: float = 20.0) -> "ServerProcess":
        cmd = [sys.executable, "-m", "nat64ho", "serve", "--db", str(self.db),
               "--listen", f"127.0.0.1:{self.port}", "--log-file", str(self.log), *self.args]
        self.child = Child(cmd, timeout, env=self.env)
        self.proc = self.child.proc
        self.stderr_lines = self.child.lines
        self.port = self.child.address[1]
        return self

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> "ServerProcess":
        self.stop()
        return self.start()


@pytest.fixture
def server_factory(tmp_path):
    started: list[ServerProcess] = []

    def make(*args: str, **kw) -> ServerProcess:
        s = ServerProcess(tmp_path, *args, **kw)
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.kill()


async def connect(server: ServerProcess, *, boot_id: bytes | None = None,
                  local: str = "127.0.0.1", hello: bool = True) -> Client:
    """A NAT64 client for ``server``, after HELLO/WELCOME unless told not to."""
    client = await Client.connect(server.host, server.port, local=local, peer=Peer(boot_id))
    if hello:
        await client.hello()
    return client


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def run(coro):
    return asyncio.run(coro)

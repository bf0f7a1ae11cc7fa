"""Shared fixtures. Helpers live in tests/helpers.py; the names imported here
stay importable from conftest for tests written before that split."""

from __future__ import annotations

import pytest

from tests.helpers import ServerProcess, connect, run, tmpfs, umount, v6, wait_for  # noqa: F401


@pytest.fixture
def server_factory(tmp_path):
    """Starts ``nat64ho serve`` processes in ``tmp_path``; kills what is left."""
    started: list[ServerProcess] = []

    def make(*args: str, **kw) -> ServerProcess:
        s = ServerProcess(tmp_path, *args, **kw)
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.kill()


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs: big enough for a fresh database, small enough to fill."""
    mnt = tmpfs(tmp_path / "small", "2m")
    yield mnt
    umount(mnt)

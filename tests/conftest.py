"""Shared fixtures. Helpers live in tests/helpers.py; the names imported here
stay importable from conftest for tests written before that split."""

from __future__ import annotations

import os
import signal

import pytest

from tests import pgcluster
from tests.helpers import Proc, ServerProcess, connect, run, tmpfs, umount, v6, wait_for  # noqa: F401

# Servers of the tests seal their history only when a test asks (an hourly
# seal would otherwise move a test's events whenever it runs across the hour).
os.environ.setdefault("NAT64HO_SEAL_EVERY", "0")

# A suite started in the background inherits SIGINT ignored, and every command
# it starts would too: the tests' ^C must reach a command as a terminal's does.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
def procs():
    """Starts ``nat64ho`` commands (helpers.Proc); kills what is left."""
    started: list[Proc] = []

    def make(*args: str, **kw) -> Proc:
        p = Proc(list(args), **kw)
        started.append(p)
        return p

    yield make
    for p in started:
        p.kill()


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs: big enough for a fresh database, small enough to fill."""
    mnt = tmpfs(tmp_path / "small", "2m")
    yield mnt
    umount(mnt)


@pytest.fixture(scope="session")
def pg_cluster():
    """One PostgreSQL cluster for the whole run (about 2 s to start); each
    test takes a fresh database of it through ``pg_url``."""
    why = pgcluster.missing()
    if why is not None:
        pytest.skip(why)
    cluster = pgcluster.Cluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """``postgresql:///tN?host=…``: a new empty database."""
    return pg_cluster.url()


def _database(request, backend: str, tmp_path) -> str:
    if backend == "sqlite":
        return str(tmp_path / "table.db")
    return request.getfixturevalue("pg_cluster").url()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_target(request, tmp_path) -> str:
    """The table's database on each backend: an SQLite file in ``tmp_path``,
    or a new database of the run's PostgreSQL cluster, as ``--db`` takes it."""
    return _database(request, request.param, tmp_path)


#: The set-ups the durability tests run on: each backend with one front end,
#: and SQLite with four workers (workers share SQLite's writer process; on
#: PostgreSQL the server commits from its own session, with one worker).
SERVED = {
    "sqlite": ("sqlite", ()),
    "sqlite-workers4": ("sqlite", ("--workers", "4")),
    "postgresql": ("postgresql", ()),
}


@pytest.fixture(params=list(SERVED))
def served(request, tmp_path) -> tuple[str, tuple[str, ...]]:
    """(``--db``, more ``serve`` arguments) of each set-up in SERVED."""
    backend, more = SERVED[request.param]
    return _database(request, backend, tmp_path), more

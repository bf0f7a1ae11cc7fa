"""A throwaway PostgreSQL cluster for the tests: Debian's ``initdb`` and
``pg_ctl`` into a temporary directory, listening on a Unix socket only."""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

#: The role the tests connect as (trust authentication on the socket).
USER = "nat64ho"


def bin_dir() -> Path | None:
    """Where Debian's PostgreSQL programs are (the newest version), if installed."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).resolve().parent if pg_ctl else None


def missing() -> str | None:
    """Why no cluster can be started here, or None."""
    if bin_dir() is None:
        return "PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as"
    return None


class Cluster:
    """One cluster in a new directory; :meth:`url` names a fresh database in it."""

    def __init__(self) -> None:
        self.bin = bin_dir()
        assert self.bin is not None, missing()
        # Not under pytest's tmp_path: its parents are 0700 to root, and the
        # server runs as 'postgres' when the tests run as root.
        self.root = Path(tempfile.mkdtemp(prefix="nat64ho-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.log = self.root / "postgres.log"
        self._names = itertools.count(1)
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]

    def _run(self, *cmd: str) -> None:
        subprocess.run(
            [*self._as, *cmd], check=True, capture_output=True, timeout=60, cwd=self.root
        )

    def start(self) -> Cluster:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        options = f"-k {self.socket_dir} -c listen_addresses='' -c max_connections=200"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "start",
        )
        return self

    def createdb(self, name: str | None = None) -> str:
        """A new empty database; its name."""
        name = name or f"t{next(self._names)}"
        self._run(str(self.bin / "createdb"), "-h", str(self.socket_dir), "-U", USER, name)
        return name

    def url(self, name: str | None = None) -> str:
        """The URL of a new empty database (or of ``name``)."""
        return f"postgresql:///{name or self.createdb()}?host={self.socket_dir}&user={USER}"

    def psql(self, dbname: str, sql: str) -> str:
        """Run ``sql`` in ``dbname``; its unaligned output."""
        out = subprocess.run(
            [
                str(self.bin / "psql"),
                "-h",
                str(self.socket_dir),
                "-U",
                USER,
                "-d",
                dbname,
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

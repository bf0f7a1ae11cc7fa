"""Opening a nat64ho database and bringing its schema up to date.

Owns the migration files (``migrations/NNNN_name.sql``, shipped inside the
package) and the rules every command shares: the default path, WAL, refusing
files that are not ours or are newer than us, and never creating a database
where a read was asked for.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import time
from importlib import resources
from pathlib import Path

#: How long a connection waits on a lock held by another process before it
#: reports the database busy. Long enough to ride out a big commit or a
#: checkpoint, short enough that an operator is not left staring at nothing.
BUSY_TIMEOUT_MS = 5000

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class DatabaseError(Exception):
    """Base of the named errors below; the message is meant for an operator."""


class DatabaseMissing(DatabaseError):
    """The database file does not exist (and the command must not create it)."""


class NotOurDatabase(DatabaseError):
    """The file is not SQLite, is damaged, or belongs to another program."""


class NewerDatabase(DatabaseError):
    """The database carries migrations this nat64ho does not know."""


class OutdatedDatabase(DatabaseError):
    """The database lacks migrations that only ``serve`` applies."""


class DatabaseBusy(DatabaseError):
    """Another process held a lock on the database for too long."""


def default_db_path() -> Path:
    """``$NAT64HO_DB``, else ``$XDG_DATA_HOME/nat64ho/table.db``
    (``~/.local/share/nat64ho/table.db``)."""
    env = os.environ.get("NAT64HO_DB")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "nat64ho" / "table.db"


def _migration_dir():
    packaged = resources.files("nat64ho").joinpath("migrations")
    if packaged.is_dir():
        return packaged
    # Running from a checkout (editable install): the top-level folder.
    return Path(__file__).resolve().parent.parent / "migrations"


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every shipped migration, in order."""
    found = []
    for item in _migration_dir().iterdir():
        m = _MIGRATION_NAME.match(item.name)
        if m:
            found.append((int(m.group(1)), m.group(2), item.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations are not numbered 1..n: {versions}")
    return found


def _connect(path: Path, mode: str) -> sqlite3.Connection:
    uri = f"file:{path.as_posix()}?mode={mode}"
    if mode == "ro" and not os.access(path.parent, os.W_OK) and not os.path.exists(f"{path}-wal"):
        # A reader who may not create the -shm file (group nat64ho on the
        # installed database) while no server has it open: a writer keeps the
        # -wal file, so all there is lies in the file itself.
        uri += "&immutable=1"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                           check_same_thread=False)
    return conn


def _applied(conn: sqlite3.Connection, path: Path) -> list[int]:
    """Versions recorded in the database; raises NotOurDatabase for foreign files."""
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        marks = conn.execute("PRAGMA application_id").fetchone()[0] or \
            conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.OperationalError:
        # Locked, I/O error, disk full: about reaching the file, not about
        # whose it is; open_db names it.
        raise
    except sqlite3.DatabaseError as exc:
        raise NotOurDatabase(f"{path}: not a nat64ho database ({exc})") from None
    if not tables:
        if marks:
            # No tables yet but stamped by someone: another program's fresh database.
            raise NotOurDatabase(f"{path}: an SQLite database of another program "
                                 "(application_id or user_version set, no nat64ho tables)")
        return []
    if "schema_migrations" not in tables:
        raise NotOurDatabase(
            f"{path}: an SQLite database of another program (no schema_migrations table)")
    return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def check_version(conn: sqlite3.Connection, path: Path) -> list[int]:
    applied = _applied(conn, path)
    known = {v for v, _, _ in migrations()}
    unknown = [v for v in applied if v not in known]
    if unknown:
        raise NewerDatabase(
            f"{path}: written by a newer nat64ho (schema version {max(unknown)}, "
            f"this one knows up to {max(known)}); upgrade nat64ho")
    return applied


def migrate(conn: sqlite3.Connection, path: Path) -> list[int]:
    """Apply the pending migrations, each in one transaction with its record.
    Returns the versions applied now."""
    applied = set(check_version(conn, path))
    done = []
    for version, name, sql in migrations():
        if version in applied:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                         "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied INTEGER NOT NULL)")
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                         (version, name, int(time.time() * 1_000_000)))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        done.append(version)
    return done


def _statements(sql: str) -> list[str]:
    # executescript() would commit on its own; split so the migration and its
    # record share one transaction.
    out, current = [], []
    for line in sql.splitlines(keepends=True):
        current.append(line)
        if sqlite3.complete_statement("".join(current)):
            out.append("".join(current))
            current = []
    if "".join(current).strip():
        out.append("".join(current))
    return out


def open_db(path: Path | str, *, readonly: bool = False, create: bool = False) -> sqlite3.Connection:
    """Open a nat64ho database, synchronously.

    ``readonly``: never writes (and never creates). ``create``: make the file
    and its directory if missing, then apply pending migrations. Otherwise the
    file must exist and be current. Raises the DatabaseError subclasses.
    """
    path = Path(path)
    if not path.exists():
        if not create:
            raise DatabaseMissing(f"{path}: no such database (start 'nat64ho serve --db {path}' "
                                  "to create it, or give --db)")
        path.parent.mkdir(parents=True, exist_ok=True)
    elif path.is_dir():
        raise NotOurDatabase(f"{path}: is a directory, not a database file")
    else:
        check_file(path)
    conn = _connect(path, "ro" if readonly else "rwc" if create else "rw")
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Identify the file before anything writes to it: switching a foreign
        # database to WAL would already change its header.
        check_version(conn, path)
        if readonly:
            _require_current(conn, path)
        else:
            _set_wal(conn, path)
            if create:
                migrate(conn, path)
            else:
                _require_current(conn, path)
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.OperationalError as exc:
        conn.close()
        if "locked" in str(exc) or "busy" in str(exc):
            raise DatabaseBusy(f"{path}: database is busy (locked by another process); try again") from None
        if _no_space(path):
            raise NotOurDatabase(f"{path}: cannot be opened ({exc}): its filesystem is full") from None
        raise NotOurDatabase(f"{path}: cannot be opened ({exc})") from None
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise NotOurDatabase(f"{path}: not a nat64ho database ({exc})") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _no_space(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent).free == 0
    except OSError:
        return False


def _require_current(conn: sqlite3.Connection, path: Path) -> None:
    applied = _applied(conn, path)
    missing = [v for v, _, _ in migrations() if v not in applied]
    if not applied:
        raise NotOurDatabase(f"{path}: empty file, not a nat64ho database")
    if missing:
        raise OutdatedDatabase(f"{path}: schema is older than this nat64ho (missing version "
                            f"{missing[0]}); start 'nat64ho serve' once to upgrade it")


def _set_wal(conn: sqlite3.Connection, path: Path) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise NotOurDatabase(f"{path}: cannot switch to WAL journal mode (got {mode})")


# ---------------------------------------------------------------- checking
# What SQLite itself would only notice when a damaged page is first read, or
# never (a short file reads as a smaller database), is caught here up front
# from the 100-octet header, without reading the tables.

_MAGIC = b"SQLite format 3\x00"


def check_file(path: Path) -> None:
    """Refuse a non-empty file that is not an intact SQLite database file:
    wrong magic, a size that is not whole pages, or fewer pages than its
    header records. Raises NotOurDatabase; reads 100 octets."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise NotOurDatabase(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        return  # SQLite's empty database: nothing to lose, migrations fill it
    if len(head) < 100 or not head.startswith(_MAGIC):
        raise NotOurDatabase(f"{path}: not an SQLite database (no SQLite header; "
                             f"starts with {head[:16]!r})")
    page_size = int.from_bytes(head[16:18], "big")
    if page_size == 1:
        page_size = 65536
    if page_size < 512 or page_size & (page_size - 1):
        raise NotOurDatabase(f"{path}: damaged SQLite header (page size {page_size})")
    if size % page_size:
        raise NotOurDatabase(f"{path}: truncated or damaged ({size} octets is not a whole "
                             f"number of {page_size}-octet pages)")
    pages = int.from_bytes(head[28:32], "big")
    valid = pages and head[24:28] == head[92:96]
    wal = path.with_name(path.name + "-wal")
    # With a non-empty WAL the file may legitimately lag its header (a
    # checkpoint cut short); recovery from the WAL finishes it.
    if valid and size < pages * page_size and not (wal.exists() and wal.stat().st_size):
        raise NotOurDatabase(f"{path}: truncated ({size // page_size} pages on disk, the "
                             f"header records {pages})")


def expected_schema() -> dict[tuple[str, str], str]:
    """(type, name) -> SQL of every table and index the shipped migrations
    create, as SQLite stores it."""
    mem = sqlite3.connect(":memory:", isolation_level=None)
    try:
        migrate(mem, Path(":memory:"))
        return _schema_of(mem)
    finally:
        mem.close()


def _schema_of(conn: sqlite3.Connection) -> dict[tuple[str, str], str]:
    return {(t, n): sql for t, n, sql in conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}


class CheckReport:
    """What :func:`check` found: ``problems`` empty means healthy."""

    def __init__(self, path: Path):
        self.path = path
        self.problems: list[str] = []
        self.facts: dict[str, int] = {}

    @property
    def ok(self) -> bool:
        return not self.problems


def check(path: Path | str) -> CheckReport:
    """Check a database without changing it: the file header, the schema
    version, every table and index against the migrations, ``PRAGMA
    integrity_check`` and ``foreign_key_check``. Reads the whole file, so it
    is for operators, not for start-up. Raises DatabaseMissing and
    DatabaseBusy; every other finding goes in the report."""
    path = Path(path)
    report = CheckReport(path)
    if not path.exists():
        raise DatabaseMissing(f"{path}: no such database")
    if path.is_dir():
        report.problems.append(f"{path}: is a directory, not a database file")
        return report
    try:
        check_file(path)
    except NotOurDatabase as exc:
        report.problems.append(str(exc))
        return report
    conn = _connect(path, "ro")
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        try:
            applied = check_version(conn, path)
            _require_current(conn, path)
        except (NotOurDatabase, NewerDatabase, OutdatedDatabase) as exc:
            report.problems.append(str(exc))
            if not isinstance(exc, OutdatedDatabase):
                return report
            applied = []
        found = _schema_of(conn)
        if applied:
            for (kind, name), sql in expected_schema().items():
                have = found.get((kind, name))
                if have is None:
                    report.problems.append(f"{path}: {kind} {name} is missing")
                elif " ".join(have.split()) != " ".join(sql.split()):
                    report.problems.append(f"{path}: {kind} {name} differs from the schema")
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check(100)")]
        if rows != ["ok"]:
            report.problems += [f"{path}: integrity_check: {r}" for r in rows]
        for r in conn.execute("PRAGMA foreign_key_check"):
            report.problems.append(f"{path}: foreign_key_check: {r}")
        if report.ok:
            report.facts = {
                "schema version": max(applied),
                "NAT64s": conn.execute("SELECT count(*) FROM nat").fetchone()[0],
                "entries": conn.execute("SELECT count(*) FROM entry").fetchone()[0],
                "events": conn.execute("SELECT count(*) FROM event").fetchone()[0],
            }
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise DatabaseBusy(f"{path}: database is busy (locked by another process); "
                               "try again") from None
        report.problems.append(f"{path}: {exc}")
    except sqlite3.DatabaseError as exc:
        report.problems.append(f"{path}: {exc}")
    finally:
        conn.close()
    return report

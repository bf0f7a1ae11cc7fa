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
import stat
import time
from collections.abc import Sequence
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Protocol

# Re-exported: their home was here, and the commands still import them from here.
from nat64ho.errors import BadRow as BadRow
from nat64ho.errors import DatabaseError as DatabaseError
from nat64ho.storage import declared

#: How long a connection waits on a lock held by another process before it
#: reports the database busy. Long enough to ride out a big commit or a
#: checkpoint, short enough that an operator is not left staring at nothing.
BUSY_TIMEOUT_MS = 5000

#: sqlite3's own execute, for statements with ``?`` placeholders: the operator
#: commands' connections (open_db's ``factory``) bind ``$1, $2, …`` by name.
_execute = sqlite3.Connection.execute

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class DatabaseMissing(DatabaseError):
    """The database file does not exist (and the command must not create it)."""


class NotOurDatabase(DatabaseError):
    """The file is not SQLite, is damaged, or belongs to another program."""


class NewerDatabase(DatabaseError):
    """The database carries migrations this nat64ho does not know."""


class OutdatedDatabase(DatabaseError):
    """The database lacks migrations that only ``serve`` applies."""


class DatabaseUnwritable(DatabaseError):
    """``serve`` cannot write the database (read-only file or mount, full disk)."""


class DatabaseBusy(DatabaseError):
    """Another process held a lock on the database for too long."""


def is_busy(exc: BaseException) -> bool:
    """Whether an SQLite error means another connection held a lock past the
    busy timeout (SQLite says so only in the message: "database is locked",
    "database table is locked", "busy")."""
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


#: What ``--db`` starts with to name a PostgreSQL database (libpq's URIs).
PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(db: object) -> bool:
    """Whether ``--db`` names a PostgreSQL database rather than an SQLite file.
    Kept here, not in pg_schema, so that SQLite-only paths never import asyncpg."""
    return isinstance(db, str) and db.startswith(PG_SCHEMES)


#: A password in a URL's query (libpq's ``password`` and ``sslpassword``).
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)[^&#]*")


def shown(url: str) -> str:
    """``url`` for messages and logs: any password replaced by ``***``, in
    the user part and in the query. Never raises, so that a URL too broken
    to parse is still shown safely in the error that says so."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _QUERY_PASSWORD.sub(r"\1***", url)
    end = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        if i != -1:
            end = min(end, i)
    netloc, tail = rest[:end], rest[end:]
    # The last "@" ends the user part: a password with an unencoded "@" is
    # hidden whole rather than in part.
    user, at, hosts = netloc.rpartition("@")
    if at and ":" in user:
        netloc = user.split(":", 1)[0] + ":***@" + hosts
    return f"{scheme}://{netloc}" + _QUERY_PASSWORD.sub(r"\1***", tail)


def describe(db: str | Path) -> str:
    """``--db`` for messages, either backend."""
    return shown(db) if isinstance(db, str) and is_postgres(db) else str(db)


def default_db_path() -> Path:
    """``$NAT64HO_DB``, else ``$XDG_DATA_HOME/nat64ho/table.db``
    (``~/.local/share/nat64ho/table.db``)."""
    env = os.environ.get("NAT64HO_DB")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(data) / "nat64ho" / "table.db"


def _migration_dir() -> Traversable:
    packaged = resources.files("nat64ho").joinpath("migrations")
    if packaged.is_dir():
        return packaged
    # Running from a checkout (editable install): the top-level folder.
    return Path(__file__).resolve().parents[2] / "migrations"


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


def _connect(
    path: Path, mode: str, factory: type[sqlite3.Connection] = sqlite3.Connection
) -> sqlite3.Connection:
    uri = f"file:{path.as_posix()}?mode={mode}"
    if mode == "ro" and not os.access(path.parent, os.W_OK) and not os.path.exists(f"{path}-wal"):
        # A reader who may not create the -shm file (group nat64ho on the
        # installed database) while no server has it open: a writer keeps the
        # -wal file, so all there is lies in the file itself.
        uri += "&immutable=1"
    conn = sqlite3.connect(
        uri,
        uri=True,
        isolation_level=None,
        timeout=BUSY_TIMEOUT_MS / 1000,
        check_same_thread=False,
        factory=factory,
    )
    # Before anything reads: SQL stored in the file (views, triggers, index
    # expressions) may then call no function with side effects.
    conn.execute("PRAGMA trusted_schema = OFF")
    return conn


#: schema_migrations as pragma_table_xinfo shows it: (name, type, pk, hidden).
_MIGRATIONS = [
    (c, t, int(c == "version"), 0) for c, t in declared.SQLITE.tables["schema_migrations"].items()
]


def _applied(conn: sqlite3.Connection, path: Path) -> list[int]:
    """Versions recorded in the database; raises NotOurDatabase for foreign files."""
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        marks = (
            conn.execute("PRAGMA application_id").fetchone()[0]
            or conn.execute("PRAGMA user_version").fetchone()[0]
        )
    except sqlite3.OperationalError:
        # Locked, I/O error, disk full: about reaching the file, not about
        # whose it is; open_db names it.
        raise
    except sqlite3.DatabaseError as exc:
        raise NotOurDatabase(f"{path}: not a nat64ho database ({exc})") from None
    if not tables:
        if marks:
            # No tables yet but stamped by someone: another program's fresh database.
            raise NotOurDatabase(
                f"{path}: an SQLite database of another program "
                "(application_id or user_version set, no nat64ho tables)"
            )
        return []
    if "schema_migrations" not in tables:
        raise NotOurDatabase(
            f"{path}: an SQLite database of another program (no schema_migrations table)"
        )
    # Read it only once it is known to be the plain table the migrations
    # made: a generated column would run its SQL on every read.
    info = conn.execute(
        "SELECT name, type, pk, hidden FROM pragma_table_xinfo('schema_migrations')"
    )
    if info.fetchall() != _MIGRATIONS:
        raise NotOurDatabase(f"{path}: table schema_migrations differs from the schema")
    return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def check_version(conn: sqlite3.Connection, path: Path) -> list[int]:
    applied = _applied(conn, path)
    known = {v for v, _, _ in migrations()}
    unknown = [v for v in applied if v not in known]
    if unknown:
        raise NewerDatabase(
            f"{path}: written by a newer nat64ho (schema version {max(unknown)}, "
            f"this one knows up to {max(known)}); upgrade nat64ho"
        )
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
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied INTEGER NOT NULL)"
            )
            for statement in _statements(sql):
                conn.execute(statement)
            _execute(
                conn,
                "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                (version, name, int(time.time() * 1_000_000)),
            )
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


def open_db(
    path: Path | str,
    *,
    readonly: bool = False,
    create: bool = False,
    factory: type[sqlite3.Connection] = sqlite3.Connection,
) -> sqlite3.Connection:
    """Open a nat64ho database, synchronously.

    ``readonly``: never writes (and never creates). ``create``: make the file
    and its directory if missing, then apply pending migrations. Otherwise the
    file must exist and be current. ``factory``: the connection's class (the
    operator commands'). Raises the DatabaseError subclasses.
    """
    path = Path(path)
    if not path.exists():
        if not create:
            raise DatabaseMissing(
                f"{path}: no such database (start 'nat64ho serve --db {path}' "
                "to create it, or give --db)"
            )
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    else:
        check_file(path)
    check_companions(path)
    conn = _connect(path, "ro" if readonly else "rwc" if create else "rw", factory)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Identify the file before anything writes to it: switching a foreign
        # database to WAL would already change its header.
        applied = check_version(conn, path)
        # An older schema is for serve to migrate: only SQL planted in it matters.
        _refuse_undeclared(conn, path, whole=len(applied) == len(migrations()))
        if readonly:
            _require_current(conn, path)
        else:
            _set_wal(conn, path)
            if create and migrate(conn, path) and applied:
                # An older schema, now upgraded: all of it must be ours.
                _refuse_undeclared(conn, path, whole=True)
            elif not create:
                _require_current(conn, path)
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.OperationalError as exc:
        conn.close()
        if is_busy(exc):
            raise DatabaseBusy(
                f"{path}: database is busy (locked by another process); try again"
            ) from None
        if _no_space(path):
            raise NotOurDatabase(
                f"{path}: cannot be opened ({exc}): its filesystem is full"
            ) from None
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
        raise OutdatedDatabase(
            f"{path}: schema is older than this nat64ho (missing version "
            f"{missing[0]}); start 'nat64ho serve' once to upgrade it"
        )


def _set_wal(conn: sqlite3.Connection, path: Path) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise NotOurDatabase(f"{path}: cannot switch to WAL journal mode (got {mode})")


# ---------------------------------------------------------------- checking
# What SQLite itself would only notice when a damaged page is first read, or
# never (a short file reads as a smaller database), is caught here up front
# from the 100-octet header, without reading the tables.

_MAGIC = b"SQLite format 3\x00"


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_regular(path: Path, mode: int) -> NotOurDatabase:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return NotOurDatabase(f"{path}: is {kind}, not a database file")


def check_companions(path: Path) -> None:
    """Refuse a -wal or -shm beside the database that is not a regular file:
    SQLite would block on a FIFO there as on the database itself."""
    for extra in ("-wal", "-shm"):
        try:
            mode = os.stat(f"{path}{extra}").st_mode
        except OSError:
            continue
        if not stat.S_ISREG(mode):
            raise _not_regular(Path(f"{path}{extra}"), mode)


def check_file(path: Path) -> None:
    """Refuse what is not a regular file (without blocking on a FIFO), and a
    non-empty file that is not an intact SQLite database file: wrong magic,
    a size that is not whole pages, or fewer pages than its header records.
    Raises NotOurDatabase; reads 100 octets."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise NotOurDatabase(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        size = st.st_size
        head = os.pread(fd, 100, 0)
    except OSError as exc:
        raise NotOurDatabase(f"{path}: cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if size == 0:
        return  # SQLite's empty database: nothing to lose, migrations fill it
    if len(head) < 100 or not head.startswith(_MAGIC):
        raise NotOurDatabase(
            f"{path}: not an SQLite database (no SQLite header; starts with {head[:16]!r})"
        )
    page_size = int.from_bytes(head[16:18], "big")
    if page_size == 1:
        page_size = 65536
    if page_size < 512 or page_size & (page_size - 1):
        raise NotOurDatabase(f"{path}: damaged SQLite header (page size {page_size})")
    if size % page_size:
        raise NotOurDatabase(
            f"{path}: truncated or damaged ({size} octets is not a whole "
            f"number of {page_size}-octet pages)"
        )
    pages = int.from_bytes(head[28:32], "big")
    valid = pages and head[24:28] == head[92:96]
    wal = path.with_name(path.name + "-wal")
    # With a non-empty WAL the file may legitimately lag its header (a
    # checkpoint cut short); recovery from the WAL finishes it.
    if valid and size < pages * page_size and not (wal.exists() and wal.stat().st_size):
        raise NotOurDatabase(
            f"{path}: truncated ({size // page_size} pages on disk, the header records {pages})"
        )


def _refuse_undeclared(conn: sqlite3.Connection, path: Path, *, whole: bool) -> None:
    problems = catalog_problems(conn, whole=whole)
    if problems:
        raise NotOurDatabase(
            f"{path}: " + ", ".join(problems) + " (not made by nat64ho "
            "migrations; refusing to use this database)"
        )


def catalog_problems(conn: sqlite3.Connection, *, whole: bool = True) -> list[str]:
    """How sqlite_master differs from the declared schema: views and triggers
    (none is declared) first, then (``whole``) tables, columns, keys and indexes.
    Reads the catalog only: no SQL stored in the file runs."""
    tables: dict[str, dict[str, str]] = {}
    keys: dict[str, tuple[str, ...]] = {}
    nullable: dict[str, frozenset[str]] = {}
    indexes: dict[str, declared.Index] = {}
    found = []
    for kind, name, table, sql in conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
    ):
        if kind == "table" and not name.startswith("sqlite_"):
            info = _execute(
                conn, 'SELECT name, type, pk, "notnull" FROM pragma_table_info(?)', (name,)
            )
            cols = info.fetchall()
            tables[name] = {c: t for c, t, _, _ in cols}
            keys[name] = tuple(c for c, _, pk, _ in sorted(cols, key=lambda c: c[2]) if pk)
            nullable[name] = frozenset(c for c, _, _, notnull in cols if not notnull)
        elif kind == "index" and sql is not None:
            [(unique, partial)] = _execute(
                conn,
                'SELECT "unique", partial FROM pragma_index_list(?) WHERE name = ?',
                (table, name),
            )
            on = tuple(
                c for (c,) in _execute(conn, "SELECT name FROM pragma_index_info(?)", (name,))
            )
            indexes[name] = declared.Index(table, on, bool(unique), bool(partial))
        elif kind not in ("table", "index"):
            found.append(f"unknown {kind} {name}" + (f" on {table}" if table != name else ""))
    if not whole:
        return found
    live = declared.Catalog(tables, keys, indexes, nullable)
    found += declared.differences(declared.SQLITE, live)
    # Ids never reused once sealed events leave the hot tier: AUTOINCREMENT,
    # which the catalog's columns do not show.
    if "event" in tables and "AUTOINCREMENT" not in _table_sql(conn, "event").upper():
        found.append("table event differs from the schema (its ids are not AUTOINCREMENT)")
    return found


def _table_sql(conn: sqlite3.Connection, name: str) -> str:
    row = _execute(
        conn, "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return str(row[0]) if row else ""


class CheckReport:
    """What :func:`check` found: ``problems`` empty means healthy."""

    #: What a healthy database passed, in words.
    passed = "integrity ok, schema current"

    def __init__(self, path: Path | str):
        self.path = path
        self.problems: list[str] = []
        self.facts: dict[str, int | str] = {}

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
    try:
        check_file(path)
        check_companions(path)
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
        if applied:
            schema = catalog_problems(conn)
            if schema:
                # integrity_check would evaluate the planted SQL (a view's
                # query, an index expression): report and read no further.
                report.problems += [f"{path}: {p}" for p in schema]
                return report
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check(100)")]
        if rows != ["ok"]:
            report.problems += [f"{path}: integrity_check: {r}" for r in rows]
        for r in conn.execute("PRAGMA foreign_key_check"):
            report.problems.append(f"{path}: foreign_key_check: {r}")
        if applied:
            report.problems += [f"{path}: {p}" for p in bad_rows(conn)]
        if report.ok:
            report.facts = {
                "schema version": max(applied),
                "NAT64s": conn.execute("SELECT count(*) FROM nat").fetchone()[0],
                "entries": conn.execute("SELECT count(*) FROM entry").fetchone()[0],
                "events": conn.execute("SELECT count(*) FROM event").fetchone()[0],
            }
    except sqlite3.OperationalError as exc:
        if is_busy(exc):
            raise DatabaseBusy(
                f"{path}: database is busy (locked by another process); try again"
            ) from None
        report.problems.append(f"{path}: {exc}")
    except sqlite3.DatabaseError as exc:
        report.problems.append(f"{path}: {exc}")
    finally:
        conn.close()
    return report


# ---------------------------------------------------------------- rows
# SQLite keeps whatever type a row was given (a text in an INTEGER column of
# a non-STRICT table): the rows commands and the server decode are checked
# here, so a planted or damaged one is named instead of raising deep inside.


class _Finds(Protocol):
    """What :func:`bad_event` asks of a connection (either backend's
    nat64ho.ops.db.Conn)."""

    def execute(self, sql: str, parameters: Sequence[object], /) -> Any: ...


def _is_int(v: object) -> bool:
    return type(v) is int


def _is_port(v: object) -> bool:
    return type(v) is int and 0 <= v <= 65535


def _is_addr(v: object) -> bool:
    return type(v) is bytes and len(v) == 16


def _is_kind(v: object) -> bool:
    return type(v) is int and v in (0, 1, 2)


_ENTRY = (
    ("nat", _is_int),
    ("port", _is_port),
    ("addr", _is_addr),
    ("aport", _is_port),
    ("created", _is_int),
    ("last_use", _is_int),
)
_EVENT = (
    ("ts", _is_int),
    ("kind", _is_kind),
    ("nat", _is_int),
    ("port", _is_port),
    ("addr", _is_addr),
    ("aport", _is_port),
)


def _show(v: object) -> str:
    if isinstance(v, bytes):
        return f"a blob of {len(v)} octets"
    return f"{type(v).__name__} {v!r}"[:60]


def entry_ok(row: Sequence[object]) -> bool:
    """Whether (nat, port, addr, aport, created, last_use) decodes."""
    nat, port, addr, aport, created, last_use = row
    return (
        type(nat) is int
        and type(port) is int
        and 0 <= port <= 65535
        and type(addr) is bytes
        and len(addr) == 16
        and type(aport) is int
        and 0 <= aport <= 65535
        and type(created) is int
        and type(last_use) is int
    )


def event_ok(row: Sequence[object]) -> bool:
    """Whether (ts, kind, nat, port, addr, aport) decodes."""
    ts, kind, nat, port, addr, aport = row
    if not (type(ts) is int and type(nat) is int and type(port) is int and 0 <= port <= 65535):
        return False
    if kind == 0 and type(kind) is int:
        return True
    return (
        kind in (1, 2)
        and type(kind) is int
        and type(addr) is bytes
        and len(addr) == 16
        and type(aport) is int
        and 0 <= aport <= 65535
    )


def bad_entry(path: object, row: Sequence[object]) -> BadRow:
    """The error for an entry row that failed :func:`entry_ok`."""
    why = next(
        f"{c} holds {_show(v)}" for (c, ok), v in zip(_ENTRY, row, strict=False) if not ok(v)
    )
    return BadRow(
        f"{path}: table entry, row (nat={row[0]!r}, port={row[1]!r}) does not decode: "
        f"{why}; run 'nat64ho check --db {path}'"
    )


def bad_event(path: object, row: Sequence[object], conn: _Finds | None = None) -> BadRow:
    """The error for an event row that failed :func:`event_ok`, with its id
    when ``conn`` (either backend's, nat64ho.ops.db.Conn) can find it."""
    checks = _EVENT if row[1] != 0 else _EVENT[:4]
    why = next(
        (f"{c} holds {_show(v)}" for (c, ok), v in zip(checks, row, strict=False) if not ok(v)),
        "wrong types",
    )
    where = f"ts={row[0]!r}, nat={row[2]!r}, port={row[3]!r}"
    if conn is not None:
        try:
            found = conn.execute(
                "SELECT id FROM event WHERE ts IS NOT DISTINCT FROM $1 AND kind IS NOT DISTINCT "
                "FROM $2 AND nat IS NOT DISTINCT FROM $3 AND port IS NOT DISTINCT FROM $4",
                row[:4],
            ).fetchone()
        except (sqlite3.Error, DatabaseError):
            found = None
        if found is not None:
            where = f"id {found[0]}"
    return BadRow(
        f"{path}: table event, row {where} does not decode: {why}; run 'nat64ho check --db {path}'"
    )


def bad_rows(conn: sqlite3.Connection, limit: int = 10) -> list[str]:
    """Rows of entry, event and nat whose types the code cannot decode (a
    full scan: for ``check``)."""
    found = []
    for nat, port in conn.execute(
        "SELECT nat, port FROM entry WHERE typeof(nat) != 'integer' OR typeof(port) != "
        "'integer' OR port NOT BETWEEN 0 AND 65535 OR typeof(addr) != 'blob' OR "
        "length(addr) != 16 OR typeof(aport) != 'integer' OR aport NOT BETWEEN 0 AND 65535 "
        "OR typeof(created) != 'integer' OR typeof(last_use) != 'integer' LIMIT ?",
        (limit,),
    ):
        found.append(
            f"table entry, row (nat={nat!r}, port={port!r}) does not decode (wrong type or size)"
        )
    for (rowid,) in conn.execute(
        "SELECT id FROM event WHERE typeof(ts) != 'integer' OR typeof(kind) != 'integer' OR "
        "typeof(nat) != 'integer' OR typeof(port) != 'integer' OR port NOT BETWEEN 0 AND 65535"
        " OR (kind != 0 AND (typeof(addr) != 'blob' OR length(addr) != 16 OR "
        "typeof(aport) != 'integer' OR aport NOT BETWEEN 0 AND 65535)) LIMIT ?",
        (limit,),
    ):
        found.append(f"table event, row id {rowid} does not decode (wrong type or size)")
    for (nat,) in conn.execute(
        "SELECT nat FROM nat WHERE typeof(boot_id) != 'blob' OR typeof(first_hello) != "
        "'integer' OR typeof(last_hello) != 'integer' LIMIT ?",
        (limit,),
    ):
        found.append(f"table nat, row nat={nat!r} does not decode (wrong type)")
    return found

"""The schema the migrations make, declared per backend: what ``check``
compares a live catalog with. A migration that changes the schema changes
this too (tests/test_declared.py applies the migrations and compares)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Index:
    table: str
    columns: tuple[str, ...]
    unique: bool = False
    partial: bool = False


@dataclass(frozen=True)
class Catalog:
    """Tables as {column: type} with their primary key, the columns outside
    it that accept NULL, and indexes by name (primary keys' own indexes left
    out)."""

    tables: dict[str, dict[str, str]]
    keys: dict[str, tuple[str, ...]]
    indexes: dict[str, Index]
    nullable: dict[str, frozenset[str]]


_KEYS = dict(schema_migrations=("version",), meta=("key",), nat=("nat",), entry=("nat", "port"))
_KEYS |= dict(event=("id",), segment=("n",))
_INDEXES = {
    "entry_endpoint": Index("entry", ("nat", "addr", "aport"), unique=True),
    "entry_lru": Index("entry", ("nat", "last_use", "port")),
    "event_nat_port_ts": Index("event", ("nat", "port", "ts", "kind"), unique=True),
    "event_ts": Index("event", ("ts",)),
}
_SEGMENT = "n first_id last_id ts_lo ts_hi events initialized created deleted bytes sealed".split()
_SEGMENT += ["pruned", "cut_ts", "cut_id"]
#: Every other column is NOT NULL: a NULL there would be a row no reader
#: expects (an Initialized event has no client; a segment not pruned, no time).
_NULLABLE = dict(event=frozenset({"addr", "aport"}), segment=frozenset({"pruned"}))


def _tables(integer: str, small: str, big: str, text: str, blob: str) -> dict[str, dict[str, str]]:
    """Both backends' tables, in their own type names."""
    return {
        "schema_migrations": dict(version=integer, name=text, applied=big),
        "meta": dict(key=text, value=blob),
        "nat": dict(nat=big, boot_id=blob, first_hello=big, last_hello=big),
        "entry": dict(nat=big, port=integer, addr=blob, aport=integer, created=big, last_use=big),
        "event": dict(id=big, ts=big, kind=small, nat=big, port=integer, addr=blob, aport=integer),
        "segment": dict.fromkeys(_SEGMENT, big)
        | dict(file=text, sha256=blob, chain=blob, pending=small),
    }


#: SQLite's declared types (its columns take any type; schema.bad_rows checks the rows).
SQLITE = Catalog(
    _tables("INTEGER", "INTEGER", "INTEGER", "TEXT", "BLOB"), _KEYS, _INDEXES, _NULLABLE
)

_PG_TABLES = _tables("integer", "smallint", "bigint", "text", "bytea")
_PG_TABLES["segment_data"] = dict(n="bigint", data="bytea")
POSTGRES = Catalog(_PG_TABLES, _KEYS | dict(segment_data=("n",)), _INDEXES, _NULLABLE)


def differences(want: Catalog, have: Catalog) -> list[str]:
    """What ``have`` (a live catalog) does not share with ``want``, one
    finding each, in the words ``check`` prints."""
    found = [f"unknown table {t}" for t in sorted(set(have.tables) - set(want.tables))]
    for table, columns in want.tables.items():
        if table not in have.tables:
            found.append(f"table {table} is missing")
        elif have.tables[table] != columns:
            found.append(f"table {table} differs from the schema")
        elif not have.keys.get(table):
            found.append(f"table {table} has no primary key")
        elif have.keys[table] != want.keys[table]:
            found.append(f"table {table} differs from the schema")
        else:
            found += _nulls(table, want, have)
    for name in sorted(set(have.indexes) - set(want.indexes)):
        found.append(f"unknown index {name} on {have.indexes[name].table}")
    for name, index in want.indexes.items():
        if name not in have.indexes:
            found.append(f"index {name} is missing")
        elif have.indexes[name] != index:
            found.append(f"index {name} differs from the schema")
    return found


def _nulls(table: str, want: Catalog, have: Catalog) -> list[str]:
    # Key columns left out: SQLite reports a rowid key as nullable, and a
    # key refuses NULL in both backends all the same.
    wanted = want.nullable.get(table, frozenset())
    got = have.nullable.get(table, frozenset()) - set(want.keys[table])
    return [
        f"column {table}.{c} accepts NULL (the schema says NOT NULL)" for c in sorted(got - wanted)
    ] + [
        f"column {table}.{c} is NOT NULL (the schema lets it be NULL)" for c in sorted(wanted - got)
    ]

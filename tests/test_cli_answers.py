"""What ``who`` answers for a reported time (its precision is the window) and
the one shape of each machine output: JSON numbers, RFC 3339 times."""

from __future__ import annotations

import json
import re

import pytest

from nat64ho.cli.query import time_span
from tests.helpers import nat64ho
from tests.test_cli_day2 import EXAMPLE, example_db  # noqa: F401  (a fixture)

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
TIME_KEYS = {"at", "window_from", "window_until", "from", "until", "created", "last_use", "ts"}
TIME_KEYS |= {"oldest_last_use", "first_hello", "last_hello"}


@pytest.fixture
def db(example_db):  # noqa: F811
    """The four lines of docs/protocol.md §6 imported, on each backend."""
    return example_db


def who_json(db, *args: str) -> list[dict]:
    r = nat64ho("who", *args, "--db", str(db), "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize(
    "text, span",
    [
        ("2019-03-18", 86_400_000_000),
        ("2019-03-18T15", 3_600_000_000),
        ("2019-03-18 15:22", 60_000_000),
        ("2019-03-18 15:22:02", 1_000_000),
        ("2019-03-18T15:22:02Z", 1_000_000),
        ("2019-03-18T16:22:02+01:00", 1_000_000),
        ("2019-03-18 15:22:02.06", 10_000),
        ("2019-03-18 15:22:02.062254", 1),
        ("2019-03-18 15:22:02.0622541", 1),
        ("-1h", 1),
    ],
)
def test_a_time_covers_what_its_precision_says(text, span):
    assert time_span(text) == span


def test_a_time_to_the_second_at_a_change_of_holder_is_ambiguous(db):
    # The port changed holder at 15:22:02.062254/.062478: within that second.
    r = nat64ho("who", "192.0.2.9:47102", "--at", "2019-03-18 15:22:02", "--db", str(db))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == (
        "192.0.2.9:47102 at 2019-03-18 15:22:02.000000 to 15:22:02.999999Z: "
        "2 holders: AMBIGUOUS (closest to the reported time first)"
    )
    assert "[2001:db8::75]:33131" in lines[2] and "[2001:db8::55]:34643" in lines[3]
    rows = who_json(db, "192.0.2.9:47102", "--at", "2019-03-18T15:22:02Z")
    assert [(x["ipv6"], x["distance_s"], x["ambiguous"]) for x in rows] == [
        ("2001:db8::75", 0, True),
        ("2001:db8::55", 0, True),
    ]
    assert rows[0]["tolerance_s"] == 0


@pytest.mark.parametrize(
    "at, holders",
    [
        ("2019-03-18 15:22:02.062", ["2001:db8::75", "2001:db8::55"]),
        ("2019-03-18 15:22:02.0622", ["2001:db8::75"]),
        ("2019-03-18 15:22:02.0624", ["2001:db8::55"]),
        ("2019-03-18 15:22:02.062300", []),
    ],
)
def test_finer_times_cover_less(db, at, holders):
    rows = who_json(db, "192.0.2.9:47102", "--at", at)
    assert [x["ipv6"] for x in rows if x["holders"]] == holders
    assert all(x["ambiguous"] == (len(holders) > 1) for x in rows)


def test_a_client_asked_about_a_second_lists_both_holdings(db):
    rows = who_json(db, "2001:db8::40/122", "--at", "2019-03-18 15:22:02")
    assert sorted(x["ipv6"] for x in rows) == ["2001:db8::55", "2001:db8::75"]


def test_a_report_to_the_second_is_ambiguous_without_a_tolerance(db):
    r = nat64ho(
        "who",
        "--reports",
        "-",
        "--db",
        str(db),
        "--format",
        "json",
        input="192.0.2.9,47102,2019-03-18T15:22:02Z\n",
    )
    rows = json.loads(r.stdout)
    assert [(x["report"], x["ipv6"], x["ambiguous"]) for x in rows] == [
        (1, "2001:db8::75", True),
        (1, "2001:db8::55", True),
    ]


def _check_values(rows: list[dict]) -> None:
    for row in rows:
        for key, value in row.items():
            if key in TIME_KEYS and value is not None:
                assert RFC3339.fullmatch(value), (key, value)
            if key in ("tolerance_s", "distance_s") and value is not None:
                assert type(value) in (int, float), (key, value)


@pytest.mark.parametrize(
    "args",
    [
        ["--at", "2019-03-18 15:00"],
        ["--at", "2019-03-18 15:22:03Z", "--tolerance", "5"],
        ["--at", "2019-03-18 15:22:03Z", "--tolerance", "0.5"],
        ["--at", "2019-03-18 10:00"],
        ["--at", "2019-03-18 15:22:02.0623"],  # nobody: one row, null holder fields
        [],
    ],
)
def test_who_for_a_nat_port_is_always_an_array_of_the_same_rows(db, args):
    rows = who_json(db, "192.0.2.9:47102", *args)
    reference = who_json(db, "192.0.2.9:47102", "--tolerance", "1")
    assert isinstance(rows, list) and rows
    assert all(list(x) == list(reference[0]) for x in rows)
    assert type(rows[0]["holders"]) is int and type(rows[0]["ambiguous"]) is bool
    assert isinstance(rows[0]["events"], list)
    _check_values(rows)


def test_machine_outputs_carry_rfc3339_times_and_numbers(db, tmp_path):
    db = str(db)
    _check_values(who_json(db, "2001:db8::/32"))
    stats = json.loads(nat64ho("stats", "--db", db, "--format", "json").stdout)
    assert len(stats) == 2
    _check_values(stats)
    rows = [
        json.loads(x)
        for x in nat64ho("export", "--db", db, "--format", "jsonl").stdout.splitlines()
    ]
    assert len(rows) == 4 and all(type(x["seq"]) is int for x in rows)
    _check_values(rows)
    log = tmp_path / "example.log"
    log.write_text(EXAMPLE)
    table = str(tmp_path / "rebuilt.db")
    assert nat64ho("import", "--rebuild-table", str(log), "--db", table).returncode == 0
    entries = json.loads(nat64ho("query", "--db", table, "--format", "json").stdout)
    assert len(entries) == 2
    _check_values(entries)

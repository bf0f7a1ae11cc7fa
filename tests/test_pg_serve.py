"""``serve`` on a PostgreSQL URL: where the URL and the log come from, a
database that is missing or out of reach (refused in one line, or waited
for by a standby); a newer schema, a role that cannot write and a wrong
password refused in one line, standby or not."""

from __future__ import annotations

import os

import pytest

from tests.helpers import (
    ServerProcess,
    connect,
    entries,
    nat64ho,
    one_error,
    run,
    serve_args,
    v6,
    wait_for,
)


def test_the_url_comes_from_nat64ho_db_and_the_log_goes_to_the_state_dir(tmp_path, pg_url, procs):
    state = tmp_path / "state"
    env = {"NAT64HO_DB": pg_url, "XDG_STATE_HOME": str(state)}
    # No --db, no --log-file: both defaults.
    srv = procs("serve", "--listen", "127.0.0.1:0", env=env)
    port = srv.port()
    assert f"database {pg_url}, log {state}/nat64ho/nat64ho.log" in srv.stderr

    async def go():
        s = ServerProcess(tmp_path)
        s.port = port
        c = await connect(s)
        [m] = await c.map(v6(5), 55)
        c.close()
        return m

    m = run(go())
    assert entries(pg_url) == {(v6(5), 55): m.nat_port}
    srv.proc.terminate()
    assert srv.proc.wait(30) == 0
    assert " Created " in (state / "nat64ho/nat64ho.log").read_text()


def test_a_missing_database_is_refused_in_one_line(tmp_path, pg_cluster):
    url = pg_cluster.url("nosuchdb")
    r = nat64ho(*serve_args(url, tmp_path / "a.log"))
    assert r.returncode == 1
    assert one_error(r) == (
        f"Error: {url}: no such database (create it with 'createdb', then start "
        "'nat64ho serve --db URL' to make its tables)"
    )


def test_a_standby_waits_for_the_database_to_exist(tmp_path, pg_cluster, procs):
    url = pg_cluster.url("later")
    b = procs(*serve_args(url, tmp_path / "b.log", "--standby"))
    b.wait_line(r"standby: .*no such database.*; waiting to take over")
    assert b.proc.poll() is None
    pg_cluster.createdb("later")
    b.port()
    assert os.path.exists(tmp_path / "b.log")


def test_a_waiting_standby_stops_cleanly_on_sigterm(tmp_path, pg_url, procs):
    a = procs(*serve_args(pg_url, tmp_path / "a.log"))
    a.port()
    b = procs(*serve_args(pg_url, tmp_path / "b.log", "--standby"))
    b.wait_line(r"standby: owned by .*; waiting to take over")
    b.proc.terminate()
    assert b.proc.wait(10) == 0
    b.wait_line("stopped while in standby")
    assert a.proc.poll() is None  # the owner never noticed


def test_a_standby_never_serves_a_database_of_a_newer_nat64ho(tmp_path, pg_cluster, procs):
    name = pg_cluster.createdb()
    url = pg_cluster.url(name)
    assert nat64ho("import", "--db", url, "-", input="").returncode == 0  # makes the tables
    pg_cluster.psql(name, "INSERT INTO schema_migrations VALUES (99, 'future', 0)")
    b = procs(*serve_args(url, tmp_path / "b.log", "--standby"))
    assert b.proc.wait(20) == 1
    b.wait_line(r"^Error: ")
    assert one_error(b.stderr) == (
        f"Error: {url}: written by a newer nat64ho (schema version 99, this one knows up to 3); "
        "upgrade nat64ho"
    )
    assert "listening" not in b.stderr


@pytest.mark.parametrize(
    "grants, why",
    [
        (
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}",
            "permission denied for table meta",
        ),
        (
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; "
            "ALTER ROLE {role} SET default_transaction_read_only = on",
            "cannot execute INSERT in a read-only transaction",
        ),
    ],
    ids=["select_only", "read_only_role"],
)
def test_a_role_that_cannot_write_is_refused_in_one_line(tmp_path, pg_cluster, grants, why):
    name = pg_cluster.createdb()
    url = pg_cluster.url(name)
    assert nat64ho("import", "--db", url, "-", input="").returncode == 0  # makes the tables
    role = f"ro_{name}"  # roles span the cluster
    pg_cluster.psql(name, f"CREATE ROLE {role} LOGIN; " + grants.format(role=role))
    reader = url.replace("user=nat64ho", f"user={role}")
    for more in ([], ["--standby"]):  # a standby does not wait on it either
        r = nat64ho(*serve_args(reader, tmp_path / "a.log", *more))
        assert r.returncode == 1, r
        assert one_error(r) == (
            f"Error: {reader}: cannot be written ({why}); serve needs to write its table"
        )
        assert "listening" not in r.stderr
    assert nat64ho("query", "--db", reader).returncode == 0  # reading is what it may do


def test_a_wrong_password_is_one_line_that_does_not_show_it(pg_cluster):
    name = pg_cluster.createdb()
    role = f"pw_{name}"
    hba = pg_cluster.data / "pg_hba.conf"
    hba.write_text(f"local all {role} scram-sha-256\n" + hba.read_text())
    pg_cluster.psql(name, f"CREATE ROLE {role} LOGIN PASSWORD 'right'")
    pg_cluster.psql(name, "SELECT pg_reload_conf()")
    url = f"postgresql://{role}:wr0ng@/{name}?host={pg_cluster.socket_dir}"
    shown = url.replace(":wr0ng@", ":***@")

    def refused():
        r = nat64ho("query", "--db", url)
        return r if "password authentication failed" in r.stderr else None

    first = wait_for(refused)  # once the server has reread pg_hba.conf
    serves = [
        nat64ho(*serve_args(url, pg_cluster.root / "x.log", *more)) for more in ([], ["--standby"])
    ]
    for r in (first, *serves):  # a standby does not wait for a password to change
        assert r.returncode == 1
        assert one_error(r) == (
            f'Error: {shown}: refused: password authentication failed for user "{role}"'
        )
        assert "wr0ng" not in r.stdout + r.stderr


def test_check_config_refuses_a_url_that_does_not_parse():
    r = nat64ho("serve", "--db", "postgresql://u:secret@[bad/x", "--check-config")
    assert r.returncode == 2 and r.stdout == ""
    assert "secret" not in r.stderr and one_error(r).startswith("Error: --db ")

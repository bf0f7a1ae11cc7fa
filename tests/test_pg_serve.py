"""``serve`` on a PostgreSQL URL: where the URL and the log come from, a
database that is missing or out of reach (refused in one line, or waited
for by a standby)."""

from __future__ import annotations

import os

from tests.helpers import ServerProcess, connect, entries, nat64ho, one_error, run, serve_args, v6


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
        f"Error: {url}: written by a newer nat64ho (schema version 99, this one knows up to 1); "
        "upgrade nat64ho"
    )
    assert "listening" not in b.stderr

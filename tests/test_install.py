"""install.sh, exercised through its --root mode: layout, idempotent upgrades,
settings checked before they are written, --auto-update as the service user,
uninstall/purge, and the precondition checks that must fail before anything is
changed. tests/test_boot.py boots such a tree with systemd."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "install.sh"
HOME = "home/nat64ho"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def run(
    *args: str | Path, check: bool = True, script: Path = INSTALL, **kw
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(script), *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        **kw,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{script.name} {' '.join(map(str, args))} exited {proc.returncode}:\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    return proc


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def addresses() -> list[str]:
    return [
        "--listen",
        f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
        "--metrics",
        f"127.0.0.1:{free_port(socket.SOCK_STREAM)}",
    ]


def settings(root: Path) -> dict[str, str]:
    out = {}
    for line in (root / "etc/default/nat64ho").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def passwd_entry(root: Path) -> list[str]:
    lines = [
        ln for ln in (root / "etc/passwd").read_text().splitlines() if ln.startswith("nat64ho:")
    ]
    assert len(lines) == 1, lines
    return lines[0].split(":")


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def open_tmp():
    """A directory others may pass through: the service user builds inside
    the trees (pytest's own temporary directories are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="nat64ho-install-", dir="/var/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def new_root(base: Path, name: str) -> Path:
    root = base / name
    root.mkdir()
    return root


@pytest.fixture(scope="module")
def installed(open_tmp) -> Path:
    root = new_root(open_tmp, "root")
    run("--root", root, *addresses())
    return root


def ids(root: Path) -> tuple[int, int]:
    _, _, uid, gid, *_ = passwd_entry(root)
    return int(uid), int(gid)


# ---------------------------------------------------------------- layout


def test_user_is_recorded_as_a_system_account(installed):
    name, _, uid, gid, _, home, shell = passwd_entry(installed)
    assert (name, home, shell) == ("nat64ho", "/home/nat64ho", "/usr/sbin/nologin")
    # An empty tree: the top of the system range, whatever the host uses.
    assert (uid, gid) == ("999", "999")
    assert "nat64ho:x:999:" in (installed / "etc/group").read_text().splitlines()


def test_venv_runs_nat64ho(installed):
    python = installed / HOME / "venv/bin/python"
    out = subprocess.run(
        [str(python), "-I", "-m", "nat64ho", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "serve" in out
    # uvloop is a dependency on Linux: the service gets the fast loop.
    subprocess.run([str(installed / HOME / "venv/bin/python"), "-c", "import uvloop"], check=True)


def test_venv_names_the_paths_of_the_booted_tree(installed):
    venv = installed / HOME / "venv"
    # A relative link into releases/, swapped whole on upgrade.
    assert os.readlink(venv).startswith("releases/")
    scripts = [p for p in (venv / "bin").iterdir() if p.is_file() and not p.is_symlink()]
    assert scripts
    for script in scripts:
        text = script.read_bytes()
        assert str(installed).encode() not in text, script
        if text.startswith(b"#!"):
            assert text.startswith(b"#!/home/nat64ho/releases/"), (script, text[:80])
    assert str(installed) not in (venv / "pyvenv.cfg").read_text()
    wants = installed / "etc/systemd/system/multi-user.target.wants/nat64ho.service"
    assert os.readlink(wants) == "/etc/systemd/system/nat64ho.service"


def test_wrapper_on_path_defaults_to_the_installed_database(installed):
    wrapper = installed / "usr/local/bin/nat64ho"
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o755
    # Run it as the booted tree would, with the tree's venv path mapped back.
    text = wrapper.read_text().replace("exec /home/nat64ho/", f"exec {installed}/home/nat64ho/")
    # -I: the checkout in the working directory must not shadow it.
    text = text.replace("venv/bin/nat64ho", "venv/bin/python -I -m nat64ho")
    local = installed / "wrapper.sh"
    local.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "NAT64HO_DB"}
    proc = subprocess.run(["sh", str(local), "check"], capture_output=True, text=True, env=env)
    assert "Error: /home/nat64ho/data/nat64ho.db: no such database" in proc.stderr
    env["NAT64HO_DB"] = "/nowhere/env.db"
    proc = subprocess.run(["sh", str(local), "check"], capture_output=True, text=True, env=env)
    assert "Error: /nowhere/env.db:" in proc.stderr
    proc = subprocess.run(
        ["sh", str(local), "check", "--db", "/nowhere/opt.db"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert "Error: /nowhere/opt.db:" in proc.stderr
    local.unlink()


def as_ids(uid: int, gid: int, groups: list[int]) -> list[str]:
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
        "env",
        "-i",
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
def test_group_members_read_the_database_others_get_one_error_line(installed):
    uid, gid = ids(installed)
    home = installed / HOME
    db = home / "data/nat64ho.db"
    python = str(home / "venv/bin/python")
    # Created as the service creates it (the unit's UMask=0027).
    subprocess.run(
        [
            *as_ids(uid, gid, []),
            "sh",
            "-c",
            f"umask 027; exec {python} -c 'from nat64ho.storage import schema; "
            f'schema.open_db("{db}", create=True).close()\'',
        ],
        check=True,
    )
    assert stat.S_IMODE(db.stat().st_mode) == 0o640
    try:
        for command in (["query"], ["stats"], ["check"], ["who", "192.0.2.1:1029"]):
            member = subprocess.run(
                [
                    *as_ids(23456, 23456, [gid]),
                    f"NAT64HO_DB={db}",
                    python,
                    "-I",
                    "-m",
                    "nat64ho",
                    *command,
                ],
                capture_output=True,
                text=True,
            )
            assert member.returncode == 0, (command, member.stderr)
            outsider = subprocess.run(
                [
                    *as_ids(23457, 23457, []),
                    f"NAT64HO_DB={db}",
                    python,
                    "-I",
                    "-m",
                    "nat64ho",
                    *command,
                ],
                capture_output=True,
                text=True,
            )
            assert outsider.returncode == 1, (command, outsider.stderr)
            assert outsider.stderr.count("\n") == 1, outsider.stderr
            assert outsider.stderr.startswith(f"Error: {db}: permission denied"), outsider.stderr
        assert sorted(p.name for p in db.parent.iterdir()) == ["nat64ho.db"], (
            "readers wrote nothing"
        )
    finally:
        db.unlink()


def test_unit_logrotate_and_updater_come_from_contrib(installed):
    assert (installed / "etc/systemd/system/nat64ho.service").read_bytes() == (
        REPO / "contrib/nat64ho.service"
    ).read_bytes()
    unit = (installed / "etc/systemd/system/nat64ho.service").read_text()
    # A bad setting (exit 2) fails the unit instead of restarting it forever.
    assert "\nRestartPreventExitStatus=2\n" in unit
    assert (installed / HOME / "bin/nat64ho-update").read_bytes() == (
        REPO / "contrib/nat64ho-update"
    ).read_bytes()
    rotate = (installed / "etc/logrotate.d/nat64ho").read_text()
    assert "\n    rotate 180\n" in rotate
    assert "\n    su nat64ho nat64ho\n" in rotate
    assert not (installed / "etc/systemd/system/nat64ho.service.d").exists(), (
        "auto-update is off by default"
    )


def test_sysctl_file_allows_the_receive_buffer_the_server_asks_for(installed):
    from nat64ho.daemon.serve import RCVBUF

    text = (installed / "etc/sysctl.d/60-nat64ho.conf").read_text()
    assert text == (REPO / "contrib/sysctl/60-nat64ho.conf").read_text()
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    # What the kernel caps SO_RCVBUF at must be at least what serve asks for.
    assert settings == [f"net.core.rmem_max = {RCVBUF}"]
    assert Path("/proc/sys/net/core/rmem_max").exists()  # the key names a real setting


def test_settings_file_has_every_documented_key(installed):
    s = settings(installed)
    assert set(s) == {
        "NAT64HO_LISTEN",
        "NAT64HO_ALLOW",
        "NAT64HO_METRICS",
        "NAT64HO_API",
        "NAT64HO_ARGS",
    }
    assert s["NAT64HO_LISTEN"].startswith("127.0.0.1:")
    assert s["NAT64HO_METRICS"].startswith("127.0.0.1:")
    assert s["NAT64HO_ALLOW"] == s["NAT64HO_ARGS"] == s["NAT64HO_API"] == ""
    conf = (installed / HOME / "install.conf").read_text()
    assert f"SOURCE={REPO}\n" in conf and "AUTO_UPDATE=no\n" in conf


def test_api_is_off_unless_asked_and_its_socket_directory_is_the_units(installed):
    unit = (installed / "etc/systemd/system/nat64ho.service").read_text()
    assert "\nRuntimeDirectory=nat64ho\nRuntimeDirectoryMode=0750\n" in unit
    run("--root", installed, "--api")
    assert settings(installed)["NAT64HO_API"] == "unix:/run/nat64ho/api.sock"
    run("--root", installed, "--no-api")
    assert settings(installed)["NAT64HO_API"] == ""


def test_directories_and_ownership(installed):
    _, _, uid, gid, *_ = passwd_entry(installed)
    home = installed / HOME
    for d in ("data", "logs"):
        assert stat.S_IMODE((home / d).stat().st_mode) == 0o750
    assert stat.S_IMODE(home.stat().st_mode) == 0o755
    if os.geteuid() != 0:
        pytest.skip("ownership is only set when install.sh runs as root")
    # The service writes its data and logs but cannot change its own code.
    assert ((home / "data").stat().st_uid, (home / "logs").stat().st_gid) == (int(uid), int(gid))
    assert (home.stat().st_uid, home.stat().st_gid) == (0, int(gid))
    assert (home / "venv").stat().st_uid == 0 and (home / "bin/nat64ho-update").stat().st_uid == 0
    release = home / "venv"
    assert {p.stat(follow_symlinks=False).st_uid for p in release.resolve().rglob("*")} == {0}


def test_dependencies_are_pinned_by_hash(installed):
    home = installed / HOME
    lines = [
        ln
        for ln in (home / "requirements.txt").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    wheels = sorted(p.name for p in (home / "wheels").iterdir())
    assert len(lines) == len(wheels) and any(ln.startswith("hatchling==") for ln in lines)
    for line in lines:
        assert "==" in line and " --hash=sha256:" in line, line
    assert not any(w.startswith("nat64ho-") for w in wheels)


# ---------------------------------------------------------------- settings


def test_check_config_answers_without_opening_anything(tmp_path):
    import sys

    db = tmp_path / "never.db"
    base = [sys.executable, "-m", "nat64ho", "serve", "--db", str(db), "--check-config"]
    good = subprocess.run(
        [*base, "--listen", "127.0.0.1:6464", "--allow", "192.0.2.0/24"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert good.returncode == 0 and good.stdout == "ok: the options are valid\n", good.stderr
    bad = subprocess.run(
        [*base, "--listen", "localhost:6464"], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode == 2
    assert bad.stderr == "Error: --listen 'localhost:6464': 'localhost' is not an IP address\n"
    assert not db.exists() and list(tmp_path.iterdir()) == []


def test_bad_setting_is_refused_before_a_working_install_changes(installed):
    home = installed / HOME
    env = installed / "etc/default/nat64ho"
    unit = installed / "etc/systemd/system/nat64ho.service"
    before = (env.read_bytes(), os.readlink(home / "venv"), unit.read_bytes())
    releases = sorted((home / "releases").iterdir())
    bad = f"localhost:{free_port(socket.SOCK_DGRAM)}"
    proc = run("--root", installed, "--listen", bad, check=False)
    assert proc.returncode == 1
    # The refusal is nat64ho's own, in its words, naming the setting.
    assert f"Error: $NAT64HO_LISTEN '{bad}': 'localhost' is not an IP address" in proc.stderr
    assert "nothing that runs was changed" in proc.stderr
    assert (env.read_bytes(), os.readlink(home / "venv"), unit.read_bytes()) == before
    # An earlier test of the module may have left a previous release beside.
    assert sorted((home / "releases").iterdir()) == releases, "the refused build is gone"

    # The same for any `serve` option in NAT64HO_ARGS, as the unit splits it.
    env.write_text(
        env.read_text().replace("NAT64HO_ARGS=\n", "NAT64HO_ARGS=--min-idle 5 --sync sometimes\n")
    )
    edited = env.read_bytes()
    proc = run("--root", installed, check=False)
    assert proc.returncode == 1 and "Error: --sync 'sometimes'" in proc.stderr
    assert env.read_bytes() == edited and os.readlink(home / "venv") == before[1]
    env.write_bytes(before[0])


def test_fresh_tree_takes_free_ids_of_its_own_and_writes_nothing_on_a_bad_setting(open_tmp):
    root = new_root(open_tmp, "taken")
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text(
        "root:x:0:0::/root:/bin/sh\nsvc:x:999:999::/:/usr/sbin/nologin\n"
    )
    (root / "etc/group").write_text("root:x:0:\nsvc:x:999:\nother:x:998:\n")
    proc = run(
        "--root",
        root,
        "--listen",
        f"localhost:{free_port(socket.SOCK_DGRAM)}",
        "--metrics",
        "",
        check=False,
    )
    assert proc.returncode == 1 and "'localhost' is not an IP address" in proc.stderr
    # 999 and 998 are taken in the tree: 997 for both, in both files.
    assert ids(root) == (997, 997)
    assert "nat64ho:x:997:" in (root / "etc/group").read_text().splitlines()
    for never in (
        "etc/default/nat64ho",
        "etc/systemd/system/nat64ho.service",
        "etc/systemd/system/multi-user.target.wants",
        f"{HOME}/venv",
        "usr/local/bin/nat64ho",
    ):
        assert not (root / never).exists(), never


# ---------------------------------------------------------------- upgrades


def test_rerun_upgrades_in_place_and_keeps_data_and_settings(installed):
    home = installed / HOME
    env = installed / "etc/default/nat64ho"
    env.write_text(
        env.read_text().replace("NAT64HO_ALLOW=\n", "NAT64HO_ALLOW=192.0.2.0/24\n")
        + "# an operator's note\n"
    )
    edited = env.read_bytes()
    (home / "data/nat64ho.db").write_bytes(b"not really sqlite, but ours")
    (home / "logs/nat64ho.log").write_text("2019-03-18 10:06:28.436754 Initialized 192.0.2.7\n")

    out = run("--root", installed, "--log-keep", "30").stdout
    assert "Keeping the settings" in out
    assert env.read_bytes() == edited
    assert (home / "data/nat64ho.db").read_bytes() == b"not really sqlite, but ours"
    assert (home / "logs/nat64ho.log").read_text().endswith("Initialized 192.0.2.7\n")
    passwd_entry(installed)  # still exactly one account
    assert "\n    rotate 30\n" in (installed / "etc/logrotate.d/nat64ho").read_text()

    # Options given once are remembered; --listen edits only its own line.
    port = free_port(socket.SOCK_DGRAM)
    run("--root", installed, "--listen", f"127.0.0.1:{port}")
    assert "\n    rotate 30\n" in (installed / "etc/logrotate.d/nat64ho").read_text()
    assert settings(installed)["NAT64HO_LISTEN"] == f"127.0.0.1:{port}"
    assert settings(installed)["NAT64HO_ALLOW"] == "192.0.2.0/24"
    assert "# an operator's note" in env.read_text()


# ---------------------------------------------------------------- auto-update


def git(*args: str | Path, cwd: Path) -> str:
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.org",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.org",
    )
    return subprocess.run(
        ["git", *map(str, args)], cwd=cwd, check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def version(root: Path) -> str:
    return subprocess.run(
        [str(root / HOME / "venv/bin/python"), "-I", "-m", "nat64ho", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to build as the service user")
def test_auto_update_builds_as_the_service_user_and_refuses_unverified_code(
    installed, tmp_path, open_tmp
):
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    # upstream <- checkout, both clones of this repository's HEAD. Installing
    # from the checkout over the earlier install moves it there, as an
    # operator who re-clones elsewhere would.
    upstream, checkout, root = tmp_path / "upstream", tmp_path / "checkout", installed
    git("clone", "--quiet", REPO, upstream, cwd=tmp_path)
    git("clone", "--quiet", upstream, checkout, cwd=tmp_path)
    script = checkout / "install.sh"

    run("--root", root, "--auto-update", script=script)
    assert f"SOURCE={checkout}\n" in (root / HOME / "install.conf").read_text()
    dropin = (root / "etc/systemd/system/nat64ho.service.d/auto-update.conf").read_text()
    # '-' keeps a failed update from failing the start; '+' lets it switch the code.
    assert "ExecStartPre=-+/home/nat64ho/bin/nat64ho-update\n" in dropin
    updater = root / HOME / "bin/nat64ho-update"
    home = root / HOME
    uid, _ = ids(root)

    nothing = run("--root", root, script=updater)
    assert "up to date" in nothing.stderr

    # The new version records who runs it: only the service user may.
    seen = open_tmp / "runs"
    seen.mkdir(mode=0o1777)
    seen.chmod(0o1777)
    init = upstream / "nat64ho/__init__.py"
    init.write_text(
        init.read_text().replace('__version__ = "', '__version__ = "9.9.9+')
        + f"\nimport os as _os\nwith open('{seen}/uids', 'a') as _f:\n"
        "    _f.write(f'{_os.getuid()}\\n')\n"
    )
    git("commit", "--quiet", "-am", "a newer version", cwd=upstream)
    run("--root", root, script=updater)
    runs = (seen / "uids").read_text().split()
    assert runs and set(runs) == {str(uid)}, runs
    assert version(root).startswith("nat64ho 9.9.9+")
    assert git("rev-parse", "HEAD", cwd=upstream) in (home / "install.conf").read_text()
    good = os.readlink(home / "venv")

    def refused(why: str) -> None:
        proc = run("--root", root, script=updater, check=False)
        assert proc.returncode == 1, proc.stderr
        assert why in proc.stderr and "the installed version stays" in proc.stderr, proc.stderr
        assert os.readlink(home / "venv") == good
        assert version(root).startswith("nat64ho 9.9.9+")

    # Uncommitted changes, even by the checkout's owner, are never built.
    readme = checkout / "README.md"
    readme.write_text(readme.read_text() + "\nlocal edit\n")
    refused("has uncommitted changes")
    git("checkout", "--", "README.md", cwd=checkout)
    # Nor commits the upstream does not have.
    (checkout / "local.txt").write_text("mine\n")
    git("add", "local.txt", cwd=checkout)
    git("commit", "--quiet", "-m", "not pushed", cwd=checkout)
    refused("which its upstream")
    git("reset", "--quiet", "--hard", "HEAD~1", cwd=checkout)

    # A pinned wheel that no longer matches its hash stops the build.
    init.write_text(init.read_text().replace('"9.9.9+', '"9.9.10+'))
    git("commit", "--quiet", "-am", "another version", cwd=upstream)
    wheel = sorted((home / "wheels").glob("typer-*.whl"))[0]
    original = wheel.read_bytes()
    wheel.write_bytes(original + b"tampered")
    refused("pinned dependencies")
    wheel.write_bytes(original)

    # The upstream vanishes: the update fails, says so, and the code still runs.
    upstream.rename(tmp_path / "gone")
    refused("git pull --ff-only")

    # The choice is remembered until --no-auto-update.
    assert "AUTO_UPDATE=yes\n" in (home / "install.conf").read_text()
    (tmp_path / "gone").rename(upstream)
    run("--root", root, "--no-auto-update", script=script)
    assert not (root / "etc/systemd/system/nat64ho.service.d").exists()


def test_uninstall_keeps_data_then_purge_removes_it(installed):
    home = installed / HOME
    out = run("--root", installed, "--uninstall").stdout
    assert "Kept:" in out
    for gone in (
        "etc/systemd/system/nat64ho.service",
        "etc/logrotate.d/nat64ho",
        "etc/sysctl.d/60-nat64ho.conf",
        "etc/systemd/system/multi-user.target.wants/nat64ho.service",
        "usr/local/bin/nat64ho",
        f"{HOME}/venv",
        f"{HOME}/bin",
        f"{HOME}/install.conf",
        f"{HOME}/releases",
        f"{HOME}/wheels",
        f"{HOME}/requirements.txt",
    ):
        assert not (installed / gone).exists(), gone
    assert (home / "data/nat64ho.db").exists() and (home / "logs/nat64ho.log").exists()
    assert (installed / "etc/default/nat64ho").exists()
    passwd_entry(installed)

    refused = run("--root", installed, "--purge", check=False)
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert (home / "data/nat64ho.db").exists(), "an unconfirmed purge changes nothing"

    out = run("--root", installed, "--purge", "--yes").stdout
    # It says what it removes before removing it.
    assert out.index("removes") < out.index("Purged")
    assert str(home) in out and "etc/default/nat64ho" in out
    assert not home.exists() and not (installed / "etc/default/nat64ho").exists()
    assert "nat64ho:" not in (installed / "etc/passwd").read_text()
    assert "nat64ho:" not in (installed / "etc/group").read_text()


# ---------------------------------------------------------------- preconditions


def test_help_explains_options_and_layout():
    out = run("--help").stdout
    for word in (
        "--root",
        "--auto-update",
        "--uninstall",
        "--purge",
        "--listen",
        "--metrics",
        "--api",
        "/etc/default/nat64ho",
        "/home/nat64ho/logs",
        "systemctl status nat64ho",
    ):
        assert word in out


def test_unknown_option_fails():
    proc = run("--frobnicate", check=False)
    assert proc.returncode == 1 and "unknown option '--frobnicate'" in proc.stderr


def test_too_old_python_fails_before_changing_anything(tmp_path):
    fake = tmp_path / "python3.10"
    # Answers the version question like Python 3.10 and fails the real check.
    fake.write_text('#!/bin/sh\ncase "$*" in *version_info\\[*) echo 3.10; exit 0;; esac\nexit 1\n')
    fake.chmod(0o755)
    root = tmp_path / "root"
    root.mkdir()
    proc = run("--root", root, "--python", fake, *addresses(), check=False)
    assert proc.returncode == 1
    assert "nothing was changed" in proc.stderr
    assert f"nat64ho needs Python 3.11 or newer; found: {fake} 3.10" in proc.stderr
    assert tree(root) == []


def test_an_image_in_a_private_directory_ignores_the_build_hosts_ports():
    # mktemp -d makes 0700 directories: the service user, which builds the
    # release, cannot enter the tree. And the image runs on another host, so
    # a port busy here says nothing about it.
    base = Path(tempfile.mkdtemp(prefix="nat64ho-private-"))
    scratch_before = set(Path("/var/tmp").glob("nat64ho-build.*"))
    try:
        assert stat.S_IMODE(base.stat().st_mode) == 0o700
        root = base / "root"
        root.mkdir()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            busy = f"127.0.0.1:{s.getsockname()[1]}"
            proc = run("--root", root, "--listen", busy, "--metrics", "", check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Permission denied" not in proc.stderr
        assert settings(root)["NAT64HO_LISTEN"] == busy
        venv = root / HOME / "venv"
        out = subprocess.run(
            [venv / "bin/python", "-I", "-m", "nat64ho", "--version"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0 and out.stdout.startswith("nat64ho "), out.stderr
        # Built elsewhere, it names the paths of the booted tree only.
        for script in (venv / "bin").iterdir():
            if script.is_file() and not script.is_symlink():
                text = script.read_bytes()
                assert str(base).encode() not in text and b"nat64ho-build." not in text, script
                if text.startswith(b"#!"):
                    assert text.startswith(b"#!/home/nat64ho/releases/"), (script, text[:80])
        assert str(base) not in (venv / "pyvenv.cfg").read_text()
        assert set(Path("/var/tmp").glob("nat64ho-build.*")) == scratch_before
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_nobody() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_without_root_the_real_install_refuses(tmp_path):
    proc = subprocess.run(
        [*as_nobody(), "bash", str(INSTALL)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "must run as root (sudo ./install.sh), or use --root DIR" in proc.stderr
    assert "nothing was changed" in proc.stderr
    proc = subprocess.run(
        [*as_nobody(), "bash", str(INSTALL), "--purge", "--yes"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "must run as root" in proc.stderr


@pytest.mark.skipif(
    os.path.isdir("/run/systemd/system"),
    reason="systemd is running here: the real install would go ahead",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to get past the root check")
def test_without_systemd_the_real_install_refuses():
    had_user = subprocess.run(["getent", "passwd", "nat64ho"], capture_output=True).returncode == 0
    proc = run(check=False)
    assert proc.returncode == 1
    assert "systemd is not running on this host" in proc.stderr
    has_user = subprocess.run(["getent", "passwd", "nat64ho"], capture_output=True).returncode == 0
    assert has_user == had_user
    assert not Path("/etc/systemd/system/nat64ho.service").exists() or had_user


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    proc = subprocess.run(
        ["shellcheck", str(INSTALL), str(REPO / "contrib/nat64ho-update")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

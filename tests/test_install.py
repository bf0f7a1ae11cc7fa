"""install.sh, exercised through its --root mode: layout, idempotent upgrades,
--auto-update, uninstall/purge, and the precondition checks that must fail
before anything is changed. The real (systemd) path is reviewed by hand; see
README "Installing"."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "install.sh"
HOME = "home/nat64ho"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def run(*args: str | Path, check: bool = True, script: Path = INSTALL, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(script), *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"{script.name} {' '.join(map(str, args))} exited {proc.returncode}:\n"
                    f"{proc.stdout}\n{proc.stderr}")
    return proc


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def addresses() -> list[str]:
    return ["--listen", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
            "--metrics", f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"]


def settings(root: Path) -> dict[str, str]:
    out = {}
    for line in (root / "etc/default/nat64ho").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def passwd_entry(root: Path) -> list[str]:
    lines = [l for l in (root / "etc/passwd").read_text().splitlines() if l.startswith("nat64ho:")]
    assert len(lines) == 1, lines
    return lines[0].split(":")


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    run("--root", root, *addresses())
    return root


# ---------------------------------------------------------------- layout

def test_user_is_recorded_as_a_system_account(installed):
    name, _, uid, gid, _, home, shell = passwd_entry(installed)
    assert (name, home, shell) == ("nat64ho", "/home/nat64ho", "/usr/sbin/nologin")
    assert 100 <= int(uid) <= 999
    assert f"nat64ho:x:{gid}:" in (installed / "etc/group").read_text().splitlines()


def test_venv_runs_nat64ho(installed):
    nat64ho = installed / HOME / "venv/bin/nat64ho"
    out = subprocess.run([str(nat64ho), "--help"], capture_output=True, text=True, check=True).stdout
    assert "serve" in out
    # uvloop is a dependency on Linux: the service gets the fast loop.
    subprocess.run([str(installed / HOME / "venv/bin/python"), "-c", "import uvloop"], check=True)


def test_unit_logrotate_and_updater_come_from_contrib(installed):
    assert (installed / "etc/systemd/system/nat64ho.service").read_bytes() == \
        (REPO / "contrib/nat64ho.service").read_bytes()
    assert (installed / HOME / "bin/nat64ho-update").read_bytes() == \
        (REPO / "contrib/nat64ho-update").read_bytes()
    rotate = (installed / "etc/logrotate.d/nat64ho").read_text()
    assert "\n    rotate 180\n" in rotate
    assert not (installed / "etc/systemd/system/nat64ho.service.d").exists(), "auto-update is off by default"


def test_settings_file_has_every_documented_key(installed):
    s = settings(installed)
    assert set(s) == {"NAT64HO_LISTEN", "NAT64HO_ALLOW", "NAT64HO_METRICS", "NAT64HO_ARGS"}
    assert s["NAT64HO_LISTEN"].startswith("127.0.0.1:")
    assert s["NAT64HO_METRICS"].startswith("127.0.0.1:")
    assert s["NAT64HO_ALLOW"] == s["NAT64HO_ARGS"] == ""
    conf = (installed / HOME / "install.conf").read_text()
    assert f"SOURCE={REPO}\n" in conf and "AUTO_UPDATE=no\n" in conf


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


# ---------------------------------------------------------------- upgrades

def test_rerun_upgrades_in_place_and_keeps_data_and_settings(installed):
    home = installed / HOME
    env = installed / "etc/default/nat64ho"
    env.write_text(env.read_text().replace("NAT64HO_ALLOW=\n", "NAT64HO_ALLOW=192.0.2.0/24\n")
                   + "# an operator's note\n")
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
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")
    return subprocess.run(["git", *map(str, args)], cwd=cwd, check=True, capture_output=True,
                          text=True, env=env).stdout.strip()


def version(root: Path) -> str:
    return subprocess.run([str(root / HOME / "venv/bin/nat64ho"), "--version"], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_auto_update_pulls_reinstalls_and_survives_a_failed_update(installed, tmp_path):
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
    # '-' keeps a failed update from failing the start; '+' lets it write the code.
    assert "ExecStartPre=-+/home/nat64ho/bin/nat64ho-update\n" in dropin
    updater = root / HOME / "bin/nat64ho-update"
    home = root / HOME

    nothing = run(home, script=updater)
    assert "up to date" in nothing.stderr

    init = upstream / "nat64ho/__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.9.9+'))
    git("commit", "--quiet", "-am", "a newer version", cwd=upstream)
    run(home, script=updater)
    assert version(root).startswith("nat64ho 9.9.9+")
    assert git("rev-parse", "HEAD", cwd=upstream) in (home / "install.conf").read_text()

    # The upstream vanishes: the update fails, says so, and the code still runs.
    upstream.rename(tmp_path / "gone")
    failed = run(home, script=updater, check=False)
    assert failed.returncode != 0 and "the installed version stays" in failed.stderr
    assert version(root).startswith("nat64ho 9.9.9+")

    # The choice is remembered until --no-auto-update.
    assert "AUTO_UPDATE=yes\n" in (home / "install.conf").read_text()
    (tmp_path / "gone").rename(upstream)
    run("--root", root, "--no-auto-update", script=script)
    assert not (root / "etc/systemd/system/nat64ho.service.d").exists()


def test_uninstall_keeps_data_then_purge_removes_it(installed):
    home = installed / HOME
    out = run("--root", installed, "--uninstall").stdout
    assert "Kept:" in out
    for gone in ("etc/systemd/system/nat64ho.service", "etc/logrotate.d/nat64ho",
                 f"{HOME}/venv", f"{HOME}/bin", f"{HOME}/install.conf"):
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
    for word in ("--root", "--auto-update", "--uninstall", "--purge", "--listen", "--metrics",
                 "/etc/default/nat64ho", "/home/nat64ho/logs", "systemctl status nat64ho"):
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


def test_busy_port_fails_before_changing_anything(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        busy = f"127.0.0.1:{s.getsockname()[1]}"
        proc = run("--root", root, "--listen", busy, check=False)
    assert proc.returncode == 1
    assert f"listen address: cannot bind UDP {busy}: Address already in use" in proc.stderr
    assert tree(root) == []


def as_nobody() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_without_root_the_real_install_refuses(tmp_path):
    proc = subprocess.run([*as_nobody(), "bash", str(INSTALL)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode == 1
    assert "must run as root (sudo ./install.sh), or use --root DIR" in proc.stderr
    assert "nothing was changed" in proc.stderr
    proc = subprocess.run([*as_nobody(), "bash", str(INSTALL), "--purge", "--yes"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode == 1 and "must run as root" in proc.stderr


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"),
                    reason="systemd is running here: the real install would go ahead")
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
    proc = subprocess.run(["shellcheck", str(INSTALL), str(REPO / "contrib/nat64ho-update")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""The operator files in contrib/ checked by the tools that will read them:
systemd-analyze for the unit, logrotate for the rotation config. Each test
runs only where its tool is installed (CI installs them)."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
UNIT = CONTRIB / "nat64ho.service"
LOGROTATE = CONTRIB / "logrotate/nat64ho"
NAT64HO = "/home/nat64ho/venv/bin/nat64ho"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
needs_logrotate = pytest.mark.skipif(
    shutil.which("logrotate") is None, reason="logrotate is not installed"
)


def unit_with_real_binary(tmp_path: Path) -> Path:
    """The unit, its ExecStart pointed at an executable that exists here, so
    that verify judges the unit rather than this machine's missing install."""
    fake = tmp_path / "nat64ho"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = UNIT.read_text()
    assert NAT64HO in text
    copy = tmp_path / "nat64ho.service"
    copy.write_text(text.replace(NAT64HO, str(fake)))
    return copy


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_has_the_promised_settings():
    d = directives(UNIT.read_text())
    for key, value in {
        "Type": "notify",
        "User": "nat64ho",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "EnvironmentFile": "-/etc/default/nat64ho",
    }.items():
        assert d.get(key) == [value], key
    assert "@system-service" in d["SystemCallFilter"]
    assert d["WatchdogSec"] and d["LimitNOFILE"]
    # Writable: exactly the directories the ExecStart paths live in.
    assert d["ReadWritePaths"] == ["/home/nat64ho/data /home/nat64ho/logs"]
    exec_start = d["ExecStart"][0]
    assert (
        "--db /home/nat64ho/data/" in exec_start and "--log-file /home/nat64ho/logs/" in exec_start
    )


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path):
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit_with_real_binary(tmp_path))],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


@needs_systemd_analyze
def test_systemd_analyze_verify_catches_a_bad_unit(tmp_path):
    # verify exits 0 on a directive it ignores and only says so on stderr,
    # which is why the check above also wants stderr empty.
    unit = unit_with_real_binary(tmp_path)
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert "Failed to parse service type" in proc.stderr


@needs_systemd_analyze
def test_sandbox_exposure_stays_low(tmp_path):
    # systemd's own scoring of the sandbox, 0 (locked down) to 10; the unit
    # scores about 1.4. --threshold is in tenths.
    unit = unit_with_real_binary(tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
    )
    if "unrecognized option" in proc.stderr:
        pytest.skip("this systemd-analyze has no offline security check")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr


def local_config(tmp_path: Path, postrotate: str) -> Path:
    """The config with its path, owner and postrotate pointed at tmp_path."""
    log = tmp_path / "logs/nat64ho.log"
    log.parent.mkdir()
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    text = LOGROTATE.read_text()
    text = text.replace("/home/nat64ho/logs/nat64ho.log", str(log))
    text = text.replace("create 0640 nat64ho nat64ho", f"create 0640 {user} {group}")
    text = text.replace("su nat64ho nat64ho", f"su {user} {group}")
    text, n = re.subn(
        r"(?m)^(\s*)systemctl kill --signal=HUP nat64ho\.service.*$", rf"\g<1>{postrotate}", text
    )
    assert n == 1
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text)
    conf.chmod(0o644)
    return conf


@needs_logrotate
def test_logrotate_config_parses(tmp_path):
    conf = local_config(tmp_path, "true")
    (tmp_path / "logs/nat64ho.log").write_text("line\n")
    proc = subprocess.run(
        ["logrotate", "-d", "-s", str(tmp_path / "state"), str(conf)],
        capture_output=True,
        text=True,
    )
    out = proc.stdout + proc.stderr
    # logrotate -d exits 0 on unknown directives; their "error:" lines count.
    assert proc.returncode == 0 and "error" not in out.lower(), out
    assert "after 1 days (180 rotations)" in out


@needs_logrotate
def test_logrotate_rotates_by_create_and_signals(tmp_path):
    marker = tmp_path / "hup"
    conf = local_config(tmp_path, f"touch {marker}")
    log = tmp_path / "logs/nat64ho.log"
    state = tmp_path / "state"
    for day in (1, 2):
        log.write_text(f"day {day}\n")
        proc = subprocess.run(
            ["logrotate", "-f", "-s", str(state), str(conf)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert marker.exists(), "postrotate (the SIGHUP) did not run"
        marker.unlink()
        # create: a new empty file in place, with the promised mode.
        assert log.exists() and log.read_text() == ""
        assert oct(log.stat().st_mode & 0o777) == "0o640"
    # delaycompress: the newest rotated file stays plain for a server that
    # has not reopened yet; older ones are compressed.
    assert (tmp_path / "logs/nat64ho.log.1").read_text() == "day 2\n"
    assert (tmp_path / "logs/nat64ho.log.2.gz").exists()
    assert "copytruncate" not in LOGROTATE.read_text().replace("Never copytruncate", "")

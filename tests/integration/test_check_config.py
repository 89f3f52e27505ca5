"""``jit-proxy check-config``: the example passes; each kind of mistake names key path and line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "jit-proxy.example.yaml"


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_the_example_config_is_valid():
    r = check(EXAMPLE)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("old,new,path,needle", [
    ("  listen_port: 2222", "  listen_port: 2222\n  listen_porrt: 22", "ssh.listen_porrt",
     "listen_porrt"),
    ("  listen_port: 2222", "  listen_port: twenty", "ssh.listen_port", "listen_port: twenty"),
    ("    max_duration: 4h", "    max_duration: 4 hours", "policies[0].max_duration",
     "max_duration: 4 hours"),
    ("    targets: [web1]", "    targets: [web9]", "policies[0].targets[0]", "targets: [web9]"),
    ('      - "group:sre"', '      - "group:nope"', "policies[0].approvers[0]", "group:nope"),
])
def test_each_kind_of_mistake_names_key_path_and_line(tmp_path, old, new, path, needle):
    text = EXAMPLE.read_text()
    assert old in text, f"example no longer contains {old!r}"
    bad = text.replace(old, new, 1)
    f = tmp_path / "bad.yaml"
    f.write_text(bad)
    r = check(f)
    assert r.returncode == 1
    line = _line_of(bad, needle)
    assert re.search(rf"^{re.escape(str(f))}:{line}: {re.escape(path)}: ", r.stderr, re.M), r.stderr


def test_the_file_may_be_given_without_c_and_a_missing_default_says_to_give_one(tmp_path):
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(EXAMPLE)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and f"{EXAMPLE}: ok" in r.stdout, r.stderr
    for other in (tmp_path / "other.yaml", "/etc/jit-proxy/jit-proxy.yaml"):  # two files
        r = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(EXAMPLE),
                            "-c", str(other)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "takes one file" in r.stderr, other
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config",  # one file, twice
                        "./jit-proxy.example.yaml", "-c", "jit-proxy.example.yaml"],
                       capture_output=True, text=True, timeout=60, cwd=EXAMPLE.parent)
    assert r.returncode == 0, r.stderr
    if not os.path.exists("/etc/jit-proxy/jit-proxy.yaml"):
        for argv in (["check-config"], ["status"], ["audit", "verify"]):
            r = subprocess.run([sys.executable, "-m", "proxy.cli", *argv], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 1, argv
            assert "give the configuration with -c FILE" in r.stderr, (argv, r.stderr)
        r = subprocess.run([sys.executable, "-m", "proxy.cli", "status", "-c",  # named: no hint
                            "/etc/jit-proxy/jit-proxy.yaml"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1 and "give the configuration" not in r.stderr, r.stderr


def test_unreadable_and_non_yaml_files(tmp_path):
    r = check(tmp_path / "missing.yaml")
    assert r.returncode == 1 and "cannot read" in r.stderr
    f = tmp_path / "broken.yaml"
    f.write_text("users:\n  alice: [\n")
    r = check(f)
    assert r.returncode == 1 and re.search(r"broken\.yaml:\d+: not valid YAML", r.stderr)


def test_roles_reaching_every_database_are_warned_about(tmp_path):
    text = EXAMPLE.read_text().replace("read: [orders_reader]", "read: [pg_read_all_data]")
    f = tmp_path / "broad.yaml"
    f.write_text(text)
    r = check(f)
    assert r.returncode == 0  # valid, but
    line = _line_of(text, "read: [pg_read_all_data]")
    assert f"{f}:{line}: targets.orders.roles.read[0]: warning: pg_read_all_data reaches every " \
           f"database" in r.stderr


def test_requests_nobody_may_approve_and_an_unreadable_admin_password_are_warned_about(tmp_path):
    text = EXAMPLE.read_text().replace("    approvals: 1", "    approvals: 3", 1)
    password = tmp_path / "orders-admin.password"
    text = text.replace("/etc/jit-proxy/orders-admin.password", str(password))
    f = tmp_path / "stuck.yaml"
    f.write_text(text)
    r = check(f)
    assert r.returncode == 0  # valid, but
    assert re.search(rf"^{re.escape(str(f))}:\d+: policies\[0\]\.approvers: warning: requests "
                     rf"of \S.* need 3 approver\(s\) other than the requester, but only .* may "
                     rf"approve$", r.stderr, re.M), r.stderr
    line = _line_of(text, str(password))
    assert (f"{f}:{line}: targets.orders.admin.password_file: warning: {password}: cannot "
            f"read: No such file or directory" in r.stderr), r.stderr
    os.mkfifo(password)  # never opened (it would block check-config)
    r = check(f)
    assert f"password_file: warning: {password}: not a regular file" in r.stderr, r.stderr
    password.unlink()
    password.write_text("secret\n")
    password.chmod(0o644)  # a secret others may read: an error, as libpq says of a .pgpass
    r = check(f)
    assert r.returncode != 0
    assert (f"{f}:{line}: targets.orders.admin.password_file: {password} is accessible by "
            f"group or others (mode 0644); run 'chmod 600 {password}'" in r.stderr), r.stderr
    password.chmod(0o600)
    r = check(f)
    assert r.returncode == 0 and "password_file" not in r.stderr, r.stderr


def test_an_admin_group_missing_on_this_host_is_warned_about(tmp_path):
    text = EXAMPLE.read_text()
    f = tmp_path / "admin.yaml"
    for group, warned in (("no-such-group-here", True), ("root", False)):
        f.write_text(text + f"\ndaemon:\n  admin_group: {group}\n"
                     if "\ndaemon:" not in text else
                     re.sub(r"(?m)^  admin_group: .*$", f"  admin_group: {group}", text))
        r = check(f)
        assert r.returncode == 0, r.stderr  # valid, but
        line = _line_of(f.read_text(), f"admin_group: {group}")
        assert (f"{f}:{line}: daemon.admin_group: warning: no group {group!r} on this host: "
                f"only root could use the admin socket" in r.stderr) is warned, r.stderr


def test_requesters_the_policy_approves_by_itself_are_not_warned_about(tmp_path):
    text = EXAMPLE.read_text().replace("    approvals: 1", "    approvals: 3", 1)
    text = text.replace('    allow:\n', '    auto_approve:\n      requesters: ["group:dev"]\n'
                                          '    allow:\n', 1)
    f = tmp_path / "auto.yaml"
    f.write_text(text)
    r = check(f)
    assert r.returncode == 0 and "approvers: warning" not in r.stderr, r.stderr

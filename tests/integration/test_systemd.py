"""Running under systemd: the unit file verifies, and the daemon speaks sd_notify(3)."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    exe = shutil.which("jit-proxy", path=f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin")
    assert exe, "jit-proxy is not installed"
    unit = tmp_path / "jit-proxy.service"
    unit.write_text((ROOT / "systemd" / "jit-proxy.service").read_text()
                    .replace("/usr/local/bin/jit-proxy", exe))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # systemd-analyze exits 0 even on unknown keys; those go to stderr
    text = unit.read_text()
    for directive in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID",
                      "Restart=on-failure", "StateDirectory=", "LogsDirectory=",
                      "RuntimeDirectory=", "ConfigurationDirectory=", "LoadCredential=",
                      "ProtectSystem=strict", "NoNewPrivileges=yes", "SystemCallFilter="):
        assert directive in text, directive


def test_sysusers_entry_is_valid():
    r = subprocess.run(["systemd-sysusers", "--dry-run",
                        str(ROOT / "systemd" / "jit-proxy.sysusers")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "jit-proxy" in r.stdout + r.stderr


def test_ready_only_when_listening_then_watchdog_then_stopping(pg_env, tmp_path):
    env = pg_env
    env.stop()
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "-c",
                             str(env.config_path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000",
                                 "PATH": "/usr/bin:/bin"})
    try:
        first = sock.recv(4096).decode()
        assert "READY=1" in first, first
        ssh_port = int(re.search(r"SSH on 127\.0\.0\.1:(\d+)", first).group(1))
        pg_port = int(re.search(r"PostgreSQL on port (\d+)", first).group(1))
        for port in (ssh_port, pg_port):  # both listeners accept by the time READY=1 is sent
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        t0 = time.monotonic()
        pings = 0
        while pings < 3:
            if "WATCHDOG=1" in sock.recv(4096).decode():
                pings += 1
        assert time.monotonic() - t0 < 2.5  # every 0.5 s for a 1 s WatchdogSec
        proc.send_signal(signal.SIGTERM)
        seen = ""
        while "STOPPING=1" not in seen:
            seen += sock.recv(4096).decode()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
        env.start()

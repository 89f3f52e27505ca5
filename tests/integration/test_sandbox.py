"""The README's quick start and walkthrough, run as written against ``jit-proxy sandbox``."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
README_DIR = "/tmp/jit-sandbox"


def _block_after(marker: str) -> str:
    start = README.index(marker)
    m = re.compile(r"```sh\n(.*?)```", re.S).search(README, start)
    assert m, f"no sh block after {marker!r}"
    return m.group(1)


def quick_start_commands() -> list[str]:
    block = _block_after("## Quick start")
    return [line.split("#")[0].strip() for line in block.splitlines()
            if line.split("#")[0].strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert "jit-proxy sandbox --dir" in commands[0]
    assert commands[1] == "tests/run"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec tests/run\b", ci, re.M), ci
    assert os.access(ROOT / "tests" / "run", os.X_OK)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


@pytest.fixture
def sandbox(tmp_path):
    d = tmp_path / "jit-sandbox"
    sandbox_cmd = quick_start_commands()[0].split("&&")[-1].strip().replace(README_DIR, str(d))
    assert sandbox_cmd.startswith("jit-proxy sandbox")
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    assert shutil.which("jit-proxy", path=env["PATH"]), "jit-proxy is not installed on PATH"
    proc = subprocess.Popen(shlex.split(sandbox_cmd), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while not (d / "sandbox.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.terminate()
            pytest.fail(f"sandbox did not start: {proc.stdout.read().decode()}")
        time.sleep(0.1)
    yield d, proc, env
    if proc.poll() is None:  # SIGTERM, so the sandbox stops its sshd too
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_sandbox_walkthrough_as_written_then_sigterm_leaves_nothing(sandbox):
    d, proc, env = sandbox
    info = json.loads((d / "sandbox.json").read_text())
    assert {"ssh_config", "proxy_port", "target", "login"} <= info.keys()
    assert info["target"] == "web1"
    script = _block_after("<!-- walkthrough").replace(README_DIR, str(d))
    r = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120, env=env)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    out = r.stdout
    assert "request 1 created" in out
    assert "request 1 approved: grant 1" in out
    assert "hash chain intact" in out
    assert "request 2 approved: grant 2 gives alice read@orders" in out
    assert re.search(r"^\s*2 \| globex\s*$", out, re.M) and "initech" in out, out  # psql
    assert "web1" in out  # from `targets`
    assert re.search(rf"1\s+active\s+alice\s+{info['login']}@web1", out), out
    deadline = time.monotonic() + 10
    while True:  # df/uptime (exec), scp (sftp subsystem since OpenSSH 9), the shell
        events = [json.loads(line)
                  for line in (d / "state" / "audit.jsonl").read_text().splitlines()]
        kinds = {e.get("kind") for e in events if e["type"] == "ssh.session.end"}
        if {"exec", "subsystem", "shell"} <= kinds or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert {"exec", "subsystem", "shell"} <= kinds, kinds

    # a second sandbox on the same directory refuses before it touches anything there
    before = {str(p): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()
              and p.suffix not in (".jsonl", ".db", ".db-wal", ".db-shm", ".cast")
              and "pg" not in p.relative_to(d).parts[:1]}
    r = subprocess.run(["jit-proxy", "sandbox", "--dir", str(d)], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, timeout=60, env=env)
    assert r.returncode == 1
    assert f"--dir {d} is in use by another jit-proxy (pid {proc.pid})" in r.stderr, r.stderr
    assert {str(p): p.stat().st_mtime_ns for p in d.rglob("*") if str(p) in before} == before

    r = subprocess.run(["jit-proxy", "status", "-c", str(d / "jit-proxy.yaml")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and "alice" in r.stdout, r.stderr  # the operator line works
    sshd_pid = int((d / "target" / "sshd.pid").read_text())
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    assert f"Operator:   jit-proxy status -c {d / 'jit-proxy.yaml'}" in out, out
    assert "sandbox stopped" in out
    time.sleep(0.2)
    assert not Path(f"/proc/{sshd_pid}").exists()
    assert _processes_mentioning(str(d)) == []
    if info.get("pg_data"):
        assert _processes_mentioning(info["pg_data"]) == []

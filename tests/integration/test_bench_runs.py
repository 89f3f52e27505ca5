"""The README's bench command runs and writes its results: a tiny run of the SSH parts (no speed is
judged here; the bench measures, tests never time anything)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_ssh_parts_write_every_path_and_ratio(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench", "--only", "ssh,latency", "--rounds", "1",
                        "--size-mib", "2", "--echo-samples", "5", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "RESULTS-latency-ssh.json").read_text())
    assert data["args"] == {"only": "ssh,latency", "rounds": 1, "size_mib": 2,
                            "echo_samples": 5, "profile": None}
    rows = {row["metric"]: row for row in data["rows"]}
    for metric in ("connection setup (ssh -J … true)", "bulk up 2 MiB (cat > /dev/null)",
                   "bulk down 2 MiB (head -c)", "pty 1-byte echo p50"):
        med = rows[metric]["median"]
        assert set(med) == {"jit-proxy", "openssh-jump", "direct"}, metric
        assert all(v > 0 and math.isfinite(v) for v in med.values()), (metric, med)
        assert set(rows[metric]["ratio_jit_proxy_over"]) == {"openssh-jump", "direct"}
    cpu = rows["relay CPU per GiB down"]["median"]
    assert set(cpu) == {"jit-proxy", "openssh-jump"} and cpu["jit-proxy"] > 0
    md = (tmp_path / "RESULTS-latency-ssh.md").read_text()
    assert "| ssh | bulk up 2 MiB (cat > /dev/null) | MiB/s | higher |" in md
    assert "pg_seconds" not in md  # only the arguments of the parts that ran


def test_the_relay_floor_runs_and_prints_its_figures():
    r = subprocess.run([sys.executable, "-m", "bench.floor", "--mib", "8"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.match(r"relay floor: ([0-9.]+) s CPU per GiB .* 8 MiB in", r.stdout)
    assert m and float(m.group(1)) > 0, r.stdout  # (every packet came through: else it fails)


def test_bench_pg_part_writes_every_path(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench", "--only", "pg", "--rounds", "1",
                        "--pg-seconds", "1", "--pg-scale", "1", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["metric"]: row for row in
            json.loads((tmp_path / "RESULTS-pg.json").read_text())["rows"]}
    for metric in ("pgbench -S (8 clients, 2 threads)",
                   "pgbench -S -C (8 clients, 2 threads, connect per transaction)"):
        med = rows[metric]["median"]
        assert set(med) == {"jit-proxy", "pgbouncer", "direct"}, metric
        assert all(v > 0 and math.isfinite(v) for v in med.values()), (metric, med)
    cpu = rows["relay CPU per pgbench -S transaction"]["median"]
    assert set(cpu) == {"jit-proxy", "pgbouncer"} and cpu["jit-proxy"] > 0


def test_the_pg_relay_floor_runs_against_pgbouncer():
    r = subprocess.run([sys.executable, "-m", "bench.floor", "--pg", "--seconds", "1",
                        "--rounds", "1", "--scale", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("bare relay", "pgbouncer"):  # pgbench ran through each and transactions came
        m = re.search(rf"^{name}: (\d+) TPS, ([0-9.]+) µs CPU", r.stdout, re.M)
        assert m and int(m.group(1)) > 0, r.stdout
    assert re.search(r"^pg relay floor: [0-9.]+x pgbouncer", r.stdout, re.M), r.stdout

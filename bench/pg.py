"""PostgreSQL measurements with stock pgbench: jit-proxy vs pgbouncer vs direct.

What it is for: ``pgbench -S`` (select-only, 8 clients, 2 threads) and ``pgbench -S -C`` (a new
connection for every transaction) against the same cluster through jit-proxy (TLS from the client,
SCRAM with the grant's one-time secret, TLS verify-full upstream as the grant's ephemeral role,
every statement audited), through pgbouncer (session pooling; TLS required from the client, TLS
verify-full to the server, SCRAM) and direct (TLS required, SCRAM), alternately, ``rounds`` times,
in TPS (pgbench's figure without the initial connection time for -S, with it for -C).

What it must not do: write to the database (the grant's role reads only), or assert anything.
"""

from __future__ import annotations

import os
import re
import subprocess

from bench.env import PG_DB, PG_PASSWORD, PG_USER, BenchEnv
from bench.stats import Results

PEERS = ["jit-proxy", "pgbouncer", "direct"]


def conn_env(env: BenchEnv, peer: str, secret: str) -> tuple[dict, list[str]]:
    assert env.pg is not None
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if peer == "jit-proxy":
        return ({**base, "PGPASSWORD": secret, "PGSSLMODE": "verify-full",
                 "PGSSLROOTCERT": str(env.d / "jit-ca.pem")},
                ["-h", "127.0.0.1", "-p", str(env.pg_port), "-U", "alice", PG_DB])
    port = env.pg.bouncer_port if peer == "pgbouncer" else env.pg.port
    return ({**base, "PGPASSWORD": PG_PASSWORD, "PGSSLMODE": "require"},
            ["-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, PG_DB])


def run_pgbench(target: list[str], environ: dict, seconds: int, connect_each: bool = False,
                clients: int = 8, threads: int = 2, via: str = "") -> tuple[float, int]:
    """One ``pgbench -S`` run of ``seconds`` against ``target`` (its -h, -p, -U and database
    arguments) with ``environ``: (TPS, transactions done). Raises RuntimeError, naming ``via``,
    when pgbench fails or prints no TPS."""
    argv = ["pgbench", "-n", "-S", "-c", str(clients), "-j", str(threads), "-T", str(seconds)]
    if connect_each:
        argv.append("-C")
    r = subprocess.run(argv + target, env=environ, capture_output=True, text=True,
                       timeout=seconds + 120)
    m = re.search(r"tps = ([\d.]+) \((without|excluding)", r.stdout) or \
        re.search(r"tps = ([\d.]+)", r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"pgbench via {via} failed: {r.stderr.strip()[-1000:]}")
    done = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
    return float(m.group(1)), int(done.group(1)) if done else 0


def pgbench(env: BenchEnv, peer: str, secret: str, seconds: int, connect_each: bool,
            clients: int = 8, threads: int = 2, cpu: dict | None = None) -> float:
    """pgbench's TPS through ``peer``; with ``cpu``, also appends to ``cpu[peer]`` the CPU
    microseconds the relay (jit-proxy or pgbouncer) spent per transaction."""
    e, target = conn_env(env, peer, secret)
    with env.relay_cpu(peer) as meter:
        tps, done = run_pgbench(target, e, seconds, connect_each, clients, threads, via=peer)
    if cpu is not None and meter is not None and done:
        cpu.setdefault(peer, []).append(meter.used / done * 1e6)
    return tps


def run(env: BenchEnv, results: Results, rounds: int, seconds: int) -> None:
    secret = env.db_login("alice")
    s_tps = {p: [] for p in PEERS}
    c_tps = {p: [] for p in PEERS}
    s_cpu: dict[str, list[float]] = {}
    for r in range(rounds):
        for p in PEERS:
            s_tps[p].append(pgbench(env, p, secret, seconds, connect_each=False, cpu=s_cpu))
        for p in PEERS:
            c_tps[p].append(pgbench(env, p, secret, seconds, connect_each=True))
        last = "; ".join(f"{p} {s_tps[p][-1]:.0f} / {c_tps[p][-1]:.1f}" for p in PEERS)
        print(f"bench: pg round {r + 1}/{rounds} (TPS -S / -C): {last}", flush=True)
    results.add("pg", "pgbench -S (8 clients, 2 threads)", "TPS", "higher", s_tps,
                f"{seconds} s runs, scale {env.pg.scale if env.pg else '?'}")
    results.add("pg", "relay CPU per pgbench -S transaction", "µs", "lower", s_cpu,
                "CPU (user + system) of the jit-proxy or pgbouncer process only")
    results.add("pg", "pgbench -S -C (8 clients, 2 threads, connect per transaction)", "TPS",
                "higher", c_tps, f"{seconds} s runs")

"""Scale: idle sessions held by one proxy process, and whether the rest holds meanwhile.

What it is for: measuring SSH setup, pty echo latency and (with PostgreSQL) pgbench -S through
jit-proxy first with nothing else open, then opening N idle SSH sessions through the proxy (each
its own jump connection with one exec session on the target) and N idle PostgreSQL connections,
reading the RSS of a freshly restarted proxy before and after each batch (KiB per session), and measuring the same
figures again with all of them open.

What it must not do: leave the idle sessions open after it is done.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time

from bench import pg as pgbench
from bench import ssh as sshbench
from bench.clients import Clients, gather_limited
from bench.env import BenchEnv
from bench.stats import Results, median, percentile


def _figures(env: BenchEnv, rounds: int, echo: int) -> dict:
    setup = [sshbench.setup_once(env, "jit-proxy") for _ in range(rounds)]
    lat = []
    for _ in range(rounds):
        lat += sshbench.echo_latency(env, "jit-proxy", echo)
    out = {"setup_s": median(setup), "echo_p50_ms": percentile(lat, 50) * 1000,
           "echo_p99_ms": percentile(lat, 99) * 1000}
    if env.pg is not None:
        out["pgbench_S_tps"] = pgbench.pgbench(env, "jit-proxy", env.db_login("alice"), 5, False)
    return out


def run(env: BenchEnv, results: Results, n_ssh: int, n_pg: int, rounds: int, echo: int) -> None:
    # a fresh proxy process: memory an earlier part (the storm) freed stays in its RSS
    env.restart_proxy()
    _figures(env, 1, 10)  # warm-up: a fresh process's first connections are slower
    before = _figures(env, rounds, echo)
    c = Clients(env)
    loop = asyncio.new_event_loop()  # the idle clients live on a loop in a thread of their own
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro, timeout=1800):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)
    rss0 = env.proxy_rss_kib()
    ssh = call(gather_limited(16, [c.idle_ssh("alice") for _ in range(n_ssh)]))
    time.sleep(2)
    rss1 = env.proxy_rss_kib()
    pgc = []
    if env.pg is not None and n_pg:
        secret = env.db_login("alice")
        pgc = call(gather_limited(16, [c.idle_pg("alice", secret) for _ in range(n_pg)]))
    time.sleep(2)
    rss2 = env.proxy_rss_kib()
    print(f"bench: scale: {len(ssh)} idle SSH sessions, {len(pgc)} idle PostgreSQL connections; "
          f"proxy RSS {rss0} → {rss1} → {rss2} KiB", flush=True)
    during = _figures(env, rounds, echo)

    async def close_all():
        for outer, inner, proc in ssh:
            outer.close()
        for p in pgc:
            p.terminate()
    call(close_all())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    gc.collect()
    results.add("scale", f"proxy RSS per idle SSH session ({n_ssh} open)", "KiB", "lower",
                {"jit-proxy": [(rss1 - rss0) / max(1, len(ssh))]}, f"RSS {rss0} → {rss1} KiB")
    if pgc:
        results.add("scale", f"proxy RSS per idle PostgreSQL connection ({n_pg} open)", "KiB",
                    "lower", {"jit-proxy": [(rss2 - rss1) / len(pgc)]},
                    f"RSS {rss1} → {rss2} KiB")
    for k, label, unit, better in (
            ("setup_s", "connection setup (ssh -J … true)", "s", "lower"),
            ("echo_p50_ms", "pty 1-byte echo p50", "ms", "lower"),
            ("echo_p99_ms", "pty 1-byte echo p99", "ms", "lower"),
            ("pgbench_S_tps", "pgbench -S, 5 s", "TPS", "higher")):
        if k in before:
            # the "peer" here is the same proxy with nothing else open
            results.add("scale", f"{label} with all idle sessions open", unit, better,
                        {"jit-proxy": [during[k]], "no idle sessions": [before[k]]},
                        "peer: the same proxy, warmed up, before the idle sessions opened")

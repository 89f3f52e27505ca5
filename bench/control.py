"""Control-plane measurements: approve-to-usable, certificate issuance, the expiry storm.

What it is for:
- approve → usable session, p50/p99: carol requests, then the clock starts, bob runs ``approve``
  and carol runs ``ssh -J … true`` (SSH) or ``db-login`` + ``psql -c 'SELECT 1'`` (PostgreSQL,
  the grant's role is created at approval), all with stock clients through the daemon; each grant
  is revoked afterwards.
- certificate issuance per second, in-process: the CA of ``ca/ssh.py`` signing alone, and the
  proxy's full path (``AccessService.user_certificate``: serial recorded in SQLite, signed,
  audited) with and without a fresh ed25519 key per certificate as the bridge makes one.
- the expiry storm, through the daemon: N grants (storm users, auto-approved; 200 of them database
  grants) are made to end in the same second, each with a live session (an SSH session through the
  proxy, or an idle PostgreSQL connection through it); measured from the last grant's end until
  the clients saw the last session closed and until the last role was gone from ``pg_roles``.

What it must not do: use a secret it did not get from ``db-login``, or leave grants active.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.clients import Clients, gather_limited
from bench.env import PG_DB, BenchEnv
from bench.stats import Results, percentile


def _json(env: BenchEnv, user: str, command: str):
    return json.loads(env.ssh_ok(user, command + " --json"))


def approve_to_usable(env: BenchEnv, samples: int, db: bool) -> list[float]:
    out = []
    for _ in range(samples):
        if db:
            req = _json(env, "carol", f"request {PG_DB} --role read --for 1h --reason bench")
        else:
            req = _json(env, "carol", f"request web1 --login {env.login} --for 1h --reason bench")
        t0 = time.perf_counter()
        grant = _json(env, "bob", f"approve {req['id']}")
        if db:
            secret = _json(env, "carol", f"db-login {PG_DB}")["password"]
            r = subprocess.run(
                ["psql", "-X", "-At", f"host=127.0.0.1 port={env.pg_port} user=carol "
                 f"dbname={PG_DB} sslmode=verify-full sslrootcert={env.d / 'jit-ca.pem'}",
                 "-c", "SELECT 1"], capture_output=True, text=True, timeout=60,
                env={**os.environ, "PGPASSWORD": secret})
        else:
            r = subprocess.run(env.ssh_args("jit-proxy", "carol") + ["true"], capture_output=True,
                               text=True, timeout=60, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"approve-to-usable ({'db' if db else 'ssh'}): {r.stderr}")
        out.append(time.perf_counter() - t0)
        env.ssh_ok("bob", f"revoke {grant['id']}")
    return out


async def _cert_rates(env: BenchEnv, n: int) -> dict[str, float]:
    import asyncssh
    from ca import UserCertificateSpec
    from proxy.audit.log import AuditLog
    from proxy.clock import SystemClock
    from proxy.config import load_config
    from proxy.runtime.service import AccessService
    from proxy.store.sqlite import SQLiteStore
    rates = {}
    key = asyncssh.generate_private_key("ssh-ed25519")
    now = int(time.time())
    t0 = time.perf_counter()
    for i in range(n):
        env.ca.issue_user_certificate(key, UserCertificateSpec(
            serial=i + 1, key_id=f"bench {i}", principal=env.login, valid_after=now - 60,
            valid_before=now + 3600))
    rates["CA signing only (ca/ssh.py)"] = n / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(prefix="jit-bench-ca-") as tmp:
        config = load_config(env.d / "jit-proxy.yaml")
        config = config.model_copy(update={"state_dir": tmp})
        store = await SQLiteStore.open(Path(tmp) / "jit-proxy.db")
        clock = SystemClock()
        audit = AuditLog(Path(tmp) / "audit.jsonl", clock)
        service = AccessService(config, store, audit, clock, env.ca,
                                asyncssh.generate_private_key("ssh-ed25519"))
        await service.start()
        await service.request("alice", "web1", env.login, 3600, "bench")
        grant = service.live_grant("alice", "web1", env.login)
        assert grant is not None
        t0 = time.perf_counter()
        for _ in range(n):
            await service.user_certificate(grant, key)
        rates["proxy path: record + sign + audit"] = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n):
            await service.user_certificate(grant, asyncssh.generate_private_key("ssh-ed25519"))
        rates["proxy path with a fresh ed25519 key each"] = n / (time.perf_counter() - t0)
        sem = asyncio.Semaphore(16)

        async def one():
            async with sem:
                await service.user_certificate(grant, key)
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        rates["proxy path, 16 connections at a time"] = n / (time.perf_counter() - t0)
        audit.close()
        await store.close()
    return rates


def _ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


async def _storm(env: BenchEnv, n: int, n_db: int, concurrency: int) -> dict:
    import asyncpg
    c = Clients(env)
    users = env.storm_users[:n]
    db_users, ssh_users = users[:n_db], users[n_db:]
    # enough time to set everything up at ~this machine's pace, then a common second
    end = math.ceil(time.time() + 30 + 0.12 * n)
    opened: list = []
    pg_conns: list = []

    async def setup_ssh(u: str):
        conn = await c.proxy(u)
        try:
            await c.command(u, f"request web1 --login {env.login} --for "
                               f"{math.ceil(end - time.time())}s --reason storm", conn)
        finally:
            conn.close()
        opened.append(await c.idle_ssh(u))

    async def setup_db(u: str):
        conn = await c.proxy(u)
        try:
            await c.command(u, f"request {PG_DB} --role read --for "
                               f"{math.ceil(end - time.time())}s --reason storm", conn)
            secret = (await c.command(u, f"db-login {PG_DB}", conn))["password"]
        finally:
            conn.close()
        pg_conns.append(await c.idle_pg(u, secret))

    t_setup = time.time()
    await gather_limited(concurrency, [setup_db(u) for u in db_users] +
                         [setup_ssh(u) for u in ssh_users])
    setup_s = time.time() - t_setup
    if time.time() >= end:
        raise RuntimeError(f"storm setup took {setup_s:.0f} s, past the common end: "
                           "use fewer --storm-grants")
    print(f"bench: storm: {len(opened)} SSH sessions and {len(pg_conns)} PostgreSQL "
          f"connections live after {setup_s:.0f} s; grants end at "
          f"{datetime.fromtimestamp(end, timezone.utc):%H:%M:%S} UTC", flush=True)
    closed: list[float] = []

    async def watch_ssh(outer, inner, proc):
        await proc.wait_closed()
        closed.append(time.time())
        outer.close()

    async def watch_pg(conn):
        # idle, as the storm's sessions are: asyncpg tells when the proxy closes the connection
        # (polling with a query every 50 ms was 4,000 audited statements a second of extra load)
        gone = asyncio.get_running_loop().create_future()
        conn.add_termination_listener(lambda _: gone.done() or gone.set_result(time.time()))
        if conn.is_closed() and not gone.done():
            gone.set_result(time.time())
        closed.append(await gone)
        conn.terminate()

    admin = await asyncpg.connect(host="127.0.0.1", port=env.pg.port, user="postgres",
                                  password=(env.pg.admin_password_file.read_text().strip()),
                                  database="postgres", ssl=False)
    prefix = "jit_"
    pattern = prefix + "s%"
    watchers = [asyncio.create_task(watch_ssh(*o)) for o in opened]
    await asyncio.sleep(max(0.0, end - time.time() - 1))
    watchers += [asyncio.create_task(watch_pg(p)) for p in pg_conns]
    roles_gone = None
    deadline = end + 120
    while time.time() < deadline:
        left = await admin.fetchval("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1",
                                    pattern)
        if left == 0 and time.time() > end:
            roles_gone = time.time()
            break
        await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(*watchers), max(1.0, deadline - time.time()))
    await admin.close()
    # the grants' real ends, from the audit log (requests end at "now + duration" each)
    ends = []
    with open(env.d / "state" / "audit.jsonl") as f:
        for line in f:
            e = json.loads(line)
            if e["type"] == "access.grant.created" and e["user"] in set(users) \
                    and _ts(e["ends_at"]) >= end - 1:
                ends.append(_ts(e["ends_at"]))
    last_end = max(ends) if ends else float(end)
    return {"grants": len(ends), "ssh_sessions": len(opened), "db_sessions": len(pg_conns),
            "ends_spread_s": (max(ends) - min(ends)) if ends else None,
            "setup_s": setup_s,
            "last_session_closed_s": max(closed) - last_end if closed else None,
            "last_role_dropped_s": (roles_gone - last_end) if roles_gone else None}


def run(env: BenchEnv, results: Results, samples: int, cert_n: int, storm_n: int,
        storm_db: int) -> None:
    ssh_lat = approve_to_usable(env, samples, db=False)
    results.add("control", "approve → usable SSH session p50", "s", "lower",
                {"jit-proxy": [percentile(ssh_lat, 50)]}, f"{samples} samples, stock ssh")
    results.add("control", "approve → usable SSH session p99", "s", "lower",
                {"jit-proxy": [percentile(ssh_lat, 99)]}, f"{samples} samples (p99 = max)")
    if env.pg is not None:
        db_lat = approve_to_usable(env, samples, db=True)
        results.add("control", "approve → usable PostgreSQL session p50", "s", "lower",
                    {"jit-proxy": [percentile(db_lat, 50)]}, "approve + db-login + psql")
        results.add("control", "approve → usable PostgreSQL session p99", "s", "lower",
                    {"jit-proxy": [percentile(db_lat, 99)]}, f"{samples} samples (p99 = max)")
    for what, rate in asyncio.run(_cert_rates(env, cert_n)).items():
        note = f"{cert_n} certificates, in the bench's process (not the daemon)"
        if what.startswith("proxy path") and "at a time" not in what:
            note += "; one at a time, each waits for its own durable SQLite commit (fsync)"
        results.add("control", f"certificates/s, {what}", "1/s", "higher",
                    {"jit-proxy": [rate]}, note)
    print("bench: control: approve-to-usable and certificates done", flush=True)
    if storm_n and env.pg is not None:
        storm = asyncio.run(_storm(env, storm_n, min(storm_db, storm_n), 16))
        note = (f"{storm['grants']} grants ({storm['ssh_sessions']} SSH sessions, "
                f"{storm['db_sessions']} PostgreSQL connections + roles), ends spread "
                f"{storm['ends_spread_s']:.2f} s; through the daemon")
        for what, key in (("session closed", "last_session_closed_s"),
                          ("role dropped", "last_role_dropped_s")):
            results.add("control", f"expiry storm: last {what} after the last grant's end", "s",
                        "lower", {"jit-proxy": [storm[key]]}, note)
        results.notes.append(f"storm: setting up the grants and sessions took "
                             f"{storm['setup_s']:.0f} s")

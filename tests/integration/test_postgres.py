"""PostgreSQL through the proxy: real psql and asyncpg against a real cluster started by fixtures."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys

import asyncpg
import pytest


def db_grant(env, user="alice", role="read", duration="30m") -> dict:
    req = env.json(user, f"request orders --role {role} --for {duration} --reason 'db test'")
    return env.json("bob", f"approve {req['id']}")


def db_login(env, user="alice") -> dict:
    return env.json(user, "db-login orders")


def ca_file(env) -> str:
    path = env.root / "jit-ca.pem"
    if not path.exists():
        r = env.ssh("alice", "ca --pg")
        assert r.returncode == 0, r.stderr
        path.write_bytes(r.stdout)
    return str(path)


def psql(env, login: dict, sql: str, sslmode="verify-full", extra="", timeout=60,
         **kw) -> subprocess.CompletedProcess:
    conninfo = (f"host=127.0.0.1 port={env.pg_port} user={login['user']} dbname=orders "
                f"sslmode={sslmode} sslrootcert={ca_file(env)} {extra}")
    return subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-At", conninfo, "-c", sql],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PGPASSWORD": login["password"]}, **kw)


def test_psql_verify_full_reaches_the_ephemeral_role(pg_env):
    grant = db_grant(pg_env)
    login = db_login(pg_env)
    assert login["grant"] == grant["id"]
    r = psql(pg_env, login, "SELECT current_user")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{pg_env.role_prefix}alice_g{grant['id']}"
    assert pg_env.wait_event("db.role.created", lambda e: e["role"] == r.stdout.strip())


def test_sslmode_prefer_and_gssencmode_prefer_work_and_disable_is_refused(pg_env):
    db_grant(pg_env)
    r = psql(pg_env, db_login(pg_env), "SELECT 1", sslmode="prefer", extra="gssencmode=prefer")
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
    r = psql(pg_env, db_login(pg_env), "SELECT 1", sslmode="disable")
    assert r.returncode == 2
    assert "FATAL:  jit-proxy requires TLS" in r.stderr
    assert pg_env.wait_event("auth.failure", lambda e: e.get("why") == "no TLS")


def test_gssencrequest_is_declined_then_tls_on_the_same_socket(pg_env):
    import socket
    import struct
    with socket.create_connection(("127.0.0.1", pg_env.pg_port), timeout=10) as s:
        s.sendall(struct.pack("!ii", 8, 80877104))  # GSSENCRequest
        assert s.recv(1) == b"N"
        s.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
        assert s.recv(1) == b"S"
        ctx = ssl.create_default_context(cafile=ca_file(pg_env))
        with ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("case", ["no grant", "wrong secret", "other target"])
def test_failed_logins_look_the_same_and_are_audited(pg_env, case):
    if case == "no grant":
        login = {"user": "carol", "password": "x" * 32}
    else:
        db_grant(pg_env)
        login = db_login(pg_env)
        if case == "wrong secret":
            login = {**login, "password": login["password"][:-2] + "xx"}
    extra = ""
    conninfo_db = "orders" if case != "other target" else "web1"
    r = subprocess.run(
        ["psql", "-X", "-At", f"host=127.0.0.1 port={pg_env.pg_port} user={login['user']} "
         f"dbname={conninfo_db} sslmode=verify-full sslrootcert={ca_file(pg_env)} {extra}",
         "-c", "SELECT 1"], capture_output=True, text=True, timeout=30,
        env={**os.environ, "PGPASSWORD": login["password"]})
    assert r.returncode == 2
    assert f'FATAL:  password authentication failed for user "{login["user"]}"' in r.stderr
    # the same hint in every case: nothing tells which part was wrong
    hint = ("HINT:  jit-proxy takes a one-time secret from db-login: it works once, within "
            f"10m, while its grant is live. Get a new one with: ssh jit-proxy db-login "
            f"{conninfo_db} (the database name you connect to is the target's name; ssh "
            f"jit-proxy targets lists yours)")
    assert r.stderr.count(hint) == 1 and r.stderr.count("grant") == 1, r.stderr
    assert pg_env.wait_event("auth.failure", lambda e: e["actor"] == login["user"]
                             and e.get("method") == "scram")


def test_wrong_secrets_do_not_lock_the_user_out(fresh_pg_env):
    """A one-time secret cannot be guessed: wrong ones count against the source address only,
    so they cannot lock a named user out of the port (or of SSH password logins)."""
    env = fresh_pg_env
    config = env.config()
    config.setdefault("auth", {}).update({"max_failures": 2, "max_failures_per_address": 1000})
    env.write_config(config)
    env.restart()
    db_grant(env)
    login = db_login(env)
    for _ in range(3):  # more than max_failures
        r = psql(env, {**login, "password": login["password"][:-2] + "xx"}, "SELECT 1")
        assert r.returncode == 2 and "password authentication failed" in r.stderr
    assert env.wait_event("auth.failure", lambda e: e["actor"] == "alice"
                          and e.get("method") == "scram")
    assert psql(env, login, "SELECT 1").stdout.strip() == "1"
    assert not env.audit_events("auth.lockout")


def test_a_role_not_requestable_is_refused_with_the_roles_that_are(pg_env):
    r = pg_env.ssh("alice", "request orders --role admin --for 10m --reason x")
    assert r.returncode == 1
    assert (b"no policy lets alice request admin@orders (orders is a PostgreSQL target; roles "
            b"(--role) alice may request there: read, write)") in r.stderr, r.stderr


def test_db_login_for_a_role_not_held_names_the_roles_held(pg_env):
    db_grant(pg_env, role="read")
    r = pg_env.ssh("alice", "db-login orders --role write")
    assert r.returncode == 1
    assert (b"jit-proxy: alice holds read on orders, not write: 'db-login orders --role read', "
            b"or request write with: ssh jit-proxy request orders --role write --for 30m "
            b"--reason") in r.stderr, r.stderr
    assert pg_env.wait_event("db.login.refused", lambda e: e.get("role") == "write")


def test_a_secret_is_single_use(pg_env):
    db_grant(pg_env)
    login = db_login(pg_env)
    assert psql(pg_env, login, "SELECT 1").returncode == 0
    r = psql(pg_env, login, "SELECT 1")
    assert r.returncode == 2 and "password authentication failed" in r.stderr
    assert "Get a new one with: ssh jit-proxy db-login orders" in r.stderr  # says what to do


def _asyncpg_connect(env, login, **direct):
    ctx = ssl.create_default_context(cafile=ca_file(env))
    return asyncpg.connect(host="127.0.0.1", port=env.pg_port, user=login["user"],
                           password=login["password"], database="orders", ssl=ctx)


def test_extended_protocol_gives_the_same_results_as_direct(pg_env, pg_cluster):
    db_grant(pg_env)
    login = db_login(pg_env)
    queries = [
        ("SELECT id, name FROM items WHERE id = ANY($1::int[]) ORDER BY id", ([1, 3],)),
        ("SELECT $1::text IS NULL, $2::bytea, $3::int8 * 2", (None, b"\x00\xff\x10", 2**40)),
        ("SELECT count(*) FROM items WHERE name IS NULL", ()),
        ("SELECT x, md5(x::text) FROM generate_series(1, 2000) x", ()),
    ]

    async def run(connect):
        conn = await connect
        try:
            out = []
            for sql, args in queries:
                stmt = await conn.prepare(sql)
                out.append([tuple(r) for r in await stmt.fetch(*args)])
                out.append([tuple(r) for r in await conn.fetch(sql, *args)])
            return out
        finally:
            await conn.close()

    through = asyncio.run(run(_asyncpg_connect(pg_env, login)))
    direct = asyncio.run(run(asyncpg.connect(**pg_cluster.dsn("orders"), ssl=False)))
    assert through == direct
    assert through[0] == [(1, "disk"), (3, None)]
    # and psql's simple protocol agrees
    r = psql(pg_env, db_login(pg_env), "SELECT id, coalesce(name, 'NULL') FROM items ORDER BY id")
    assert r.stdout.splitlines() == ["1|disk", "2|cpu", "3|NULL"]


def test_every_statement_is_audited_in_order(pg_env):
    grant = db_grant(pg_env)
    statements = ["SELECT 1 AS one", "SELECT name FROM items WHERE id = 2",
                  "SELECT count(*) FROM items"]
    r = subprocess.run(
        ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
         f"host=127.0.0.1 port={pg_env.pg_port} user=alice dbname=orders sslmode=verify-full "
         f"sslrootcert={ca_file(pg_env)}"],
        input="".join(s + ";\n" for s in statements), capture_output=True, text=True,
        timeout=30, env={**os.environ, "PGPASSWORD": db_login(pg_env)["password"]})
    assert r.returncode == 0, r.stderr
    start = pg_env.wait_event("db.session.start", lambda e: e["grant"] == grant["id"])
    pg_env.wait_event("db.session.end", lambda e: e["session"] == start["session"])
    got = [e["sql"].rstrip(";") for e in pg_env.audit_events("db.query")
           if e["session"] == start["session"]]
    assert got == statements
    v = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "verify",
                        str(pg_env.state / "audit.jsonl")], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr


def test_password_literals_never_reach_the_audit_log(pg_env):
    """psql's \\password, or ALTER ROLE ... PASSWORD by hand, sends the password (or its SCRAM
    verifier) in the SQL: the audit log keeps the statement with the literal redacted."""
    grant = db_grant(pg_env)
    r = psql(pg_env, db_login(pg_env),
             "ALTER ROLE nobody_here PASSWORD 'hunter2-correct-horse' VALID UNTIL 'infinity'")
    assert r.returncode == 1 and "nobody_here" in r.stderr  # the server still got it
    start = pg_env.wait_event("db.session.start", lambda e: e["grant"] == grant["id"])
    event = pg_env.wait_event("db.query", lambda e: e["session"] == start["session"])
    assert event["sql"] == ("ALTER ROLE nobody_here PASSWORD '<redacted>' VALID UNTIL "
                            "'infinity'")
    assert event["sql_redacted"] == "password literals"
    assert "hunter2" not in (pg_env.state / "audit.jsonl").read_text()
    assert "hunter2" not in (pg_env.root / "proxy.log").read_text()


def _psql_args(env, login):
    return ["psql", "-X", "-v", "ON_ERROR_STOP=1",
            f"host=127.0.0.1 port={env.pg_port} user={login['user']} dbname=orders "
            f"sslmode=verify-full sslrootcert={ca_file(env)}"]


def test_cancel_with_ctrl_c_and_the_connection_stays_usable(pg_env):
    from tests.integration.ptyrun import PtySession
    import time
    db_grant(pg_env)
    login = db_login(pg_env)
    os.environ["PGPASSWORD"] = login["password"]
    try:
        with PtySession(_psql_args(pg_env, login)) as s:
            s.expect(b"orders=>")
            s.send(b"SELECT pg_sleep(30);\r")
            time.sleep(1.0)
            t0 = time.monotonic()
            s.send(b"\x03")  # Ctrl-C: psql sends a CancelRequest
            s.expect(b"canceling statement due to user request", timeout=10)
            assert time.monotonic() - t0 < 2.0
            s.send(b"SELECT 40 + 2 AS answer;\r")
            s.expect(b"42")
            s.send(b"\\q\r")
            assert s.wait() == 0
    finally:
        del os.environ["PGPASSWORD"]
    assert pg_env.wait_event("db.cancel", lambda e: e["known"] is True)


def test_copy_a_million_rows_in_and_out(pg_env, tmp_path):
    db_grant(pg_env, role="write")
    rows = tmp_path / "rows.tsv"
    with open(rows, "w") as f:
        for i in range(1_000_000):
            f.write(f"{i}\titem-{i}\n")
    script = (f"CREATE TABLE copy_t (id int, name text);\n"
              f"\\copy copy_t FROM '{rows}'\n"
              f"SELECT count(*) FROM copy_t;\n"
              f"\\copy copy_t TO '{tmp_path / 'out.tsv'}'\n"
              f"DROP TABLE copy_t;\n")
    login = db_login(pg_env)
    r = subprocess.run(_psql_args(pg_env, login) + ["-At"], input=script,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PGPASSWORD": login["password"]})
    assert r.returncode == 0, r.stderr
    assert "1000000" in r.stdout.split()
    with open(tmp_path / "out.tsv") as f:
        assert sum(1 for _ in f) == 1_000_000


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_gigabyte_result_streams_with_bounded_memory(pg_env):
    import threading
    db_grant(pg_env)
    login = db_login(pg_env)
    pid = pg_env.proc.pid
    base = _rss_kib(pid)
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kib(pid))
            done.wait(0.05)

    t = threading.Thread(target=sample)
    t.start()
    try:
        proc = subprocess.Popen(
            _psql_args(pg_env, login) + ["-c", "COPY (SELECT repeat('x', 1000) FROM "
                                         "generate_series(1, 1000000)) TO STDOUT"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PGPASSWORD": login["password"]})
        total = 0
        while chunk := proc.stdout.read(1 << 20):
            total += len(chunk)
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    finally:
        done.set()
        t.join()
    assert total == 1_000_000 * 1001
    assert (peak[0] - base) < 100 * 1024, f"RSS grew by {(peak[0] - base) // 1024} MiB"


def test_garbage_and_a_huge_length_prefix_get_08P01_and_others_carry_on(pg_env):
    import socket
    import struct
    db_grant(pg_env)
    login = db_login(pg_env)
    other = subprocess.Popen(_psql_args(pg_env, login) + ["-At"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PGPASSWORD": login["password"]})
    try:
        other.stdin.write("SELECT 'connected';\n")  # logged in before the next db-login
        other.stdin.flush()                           # replaces alice's secret
        assert other.stdout.readline() == "connected\n"
        for payload in (struct.pack("!i", 1 << 30) + b"\x00\x03\x00\x00",  # 1 GB startup length
                        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", pg_env.pg_port), timeout=10) as s:
                s.sendall(payload)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            assert data[:1] == b"E" and b"C08P01" in data, data
        # a typed message with a 1 GB length after login
        grant_login = db_login(pg_env)
        ctx = ssl.create_default_context(cafile=ca_file(pg_env))

        async def huge_after_login():
            conn = await asyncpg.connect(host="127.0.0.1", port=pg_env.pg_port, user="alice",
                                         password=grant_login["password"], database="orders",
                                         ssl=ctx)
            conn._transport.write(b"Q" + struct.pack("!i", 1 << 30))
            with pytest.raises((asyncpg.PostgresError, ConnectionError, asyncpg.InterfaceError)):
                await conn.fetchval("SELECT 1", timeout=10)
            conn.terminate()
        asyncio.run(huge_after_login())
        assert pg_env.wait_event("db.protocol.error", lambda e: e["sqlstate"] == "08P01")
        out, err = other.communicate("SELECT 'still here';\n", timeout=30)
        assert out.strip() == "still here", err
    finally:
        if other.poll() is None:
            other.kill()


async def connect_as_alice(env, login: dict, **kw) -> asyncpg.Connection:
    """asyncpg through the proxy with ``login``'s one-time secret (TLS, verify-full)."""
    ctx = ssl.create_default_context(cafile=ca_file(env))
    return await asyncpg.connect(host="127.0.0.1", port=env.pg_port, user="alice",
                                 password=login["password"], database="orders", ssl=ctx, **kw)


def _ends_at(grant: dict) -> float:
    from datetime import datetime
    return datetime.fromisoformat(grant["ends_at"].replace("Z", "+00:00")).timestamp()


def test_at_the_grant_end_sessions_close_and_the_role_is_dropped_everywhere(fresh_pg_env):
    import time
    env = fresh_pg_env
    pg = env.pg
    grant = env.json("bob", "approve " + str(env.json(
        "alice", "request orders --role write --for 12s --reason ttl")["id"]))
    role = f"{env.role_prefix}alice_g{grant['id']}"
    ctx = ssl.create_default_context(cafile=ca_file(env))

    async def connect():
        login = env.json("alice", "db-login orders")
        return await asyncpg.connect(host="127.0.0.1", port=env.pg_port, user="alice",
                                     password=login["password"], database="orders", ssl=ctx)

    async def scenario():
        idle = await connect()
        in_tx = await connect()
        tx = in_tx.transaction()
        await tx.start()
        await in_tx.fetchval("SELECT count(*) FROM items")
        set_role = await connect()
        await set_role.execute("SET ROLE app_writer")
        await idle.execute("CREATE TABLE made_by_role (id int)")  # owned by the ephemeral role
        assert await idle.fetchval("SELECT tableowner FROM pg_tables WHERE tablename = "
                                   "'made_by_role'") == role
        pg.sql("other", f'GRANT SELECT ON notes TO "{role}"')  # privileges in another database
        login = env.json("alice", "db-login orders")
        psql_proc = subprocess.Popen(_psql_args(env, login) + ["-At"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PGPASSWORD": login["password"]})
        psql_proc.stdin.write("SELECT 'psql ready';\n")
        psql_proc.stdin.flush()
        assert psql_proc.stdout.readline() == "psql ready\n"
        end = _ends_at(grant)
        assert time.time() < end - 1, "setup took too long for the grant"
        conns = (idle, in_tx, set_role)
        while not all(c.is_closed() for c in conns):
            assert time.time() < end + 2.0, "a session outlived the grant by 2 s"
            await asyncio.sleep(0.05)
        closed_by = time.time() - end
        out, err = psql_proc.communicate("SELECT 1;\n", timeout=20)
        assert "terminating connection: access to write@orders ended at" in err, err
        while pg.sql("postgres", f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'", fetch=True):
            assert time.time() < end + 5.0, "the role outlived the grant by 5 s"
            await asyncio.sleep(0.1)
        return closed_by

    closed_by = asyncio.run(scenario())
    assert closed_by < 2.0
    owner = pg.sql("orders", "SELECT tableowner FROM pg_tables WHERE tablename = 'made_by_role'",
                   fetch=True)
    assert [r["tableowner"] for r in owner] == [f"{role}-left"]
    steps = [e["type"] for e in env.audit_events("db.role.") if e.get("role") == role]
    assert steps == ["db.role.created", "db.role.nologin", "db.role.backends_terminated",
                     "db.role.objects_reassigned", "db.role.dropped"]
    pg.sql("orders", "DROP TABLE made_by_role")


def _without_orders(env) -> dict:
    config = env.config()
    del config["targets"]["orders"]
    config["policies"] = [p for p in config["policies"] if "orders" not in p["targets"]]
    return config


def _role_exists(env, role: str) -> bool:
    return bool(env.pg.sql("postgres", f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'",
                           fetch=True))


def test_a_role_is_dropped_at_its_grant_end_after_a_reload_removed_its_target(fresh_pg_env):
    import time
    env = fresh_pg_env
    grant = db_grant(env, duration="6s")
    role = f"{env.role_prefix}alice_g{grant['id']}"
    assert psql(env, db_login(env), "SELECT current_user").stdout.strip() == role
    env.reload(_without_orders(env))
    assert env.ssh("alice", "db-login orders").returncode != 0  # the target is gone for new work
    end = _ends_at(grant)
    while _role_exists(env, role):
        assert time.time() < end + 5.0, "the role outlived its grant by 5 s"
        time.sleep(0.1)
    steps = [e["type"] for e in env.audit_events("db.role.") if e.get("role") == role]
    assert steps[-1] == "db.role.dropped", steps


def test_a_role_on_a_target_missing_at_start_is_reported(fresh_pg_env):
    env = fresh_pg_env
    grant = db_grant(env, duration="30m")
    role = f"{env.role_prefix}alice_g{grant['id']}"
    assert _role_exists(env, role)
    env.write_config(_without_orders(env))
    env.restart()
    try:
        orphaned = env.wait_event("db.role.orphaned", lambda e: e.get("role") == role)
        assert orphaned["target"] == "orders" and orphaned["grant"] == grant["id"]
        assert "drop the role on its cluster by hand" in orphaned["why"], orphaned
        assert any("level=warning" in line and "db.role.orphaned" in line and role in line
                   for line in env.log_path.read_text().splitlines())
    finally:
        env.pg.sql("postgres", f'DROP ROLE IF EXISTS "{role}"')
    # dropped by hand: the operator says so, and it is no longer reported
    from tests.integration.test_operations import jit
    r = jit("roles", "forget", "no_such_role", "-c", str(env.config_path))
    assert r.returncode != 0 and "tracks no role 'no_such_role'" in r.stderr, r.stderr
    r = jit("roles", "forget", role, "-c", str(env.config_path))
    assert r.returncode == 0 and f"{role}: no longer tracked" in r.stdout, r.stderr
    forgotten = env.wait_event("db.role.forgotten", lambda e: e.get("role") == role)
    assert forgotten["target"] == "orders" and forgotten["actor"] == "local:root"
    count = len([e for e in env.audit_events("db.role.orphaned") if e.get("role") == role])
    env.restart()
    assert len([e for e in env.audit_events("db.role.orphaned") if e.get("role") == role]) \
        == count


def test_roles_forget_refuses_a_role_the_proxy_still_drops_itself(fresh_pg_env):
    from tests.integration.test_operations import jit
    env = fresh_pg_env
    grant = db_grant(env, duration="30m")
    role = f"{env.role_prefix}alice_g{grant['id']}"
    r = jit("roles", "forget", role, "-c", str(env.config_path))
    assert r.returncode != 0 and "a configured target" in r.stderr, r.stderr
    assert _role_exists(env, role)


def test_sigterm_while_a_removed_targets_teardown_retries_stops_cleanly(fresh_pg_env):
    import time
    env = fresh_pg_env
    grant = db_grant(env, duration="5s")
    role = f"{env.role_prefix}alice_g{grant['id']}"
    db = f"locked_{env.role_prefix}"
    # the role owns a table in a database nobody may connect to: its teardown retries
    env.pg.sql("postgres", f"CREATE DATABASE {db}")
    env.pg.sql(db, f'CREATE TABLE t (id int); ALTER TABLE t OWNER TO "{role}"')
    env.pg.sql("postgres", f"ALTER DATABASE {db} ALLOW_CONNECTIONS false")
    try:
        env.reload(_without_orders(env))
        env.wait_event("db.role.teardown_failed", lambda e: e.get("role") == role,
                       timeout=_ends_at(grant) - time.time() + 10)
        assert env.stop() == 0
        assert env.audit_events("proxy.stopped")
    finally:
        env.pg.sql("postgres", f"ALTER DATABASE {db} ALLOW_CONNECTIONS true")
        env.pg.sql("postgres", f"DROP DATABASE {db}")
        env.pg.sql("postgres", f'DROP ROLE IF EXISTS "{role}"')


def test_a_role_is_dropped_on_its_own_cluster_after_a_reload_moved_its_target(fresh_pg_env):
    import time
    from tests.conftest import PgCluster
    env = fresh_pg_env
    grant = db_grant(env, duration="8s")
    role = f"{env.role_prefix}alice_g{grant['id']}"
    second = PgCluster()
    try:
        config = env.config()
        config["targets"]["orders"].update(
            port=second.port, tls={"mode": "verify-full", "ca_file": str(second.ca_file)},
            admin={"user": "postgres", "password_file": str(second.admin_password_file)})
        env.reload(config)
        end = _ends_at(grant)
        while _role_exists(env, role):  # on the first cluster, where it was made
            assert time.time() < end + 5.0, "the role outlived its grant by 5 s"
            time.sleep(0.1)
        dropped = env.wait_event("db.role.dropped", lambda e: e.get("role") == role)
        assert not dropped.get("already_gone"), dropped
    finally:
        second.close()


def test_a_reload_changing_the_role_prefix_keeps_live_grants_working(fresh_pg_env):
    import time
    env = fresh_pg_env
    grant = db_grant(env, duration="8s")
    role = f"{env.role_prefix}alice_g{grant['id']}"
    config = env.config()
    config["postgres"]["role_prefix"] = "x" + env.role_prefix
    env.reload(config)
    r = psql(env, db_login(env), "SELECT current_user")
    assert r.stdout.strip() == role, r.stderr  # the role keeps the name it was made with
    end = _ends_at(grant)
    while _role_exists(env, role):
        assert time.time() < end + 5.0, "the role outlived its grant by 5 s"
        time.sleep(0.1)


def test_two_targets_on_one_cluster_keep_each_others_live_roles_at_a_restart(fresh_pg_env):
    env = fresh_pg_env
    config = env.config()
    config["targets"]["other"] = {**config["targets"]["orders"], "database": "other"}
    config["policies"][-1]["targets"] = ["orders", "other"]
    env.write_config(config)
    env.restart()
    grant = db_grant(env, duration="30m")
    role = f"{env.role_prefix}alice_g{grant['id']}"
    env.restart()  # each target lists the cluster's roles; neither may drop the other's
    assert psql(env, db_login(env), "SELECT current_user").stdout.strip() == role
    assert not [e for e in env.audit_events("db.role.") if e.get("role") == role
                and e["type"] != "db.role.created"]
    env.json("bob", f"revoke {grant['id']}")


def test_after_kill_9_and_a_restart_past_the_end_the_role_is_dropped(fresh_pg_env):
    import signal
    import time
    env = fresh_pg_env
    grant = db_grant(env, duration="4s")
    role = f"{env.role_prefix}alice_g{grant['id']}"
    assert psql(env, db_login(env), "SELECT current_user").stdout.strip() == role
    # a stray role of ours that no grant owns (e.g. created just before a crash), and a role an
    # operator created with the same prefix, which is not ours to drop
    stray, operators = f"{env.role_prefix}stray_g999", f"{env.role_prefix}reporting"
    env.pg.sql("postgres", f'CREATE ROLE "{stray}" LOGIN; COMMENT ON ROLE "{stray}" IS '
                           f"'jit-proxy ephemeral role (grant 999)'; CREATE ROLE \"{operators}\"")
    env.stop(signal.SIGKILL)
    time.sleep(max(0.0, _ends_at(grant) - time.time()) + 0.5)
    assert env.pg.sql("postgres", f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'", fetch=True)
    started = time.time()
    env.start()
    while env.pg.sql("postgres", "SELECT 1 FROM pg_roles WHERE starts_with(rolname, "
                     f"'{env.role_prefix}') AND rolname <> '{operators}'", fetch=True):
        assert time.time() - started < 5.0, "roles outlived the restart by 5 s"
        time.sleep(0.1)
    assert env.pg.sql("postgres", f"SELECT 1 FROM pg_roles WHERE rolname = '{operators}'",
                      fetch=True), "reconciliation dropped a role the proxy did not create"
    env.pg.sql("postgres", f'DROP ROLE "{operators}"')


def test_a_password_the_user_sets_does_not_open_a_way_around_the_proxy(pg_env, pg_cluster):
    grant = db_grant(pg_env)
    role = f"{pg_env.role_prefix}alice_g{grant['id']}"
    r = psql(pg_env, db_login(pg_env), f"ALTER ROLE current_user PASSWORD 'chosen-by-alice'")
    assert r.returncode == 0, r.stderr  # PostgreSQL lets any role do this

    async def direct():
        return await asyncpg.connect(host="127.0.0.1", port=pg_cluster.port, user=role,
                                     password="chosen-by-alice", database="postgres", ssl=False)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="not permitted to log in"):
        asyncio.run(direct())  # NOLOGIN outside the proxy's own login windows
    r = psql(pg_env, db_login(pg_env), "SELECT current_user")
    assert r.returncode == 0 and r.stdout.strip() == role  # the proxy still gets in


def test_client_encodings_the_audit_could_misread_are_refused(pg_env):
    db_grant(pg_env)
    r = psql(pg_env, db_login(pg_env), "SELECT 1", extra="client_encoding=SJIS")
    assert r.returncode == 2 and "requires client_encoding UTF8" in r.stderr
    r = psql(pg_env, db_login(pg_env), "SET client_encoding TO 'SJIS'; SELECT 'after'")
    assert "requires client_encoding UTF8" in r.stderr and "after" not in r.stdout
    # by a route the statement check cannot see: the server's ParameterStatus ends the session
    dynamic = ("DO $$ BEGIN EXECUTE 'SET CLIENT_' || 'ENCODING TO SJIS'; END $$;\n"
               "SELECT 'after dynamic';\n")
    login = db_login(pg_env)
    r = subprocess.run(_psql_args(pg_env, login) + ["-At"], input=dynamic, capture_output=True,
                       text=True, timeout=30, env={**os.environ, "PGPASSWORD": login["password"]})
    assert "requires client_encoding UTF8" in r.stderr and "after dynamic" not in r.stdout
    assert pg_env.wait_event("db.session.refused", lambda e: "SJIS" in e["why"])


def test_execute_is_audited_with_the_sql_and_parameters_it_was_bound_to(pg_env):
    import struct
    db_grant(pg_env)
    login = db_login(pg_env)

    async def scenario():
        conn = await connect_as_alice(pg_env, login)
        try:
            assert await conn.fetchval("SELECT name FROM items WHERE id = $1", 2) == "cpu"
        finally:
            await conn.close()
    asyncio.run(scenario())
    execs = [e for e in pg_env.audit_events("db.query") if e["kind"] == "execute"
             and "FROM items WHERE id" in e["sql"]]
    assert execs and execs[-1]["params"] == ["\\x00000002"]  # asyncpg binds int4 in binary


def test_execute_is_audited_with_what_each_parse_really_did(pg_env):
    """The server decides what a Parse does (a name that exists is refused, a broken one is not
    made, DEALLOCATE frees a name): the audit follows its replies, not a guess."""
    db_grant(pg_env)
    login = db_login(pg_env)
    marker = os.urandom(4).hex()

    async def scenario():
        conn = await connect_as_alice(pg_env, login, statement_cache_size=0)
        try:
            first = await conn.prepare(f"SELECT 'a-{marker}'", name=f"s1_{marker}")
            with pytest.raises(asyncpg.DuplicatePreparedStatementError):
                await conn.prepare(f"SELECT 'b-{marker}'", name=f"s1_{marker}")
            assert await first.fetchval() == f"a-{marker}"  # the server kept the first
            with pytest.raises(asyncpg.PostgresSyntaxError):
                await conn.prepare(f"SELEC 'broken-{marker}'", name=f"s2_{marker}")
            made = await conn.prepare(f"SELECT 'c-{marker}'", name=f"s2_{marker}")
            assert await made.fetchval() == f"c-{marker}"  # the broken one was never made
            await conn.execute(f"DEALLOCATE s1_{marker}")
            again = await conn.prepare(f"SELECT 'd-{marker}'", name=f"s1_{marker}")
            assert await again.fetchval() == f"d-{marker}"  # the name was free again
        finally:
            await conn.close()
    asyncio.run(scenario())
    ran = [(e["statement"], e["sql"]) for e in pg_env.audit_events("db.query")
           if e["kind"] == "execute" and marker in e["sql"]]
    assert ran == [(f"s1_{marker}", f"SELECT 'a-{marker}'"),
                   (f"s2_{marker}", f"SELECT 'c-{marker}'"),
                   (f"s1_{marker}", f"SELECT 'd-{marker}'")]


def test_a_statement_redefined_by_dynamic_sql_is_flagged(pg_env):
    """A DO block that builds DEALLOCATE and PREPARE from pieces redefines a protocol-level
    statement unseen (found by an attack review): its later executions are audited with the
    client's Parse and, now, with sql_may_differ."""
    db_grant(pg_env)
    login = db_login(pg_env)
    marker = os.urandom(4).hex()

    async def scenario():
        conn = await connect_as_alice(pg_env, login)
        try:
            stmt = await conn.prepare(f"SELECT 'harmless-{marker}'", name=f"s1_{marker}")
            await conn.execute(f"DO $$ BEGIN EXECUTE 'DEALLOC' || 'ATE s1_{marker}'; "
                               f"EXECUTE 'PREP' || 'ARE s1_{marker} AS SELECT ''other''::text';"
                               f" END $$")
            return await stmt.fetchval()
        finally:
            await conn.close()
    assert asyncio.run(scenario()) == "other"  # what ran is not what the Parse said
    execs = [e for e in pg_env.audit_events("db.query") if e["kind"] == "execute"
             and e.get("statement") == f"s1_{marker}"]
    assert len(execs) == 1 and execs[0]["sql"] == f"SELECT 'harmless-{marker}'", execs
    assert "dynamic SQL (DO, EXECUTE)" in execs[0].get("sql_may_differ", ""), execs


def test_asyncpg_prepare_then_a_simple_query_and_copy_work(pg_env):
    """asyncpg prepares with Parse, Describe, Flush and no Sync, then may send a simple Query;
    its COPY sends the data without waiting for CopyInResponse. Both are ordinary."""
    db_grant(pg_env, role="write")
    login = db_login(pg_env)
    marker = os.urandom(4).hex()

    async def scenario():
        conn = await connect_as_alice(pg_env, login)
        try:
            stmt = await conn.prepare(f"SELECT 'prepared-{marker}'")
            await conn.execute(f"CREATE TEMP TABLE c_{marker} (x text)")
            await conn.copy_records_to_table(f"c_{marker}", records=[("a",), ("b",)])
            assert await stmt.fetchval() == f"prepared-{marker}"
            assert await conn.fetchval(f"SELECT count(*) FROM c_{marker}") == 2
        finally:
            await conn.close()
    asyncio.run(scenario())
    execs = [e for e in pg_env.audit_events("db.query") if e["kind"] == "execute"
             and marker in e["sql"]]
    assert [e["sql"] for e in execs if "prepared" in e["sql"]] == [f"SELECT 'prepared-{marker}'"]
    assert not [e for e in execs if "sql_may_differ" in e]


async def raw_with_a_temp_table(env, login: dict):
    """A RawClient through the proxy as alice, with an empty temporary table ``t (x text)``."""
    from proxy.pgwire.frontend import Query
    from tests.integration.rawpg import RawClient
    c = await RawClient.connect(env.pg_port, "alice", login["password"], "orders", ca_file(env))
    c.send(Query("CREATE TEMP TABLE t (x text)"))
    await c.until(b"Z")
    return c


def test_extended_copy_then_pipelined_batches_are_audited_as_they_ran(pg_env):
    """libpq's COPY with PQexecParams sends a Sync the server ignores in COPY mode; the proxy's
    count of batches must not drift, or later Parse replies land on the wrong messages. Also: a
    failed re-Bind inside a savepoint leaves the old portal, and the audit says so."""
    from proxy.pgwire.frontend import (Bind, CopyData, CopyDone, Describe, Execute, Parse,
                                       Query, Sync)
    db_grant(pg_env, role="write")
    login = db_login(pg_env)
    marker = os.urandom(4).hex()

    def bind(portal, statement):
        return Bind(portal, statement, (), (), ())

    async def scenario():
        c = await raw_with_a_temp_table(pg_env, login)
        try:
            c.send(Parse("", "COPY t FROM STDIN"), bind("", ""), Describe("P", ""),
                   Execute(""), Sync())
            await c.until(b"G")
            c.send(CopyData(b"a\n"), CopyDone(), Sync())
            await c.until(b"Z")  # one ReadyForQuery for the two Syncs
            c.send(Parse("s", f"SELECT 'benign-{marker}'"), Sync(), Query("DEALLOCATE s"))
            c.send(Parse("x", "SELEC broken"), Sync())
            c.send(Parse("s", f"SELECT 'EVIL-{marker}'"), Sync(), Sync())
            c.send(bind("", "s"), Execute(""), Sync())
            replies = await c.until(b"Z", 6)
            assert any(k == b"D" and f"EVIL-{marker}".encode() in b for k, b in replies)
            c.send(Query("BEGIN"), Parse("e", f"SELECT 'first-{marker}'"), bind("p", "e"),
                   Sync(), Query("SAVEPOINT sp"))
            await c.until(b"Z", 3)
            c.send(Parse("b", f"SELECT 'second-{marker}'"), bind("p", "b"), Sync())
            await c.until(b"Z")  # the Bind failed: portal "p" exists (42P03)
            c.send(Query("ROLLBACK TO sp"), Execute("p"), Sync(), Query("COMMIT"))
            replies = await c.until(b"Z", 3)
            assert any(k == b"D" and f"first-{marker}".encode() in b for k, b in replies)
        finally:
            c.close()
    asyncio.run(scenario())
    ran = [e["sql"] for e in pg_env.audit_events("db.query")
           if e["kind"] == "execute" and marker in e["sql"]]
    assert ran == [f"SELECT 'EVIL-{marker}'", f"SELECT 'first-{marker}'"]


def test_sync_inside_copy_data_is_refused(pg_env):
    from proxy.pgwire.frontend import CopyData, Query, Sync
    db_grant(pg_env, role="write")
    login = db_login(pg_env)

    async def scenario():
        c = await raw_with_a_temp_table(pg_env, login)
        try:
            c.send(Query("COPY t FROM STDIN"))
            await c.until(b"G")
            c.send(CopyData(b"a\n"), Sync())
            replies = await c.until(b"E")
            assert b"Sync or Flush inside COPY data" in replies[-1][1]
        finally:
            c.close()
    asyncio.run(scenario())
    assert pg_env.wait_event("db.protocol.error", lambda e: "inside COPY data" in e["error"])


def test_a_store_failure_during_login_gets_a_fatal_and_is_audited(fresh_pg_env):
    """The store cannot record the session (its database stays locked past its busy timeout):
    the client gets a FATAL saying so (XX000), the failure is audited as db.session.failed, and
    the next login works; before, the connection just dropped with nothing audited."""
    env = fresh_pg_env
    grant = db_grant(env)
    login = db_login(env)
    with env.store_locked():
        r = psql(env, login, "SELECT 1")
    assert r.returncode == 2
    assert "FATAL:  jit-proxy: internal error: database is locked" in r.stderr, r.stderr
    failed = env.wait_event("db.session.failed", lambda e: e.get("grant") == grant["id"])
    assert failed["error"] == "database is locked" and failed["target"] == "orders"
    r = psql(env, db_login(env), "SELECT 41 + 1")
    assert r.returncode == 0 and r.stdout.strip() == "42", r.stderr

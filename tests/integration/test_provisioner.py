"""The role teardown straight against a real PostgreSQL cluster: with a backend still live (it is
terminated, and the databases to reassign in are read once it is gone) and with none (the
usual case at a grant's end, when the proxy has closed the role's sessions already); with
privileges on a shared object (a database) only; and a
login window of a grant opening while another ALTER ROLE of its role is under way
(RoleManager)."""

from __future__ import annotations

import asyncio
import os
import ssl
import time

import asyncpg
import pytest

from proxy.config import PostgresTarget
from proxy.postgres.provisioner import Provisioner, leftovers_role


def _orders_target(pg_cluster, roles: dict[str, list[str]]) -> dict:
    """The fixtures' ``orders`` database as a PostgreSQL target's configuration."""
    return {"kind": "postgres", "address": "127.0.0.1", "port": pg_cluster.port,
            "database": "orders",
            "admin": {"user": "postgres", "password_file": str(pg_cluster.admin_password_file)},
            "roles": roles, "owner": "app_owner",
            "tls": {"mode": "verify-full", "ca_file": str(pg_cluster.ca_file)}}


async def _made_under_grant(prov: Provisioner, pg_cluster, name: str, grant_id: int,
                            sql: str) -> None:
    """Create the ephemeral role ``name`` (member of app_writer) through ``prov``, log in to
    ``orders`` as it and run ``sql``: what a user leaves behind under a grant."""
    await prov.create_role(name, ["app_writer"], time.time() + 600, grant_id=grant_id)
    role = await prov.open_login(name)
    conn = await asyncpg.connect(host="127.0.0.1", port=pg_cluster.port, user=name,
                                 password=role.password, database="orders",
                                 ssl=ssl.create_default_context(cafile=str(pg_cluster.ca_file)))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.mark.parametrize("live", [True, False], ids=["live-backend", "no-backend"])
def test_teardown_reassigns_what_the_role_owns_and_drops_it(pg_cluster, live):
    target = PostgresTarget(**_orders_target(pg_cluster, {"write": ["app_writer"]}))
    steps: list[tuple[str, dict]] = []
    prov = Provisioner("orders", target, "jit_p_", lambda step, f: steps.append((step, f)))
    name = f"jit_p_teardown_{'live' if live else 'none'}"
    table = f"made_by_{name}"

    async def scenario():
        await prov.create_role(name, ["app_writer"], time.time() + 600, grant_id=7)
        role = await prov.open_login(name)
        ctx = ssl.create_default_context(cafile=str(pg_cluster.ca_file))
        conn = await asyncpg.connect(host="127.0.0.1", port=pg_cluster.port, user=name,
                                     password=role.password, database="orders", ssl=ctx)
        await conn.execute(f"CREATE TABLE {table} (id int)")
        if not live:
            await conn.close()
            while pg_cluster.sql("postgres", f"SELECT 1 FROM pg_stat_activity "
                                             f"WHERE usename = '{name}'", fetch=True):
                await asyncio.sleep(0.02)
        try:
            await prov.teardown(name)
            if live:
                with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                    await conn.fetchval("SELECT 1")  # its backend was terminated
        finally:
            conn.terminate()
            await prov.teardown(name)  # idempotent: already gone
            await prov.close()

    asyncio.run(scenario())
    assert not pg_cluster.sql("postgres", f"SELECT 1 FROM pg_roles WHERE rolname = '{name}'",
                              fetch=True)
    owner = pg_cluster.sql("orders", f"SELECT tableowner FROM pg_tables "
                                     f"WHERE tablename = '{table}'", fetch=True)
    assert [r["tableowner"] for r in owner] == [f"{name}-left"]
    # the target's owner has the table through its membership of the leftovers role
    pg_cluster.sql("orders", f"INSERT INTO {table} VALUES (1)", role="app_owner")
    assert pg_cluster.sql("orders", f"SELECT count(*) AS n FROM {table}", fetch=True,
                          role="app_owner")[0]["n"] == 1
    pg_cluster.sql("orders", f"DROP TABLE {table}")
    assert [s for s, _ in steps] == [
        "db.role.created", "db.role.nologin", "db.role.backends_terminated",
        "db.role.objects_reassigned", "db.role.dropped", "db.role.dropped"]
    fields = dict(steps[2:5])
    assert fields["db.role.backends_terminated"]["count"] == (1 if live else 0)
    assert fields["db.role.objects_reassigned"] == {
        "role": name, "databases": ["orders"], "reassigned_to": f"{name}-left",
        "owner": "app_owner"}
    assert steps[5][1] == {"role": name, "already_gone": True}


def test_code_left_behind_gains_no_privilege_at_teardown(pg_cluster):
    """A SECURITY DEFINER function and a view made under a grant (found by an attack review):
    reassigned to the target's owner, which owns ``items``, they let any role that could call
    them write and read ``items`` with the owner's rights after the grant ended. They now belong
    to the grant's leftovers role, which has no privilege of its own: a reader gets "permission
    denied", also for what another grant left (a table of its own), and the owner, a member of
    both, adopts what it wants with ALTER ... OWNER."""
    target = PostgresTarget(**_orders_target(pg_cluster, {"write": ["app_writer"]}))
    steps: list[tuple[str, dict]] = []
    prov = Provisioner("orders", target, "jit_p_", lambda step, f: steps.append((step, f)))
    first, second = "jit_p_teardown_secret", "jit_p_teardown_definer"
    pg_cluster.sql("orders", "GRANT TRIGGER ON items TO app_writer")  # (as GRANT ALL would)

    async def under_grant(name: str, grant_id: int, sql: str) -> None:
        await _made_under_grant(prov, pg_cluster, name, grant_id, sql)
        await prov.teardown(name)

    async def scenario():
        try:
            await under_grant(first, 9, "CREATE TABLE left_secret AS SELECT 42 AS x")
            await under_grant(second, 10, """
                CREATE FUNCTION left_helper() RETURNS text SECURITY DEFINER LANGUAGE sql AS
                  'UPDATE items SET name = ''changed'' WHERE id = 1; SELECT current_user::text';
                CREATE FUNCTION left_peek() RETURNS int SECURITY DEFINER LANGUAGE sql AS
                  'SELECT x FROM left_secret';
                CREATE VIEW left_view AS SELECT id, name FROM items;
                GRANT SELECT ON left_view TO PUBLIC;
                CREATE FUNCTION left_trig() RETURNS trigger LANGUAGE plpgsql AS
                  'BEGIN GRANT ALL ON items TO PUBLIC; RETURN NEW; END';
                CREATE TRIGGER left_trig BEFORE UPDATE ON items FOR EACH ROW
                  EXECUTE FUNCTION left_trig()""")
        finally:
            await prov.close()

    asyncio.run(scenario())
    try:
        assert pg_cluster.sql("orders", "SELECT p.proowner::regrole::text AS o FROM pg_proc p "
                                        "WHERE proname = 'left_helper'",
                              fetch=True)[0]["o"] == f'"{leftovers_role(second)}"'
        for sql, table in (("SELECT left_helper()", "items"),
                           ("SELECT count(*) FROM left_view", "items"),
                           ("SELECT left_peek()", "left_secret")):
            with pytest.raises(asyncpg.InsufficientPrivilegeError,
                               match=f"permission denied for table {table}"):
                pg_cluster.sql("orders", sql, fetch=True, role="app_reader")
        assert pg_cluster.sql("orders", "SELECT name FROM items WHERE id = 1",
                              fetch=True)[0]["name"] == "disk"
        # a trigger it put on the owner's table would run its code as whoever writes items
        assert not pg_cluster.sql("orders", "SELECT 1 FROM pg_trigger WHERE tgname = 'left_trig'",
                                  fetch=True)
        reassigned = [f for step, f in steps if step == "db.role.objects_reassigned"]
        assert reassigned[-1]["triggers_dropped"] == ["orders: left_trig ON items"]
        pg_cluster.sql("orders", "UPDATE items SET name = name WHERE id = 1", role="app_owner")
        assert not pg_cluster.sql("orders", "SELECT 1 FROM information_schema.role_table_grants "
                                            "WHERE table_name = 'items' AND grantee = 'PUBLIC'",
                                  fetch=True)
        # even the owner's reads go through the view with the leftovers role's rights, until the
        # owner (who owns the view as a member of that role) adopts it
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            pg_cluster.sql("orders", "SELECT count(*) FROM left_view", fetch=True,
                           role="app_owner")
        pg_cluster.sql("orders", "ALTER VIEW left_view OWNER TO app_owner", role="app_owner")
        assert pg_cluster.sql("orders", "SELECT count(*) AS n FROM left_view", fetch=True,
                              role="app_owner")[0]["n"] == 3
        assert pg_cluster.sql("orders", "SELECT x FROM left_secret", fetch=True,
                              role="app_owner")[0]["x"] == 42
    finally:
        pg_cluster.sql("orders", "DROP TRIGGER IF EXISTS left_trig ON items; REVOKE TRIGGER ON "
                                 "items FROM app_writer; DROP VIEW IF EXISTS left_view; DROP "
                                 "TABLE IF EXISTS left_secret; DROP FUNCTION IF EXISTS "
                                 "left_helper(), left_peek(), left_trig()")
        pg_cluster.sql("postgres", f'DROP ROLE IF EXISTS "{leftovers_role(first)}", '
                                   f'"{leftovers_role(second)}"')


def test_teardown_by_an_admin_that_is_not_a_superuser(pg_cluster, tmp_path):
    """The README's lesser admin (CREATEROLE, pg_signal_backend, member of the owner) tore down
    no role that owned anything: REASSIGN OWNED needs the privileges of the role (found by an
    attack review, retried for ever)."""
    password = tmp_path / "padmin.password"
    password.write_text("padmin-pw\n")
    os.chmod(password, 0o600)
    pg_cluster.sql("postgres", "CREATE ROLE jit_padmin LOGIN CREATEROLE PASSWORD 'padmin-pw'; "
                               "GRANT pg_signal_backend, app_owner TO jit_padmin")
    config = _orders_target(pg_cluster, {"write": ["app_writer"]})
    config["admin"] = {"user": "jit_padmin", "password_file": str(password)}
    steps: list[tuple[str, dict]] = []
    prov = Provisioner("orders", PostgresTarget(**config), "jit_p_",
                       lambda step, f: steps.append((step, f)))
    name = "jit_p_teardown_padmin"

    async def scenario():
        try:
            await _made_under_grant(
                prov, pg_cluster, name, 11,
                "CREATE TABLE made_by_padmin_grant (x int); CREATE FUNCTION padmin_wipe() "
                "RETURNS void SECURITY DEFINER LANGUAGE sql AS "
                "'UPDATE items SET name = ''wiped'''")
            await prov.teardown(name)
        finally:
            await prov.close()

    try:
        asyncio.run(scenario())
        assert [s for s, _ in steps][-2:] == ["db.role.objects_reassigned", "db.role.dropped"]
        assert pg_cluster.sql("orders", "SELECT tableowner FROM pg_tables WHERE tablename = "
                                        "'made_by_padmin_grant'",
                              fetch=True)[0]["tableowner"] == f"{name}-left"
        # a function too, which needed CREATE on its schema for the new owner (found by an
        # attack review: teardown failed for ever, and the role kept app_writer's rights)
        assert pg_cluster.sql("orders", "SELECT proowner::regrole::text AS o FROM pg_proc "
                                        "WHERE proname = 'padmin_wipe'",
                              fetch=True)[0]["o"] == f'"{name}-left"'
        # and what it took for the work is given back: no CREATE left, no membership
        assert not pg_cluster.sql("orders", f"SELECT 1 WHERE has_schema_privilege("
                                            f"'{name}-left', 'public', 'CREATE')",
                                  fetch=True)
        assert not pg_cluster.sql("postgres", f"SELECT 1 FROM pg_auth_members m JOIN pg_roles b "
                                              f"ON b.oid = m.roleid WHERE b.rolname = "
                                              f"'{name}-left' AND m.member = "
                                              f"'jit_padmin'::regrole", fetch=True)
        assert steps[1] == ("db.role.nologin", {"role": name,
                                                "memberships_revoked": ["app_writer"]})
    finally:
        pg_cluster.sql("orders", "DROP TABLE IF EXISTS made_by_padmin_grant; "
                                 "DROP FUNCTION IF EXISTS padmin_wipe()")
        pg_cluster.sql("postgres", f'DROP ROLE IF EXISTS "{name}-left", "{name}"; '
                                   f"DROP ROLE IF EXISTS jit_padmin")


def test_a_leftovers_role_made_by_someone_else_is_not_used(pg_cluster):
    """A role of the leftovers name that was not made by the proxy, or was given privileges
    (here: a member of app_writer), would hand what the grant left to a role with rights: the
    teardown stops before reassigning anything, and says why (review)."""
    target = PostgresTarget(**_orders_target(pg_cluster, {"write": ["app_writer"]}))
    prov = Provisioner("orders", target, "jit_p_", lambda step, f: None)
    name = "jit_p_teardown_squatted"
    pg_cluster.sql("postgres", f'CREATE ROLE "{name}-left" NOLOGIN; '
                               f'GRANT app_writer TO "{name}-left"')

    async def scenario():
        try:
            await _made_under_grant(prov, pg_cluster, name, 12,
                                    "CREATE TABLE made_by_squatted_grant (x int)")
            with pytest.raises(RuntimeError, match=f"role {name}-left exists but is not a "
                                                   f"leftovers role of the proxy"):
                await prov.teardown(name)
        finally:
            await prov.close()

    try:
        asyncio.run(scenario())
        assert pg_cluster.sql("orders", "SELECT tableowner FROM pg_tables WHERE tablename = "
                                        "'made_by_squatted_grant'",
                              fetch=True)[0]["tableowner"] == name
    finally:
        pg_cluster.sql("orders", "DROP TABLE IF EXISTS made_by_squatted_grant")
        pg_cluster.sql("postgres", f'DROP ROLE IF EXISTS "{name}-left", "{name}"')


async def _wait_for(conn: asyncpg.Connection, sql: str, timeout: float) -> bool:
    """Poll ``sql`` (a count) on ``conn`` until it is non-zero; False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await conn.fetchval(sql):
            return True
        await asyncio.sleep(0.01)
    return False


def test_teardown_revokes_privileges_on_shared_objects(pg_cluster):
    """GRANT CONNECT ON DATABASE is recorded in no database (pg_shdepend dbid 0); DROP ROLE
    refused the role for ever until DROP OWNED ran in some database."""
    target = PostgresTarget(**_orders_target(pg_cluster, {"read": ["app_reader"]}))
    steps: list[tuple[str, dict]] = []
    prov = Provisioner("orders", target, "jit_p_", lambda step, f: steps.append((step, f)))
    name = "jit_p_teardown_shared"

    async def scenario():
        try:
            await prov.create_role(name, ["app_reader"], time.time() + 600, grant_id=8)
            pg_cluster.sql("postgres", f'GRANT CONNECT, TEMPORARY ON DATABASE other TO "{name}"')
            await prov.teardown(name)
        finally:
            await prov.close()

    asyncio.run(scenario())
    assert not pg_cluster.sql("postgres", f"SELECT 1 FROM pg_roles WHERE rolname = '{name}'",
                              fetch=True)
    reassigned = [f for s, f in steps if s == "db.role.objects_reassigned"]
    assert reassigned and reassigned[0]["databases"] == ["postgres"]


@pytest.mark.parametrize("first", ["nologin", "valid-until"])
def test_a_login_waits_for_the_alter_role_of_the_same_grant_before_it(pg_cluster, tmp_path,
                                                                      first):
    """Client B of a grant opens its login window while an earlier ALTER ROLE of the same role
    is under way: client A's window closing (NOLOGIN; PAM logins, or a script running psql after
    psql), or the grant's window starting (VALID UNTIL; a first use that B's client raced). B's
    LOGIN must wait for it: run at once, the two statements race on one catalog row ("tuple
    concurrently updated"), or the NOLOGIN lands last and B's login is refused. A transaction
    holding pg_authid makes the first statement wait, so that B's would meet it."""
    import asyncssh
    import yaml

    from ca import SSHCertificateAuthority
    from proxy.audit.log import AuditLog
    from proxy.clock import SystemClock
    from proxy.config import parse_config
    from proxy.postgres.roles import RoleManager
    from proxy.runtime.service import AccessService
    from proxy.store.sqlite import SQLiteStore

    alice, bob = (asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
                  .strip() for _ in range(2))
    config = parse_config(yaml.safe_dump({
        "state_dir": str(tmp_path),
        "users": {"alice": {"keys": [alice]}, "bob": {"keys": [bob]}},
        "postgres": {"listen_address": "127.0.0.1", "listen_port": 0, "role_prefix": "jit_w_"},
        "targets": {"orders": _orders_target(pg_cluster, {"read": ["app_reader"]})},
        "policies": [{"name": "db", "targets": ["orders"], "roles": ["read"],
                      "requesters": ["alice"], "approvers": ["bob"], "max_duration": "1h"}]}))
    ctx = ssl.create_default_context(cafile=str(pg_cluster.ca_file))
    statement = "NOLOGIN" if first == "nologin" else "VALID UNTIL %"

    async def scenario() -> str:
        clock = SystemClock()
        store = await SQLiteStore.open(tmp_path / "db.sqlite")
        service = AccessService(config, store, AuditLog(tmp_path / "audit.jsonl", clock), clock,
                                SSHCertificateAuthority.open(tmp_path / "ca"),
                                asyncssh.generate_private_key("ssh-ed25519"))
        roles = RoleManager(service)
        req = await service.request("alice", "orders", "read", 600, "INC-1")
        grant = await service.approve("bob", req.id, None)
        holder = await asyncpg.connect(**pg_cluster.dsn())  # holds pg_authid
        watcher = await asyncpg.connect(**pg_cluster.dsn())  # looks at pg_stat_activity

        async def client_a() -> None:
            if first == "valid-until":
                await holder.execute("BEGIN; LOCK TABLE pg_authid IN SHARE MODE")
                await roles.window_started(grant)
                return
            async with roles.login_window(grant):
                await holder.execute("BEGIN; LOCK TABLE pg_authid IN SHARE MODE")

        async def client_b() -> str:
            async with roles.login_window(grant) as creds:
                conn = await asyncpg.connect(
                    host="127.0.0.1", port=pg_cluster.port, user=creds.name,
                    password=creds.password, database="orders", ssl=ctx)
                try:
                    return await conn.fetchval("SELECT current_user")
                finally:
                    await conn.close()

        a = b = None
        try:
            await roles.credentials(grant)  # the role exists before the catalog is held
            a = asyncio.create_task(client_a())
            assert await _wait_for(watcher, "SELECT count(*) FROM pg_stat_activity WHERE "
                                            "wait_event_type = 'Lock' AND query LIKE "
                                            f"'ALTER ROLE % {statement}'", 30), "A never waited"
            b = asyncio.create_task(client_b())
            # B's LOGIN, if it does not wait for A's statement, reaches the server too
            await _wait_for(watcher, "SELECT count(*) FROM pg_stat_activity WHERE state = "
                                     "'active' AND query LIKE 'ALTER ROLE % LOGIN PASSWORD %'", 2)
            await holder.execute("COMMIT")
            await asyncio.wait_for(a, 30)
            return await asyncio.wait_for(b, 30)
        finally:
            for task in (a, b):
                if task is not None and not task.done():
                    task.cancel()
            await holder.close()
            await watcher.close()
            roles.ended(grant)
            await asyncio.gather(*roles.teardowns.values())
            await roles.close()
            await store.close()

    assert asyncio.run(scenario()) == "jit_w_alice_g1"
    assert not pg_cluster.sql("postgres", "SELECT 1 FROM pg_roles WHERE rolname LIKE 'jit_w_%'",
                              fetch=True)

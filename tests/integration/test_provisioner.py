"""The role teardown straight against a real PostgreSQL cluster: with a backend still live (it is
terminated, and the databases to reassign in are read once it is gone) and with none (the
usual case at a grant's end, when the proxy has closed the role's sessions already)."""

from __future__ import annotations

import asyncio
import ssl
import time

import asyncpg
import pytest

from proxy.config import PostgresTarget
from proxy.postgres.provisioner import Provisioner


@pytest.mark.parametrize("live", [True, False], ids=["live-backend", "no-backend"])
def test_teardown_reassigns_what_the_role_owns_and_drops_it(pg_cluster, live):
    target = PostgresTarget(
        kind="postgres", address="127.0.0.1", port=pg_cluster.port, database="orders",
        admin={"user": "postgres", "password_file": str(pg_cluster.admin_password_file)},
        roles={"write": ["app_writer"]}, owner="app_owner",
        tls={"mode": "verify-full", "ca_file": str(pg_cluster.ca_file)})
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
    assert [r["tableowner"] for r in owner] == ["app_owner"]
    pg_cluster.sql("orders", f"DROP TABLE {table}")
    assert [s for s, _ in steps] == [
        "db.role.created", "db.role.nologin", "db.role.backends_terminated",
        "db.role.objects_reassigned", "db.role.dropped", "db.role.dropped"]
    fields = dict(steps[2:5])
    assert fields["db.role.backends_terminated"]["count"] == (1 if live else 0)
    assert fields["db.role.objects_reassigned"]["databases"] == ["orders"]
    assert steps[5][1] == {"role": name, "already_gone": True}

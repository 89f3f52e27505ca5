"""In-process clients for the measurements that need hundreds of sessions at once.

What it is for: asyncssh clients that log in to jit-proxy as a user, run proxy commands, or jump to
``web1`` and keep one session open (``echo ok; exec sleep``), and asyncpg clients that connect
through the proxy's PostgreSQL port with a one-time secret and stay idle. Stock ``ssh``/``psql``
processes would cost the machine more than the proxy being measured.

What it must not do: verify nothing on anything but 127.0.0.1 peers the bench started (it skips host
key checks for that reason only), or outlive the measurement that opened it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import asyncssh

from bench.env import PG_DB, BenchEnv


class Clients:
    def __init__(self, env: BenchEnv):
        self.env = env
        self.key = asyncssh.read_private_key(str(env.keys / "alice"))

    async def proxy(self, user: str) -> asyncssh.SSHClientConnection:
        key = self.env.storm_keys.get(user, self.key)
        return await asyncssh.connect("127.0.0.1", self.env.port, username=user,
                                      client_keys=[key], known_hosts=None, config=None,
                                      agent_path=None)

    async def command(self, user: str, command: str, conn=None) -> dict | list:
        own = conn is None
        conn = conn or await self.proxy(user)
        try:
            r = await conn.run(command + " --json", check=False)
            if r.exit_status != 0:
                raise RuntimeError(f"{user}: {command}: {r.stderr or r.stdout}")
            return json.loads(r.stdout)
        finally:
            if own:
                conn.close()

    async def idle_ssh(self, user: str) -> tuple:
        """Jump through the proxy to web1 and leave one exec session running; returns
        (outer, inner, process)."""
        outer = await self.proxy(user)
        inner = await asyncssh.connect("web1", 22, tunnel=outer, username=self.env.login,
                                       client_keys=[self.key], known_hosts=None, config=None,
                                       agent_path=None)
        proc = await inner.create_process("echo ok; exec sleep 100000")
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != "ok":
            raise RuntimeError(f"idle session of {user}: {line!r}")
        return outer, inner, proc

    async def idle_pg(self, user: str, secret: str):
        import asyncpg
        ctx = ssl.create_default_context(cafile=str(self.env.d / "jit-ca.pem"))
        conn = await asyncpg.connect(host="127.0.0.1", port=self.env.pg_port, user=user,
                                     password=secret, database=PG_DB, ssl=ctx,
                                     statement_cache_size=0)
        if await conn.fetchval("SELECT 1") != 1:
            raise RuntimeError("SELECT 1 through the proxy failed")
        return conn


async def gather_limited(n: int, coros) -> list:
    sem = asyncio.Semaphore(n)

    async def one(c):
        async with sem:
            return await c
    return await asyncio.gather(*(one(c) for c in coros))


async def wait_closed_ssh(outer, inner, proc) -> float:
    """Wait until the proxy has closed this jump session; returns the wall time it was seen."""
    await proc.wait_closed()
    await inner.wait_closed()
    return time.time()

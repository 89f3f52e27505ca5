"""PostgreSQL through the proxy: real psql and asyncpg against a real cluster started by fixtures."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess

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
    assert r.stdout.strip() == f"jit_alice_g{grant['id']}"
    assert pg_env.wait_event("db.role.created", lambda e: e["role"] == r.stdout.strip())

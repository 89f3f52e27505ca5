"""Ephemeral PostgreSQL roles: created at approval, torn down at the grant's end.

What it is for: on one target cluster, as its configured admin, (1) create a grant's role — a
prefixed, unique, quoted name marked by a comment, NOLOGIN except while the proxy itself logs in
(a login window that also sets a fresh password, sent only as a SCRAM-SHA-256 verifier so the
plaintext reaches no server log: a password the user sets with ALTER ROLE is useless),
``VALID UNTIL`` the grant's end, member of exactly the granted roles; (2) tear it down in
DESIGN.md's order — NOLOGIN and out of the granted roles, terminate its backends, in every
database drop the triggers it put on others' tables, reassign what it owns to the grant's
leftovers role and drop the rest, DROP ROLE — reporting each step;
(3) list the prefixed roles that exist, for reconciliation.

What it must not do: log or audit a password; build SQL from unquoted names; keep admin connections
open between operations; hand what a user created to a role with privileges of its own (a
SECURITY DEFINER function, a view, a rule or an index expression written under a grant runs with
its owner's rights, so the configured ``owner`` gets the objects only as a member of the grant's
leftovers role, which holds nothing else).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable

import asyncpg
import scramp

from proxy.config import PostgresTarget
from proxy.postgres.sql import quote_ident, quote_literal

StepReporter = Callable[[str, dict], None]
SCRAM_ITERATIONS = 4096
TERMINATE_WAIT = 5.0  # seconds to wait for terminated backends to go away
# the databases to REASSIGN/DROP OWNED in ($1 the role, $2 the admin database): those where it
# owns objects or holds privileges (pg_shdepend, the shared catalog DROP ROLE itself checks), and
# for privileges on shared objects (GRANT CONNECT ON DATABASE, a tablespace: dbid 0) the admin
# database, since DROP OWNED in any database revokes those too (without it, DROP ROLE failed
# for ever)
DATABASES_WITH_DEPENDENCIES = (
    "SELECT DISTINCT CASE WHEN s.dbid = 0 THEN $2 ELSE d.datname END AS datname"
    " FROM pg_shdepend s LEFT JOIN pg_database d ON d.oid = s.dbid"
    " JOIN pg_roles r ON r.oid = s.refobjid AND s.refclassid = 'pg_authid'::regclass"
    " WHERE r.rolname = $1 AND (s.dbid = 0 OR d.datallowconn) ORDER BY 1")
# triggers the role put on tables it does not own ($1 the role), with its own function: once the
# function belongs to the leftovers role, a SECURITY INVOKER one would still run as whoever
# writes the table, its owner included; they are dropped at teardown
FOREIGN_TRIGGERS = (
    "SELECT t.tgname, t.tgrelid::regclass::text AS tbl FROM pg_trigger t"
    " JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_class c ON c.oid = t.tgrelid"
    " JOIN pg_roles r ON r.rolname = $1"
    " WHERE NOT t.tgisinternal AND p.proowner = r.oid AND c.relowner <> r.oid ORDER BY 2, 1")
# the schemas of the objects the role ($1) owns other than tables (for those, REASSIGN by a
# non-superuser checks that the new owner may create in the schema)
OBJECT_SCHEMAS = (
    "WITH r AS (SELECT oid FROM pg_roles WHERE rolname = $1)"
    " SELECT nspname FROM pg_namespace WHERE oid IN ("
    " SELECT pronamespace FROM pg_proc, r WHERE proowner = r.oid"
    " UNION SELECT typnamespace FROM pg_type, r WHERE typowner = r.oid"
    " UNION SELECT oprnamespace FROM pg_operator, r WHERE oprowner = r.oid"
    " UNION SELECT collnamespace FROM pg_collation, r WHERE collowner = r.oid"
    " UNION SELECT connamespace FROM pg_conversion, r WHERE conowner = r.oid"
    " UNION SELECT stxnamespace FROM pg_statistic_ext, r WHERE stxowner = r.oid"
    " UNION SELECT cfgnamespace FROM pg_ts_config, r WHERE cfgowner = r.oid"
    " UNION SELECT dictnamespace FROM pg_ts_dict, r WHERE dictowner = r.oid"
    " UNION SELECT opcnamespace FROM pg_opclass, r WHERE opcowner = r.oid"
    " UNION SELECT opfnamespace FROM pg_opfamily, r WHERE opfowner = r.oid) ORDER BY 1")
ADMIN_POOL_SIZE = 4  # admin connections per target, for creating and dropping roles side by side
ROLE_MARKER = "jit-proxy ephemeral role"  # start of the comment on every role the proxy creates
LEFTOVERS_MARKER = "jit-proxy leftovers role"  # the comment on the roles leftovers_role names


@dataclass(frozen=True)
class EphemeralRole:
    name: str
    password: str  # never logged, never audited, never shown to the user

    def __repr__(self) -> str:
        return f"EphemeralRole(name={self.name!r}, password=<hidden>)"


def role_name(prefix: str, user: str, grant_id: int) -> str:
    """``{prefix}{user}_g{grant_id}``, lowercased, characters outside [a-z0-9_] replaced by ``_``,
    cut to 63 bytes keeping the grant id (which makes it unique)."""
    tail = f"_g{grant_id}"
    safe = re.sub(r"[^a-z0-9_]", "_", user.lower())
    return (prefix + safe)[:63 - len(tail)] + tail


def leftovers_role(role: str) -> str:
    """``{role}-left``: the role that owns what the ephemeral role ``role`` created, once it is
    dropped, with the target's owner its member; one per ephemeral role, so code one grant left
    behind can reach nothing another grant left (a hash of ``role`` in place of its name when
    that would pass PostgreSQL's 63 bytes; no ephemeral role name holds a ``-``)."""
    name = f"{role}-left"
    if len(name.encode()) > 63:
        name = f"jit-left-{hashlib.sha256(role.encode()).hexdigest()[:32]}"
    return name


def scram_verifier(password: str) -> str:
    """The ``SCRAM-SHA-256$iter:salt$StoredKey:ServerKey`` form PostgreSQL stores (RFC 7677)."""
    salt, stored_key, server_key, iterations = scramp.ScramMechanism(
        "SCRAM-SHA-256").make_auth_info(password, SCRAM_ITERATIONS)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


_SSL_CONTEXTS: dict[int, tuple[PostgresTarget, ssl.SSLContext | bool]] = {}


def upstream_ssl(target: PostgresTarget) -> ssl.SSLContext | bool:
    """The client TLS context for ``target.tls`` (verify-full checks chain and host name).

    Made once per target object (loading the CA file costs about a millisecond, on every
    connection otherwise); a reload makes new target objects, so a new CA file applies then."""
    cached = _SSL_CONTEXTS.get(id(target))
    if cached is not None and cached[0] is target:
        return cached[1]
    if len(_SSL_CONTEXTS) > 256:  # targets of configurations reloaded long ago
        _SSL_CONTEXTS.clear()
    ctx = _make_upstream_ssl(target)
    _SSL_CONTEXTS[id(target)] = (target, ctx)
    return ctx


def _make_upstream_ssl(target: PostgresTarget) -> ssl.SSLContext | bool:
    mode = target.tls.mode
    if mode == "disable":
        return False
    ctx = ssl.create_default_context(cafile=str(target.tls.ca_file) if target.tls.ca_file else None)
    if mode == "require":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif mode == "verify-ca":
        ctx.check_hostname = False
    return ctx


class Provisioner:
    """Role lifecycle on one target. ``report(step, fields)`` is called after each step."""

    def __init__(self, target_name: str, target: PostgresTarget, prefix: str,
                 report: StepReporter, connect_timeout: float = 10.0):
        self.target_name = target_name
        self.target = target
        self.prefix = prefix
        self.report = report
        self.connect_timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()  # guards the pool's creation

    def _admin_args(self, database: str | None = None) -> dict:
        t = self.target
        password = Path(t.admin.password_file).read_text().split("\n", 1)[0]
        return dict(host=t.address, port=t.port, user=t.admin.user, password=password,
                    database=database or t.admin.database, ssl=upstream_ssl(t),
                    server_settings={"standard_conforming_strings": "on",
                                     "application_name": "jit-proxy provisioner"},
                    timeout=self.connect_timeout, statement_cache_size=0)

    async def _admin(self, database: str | None = None) -> asyncpg.Connection:
        return await asyncpg.connect(**self._admin_args(database))

    async def _with_admin(self, fn: Callable[[asyncpg.Connection], Awaitable], *,
                          database: str | None = None):
        """Run ``fn`` on an admin connection: one of a small pool for the admin database
        (``ADMIN_POOL_SIZE`` at most, opened on first use; a broken one is replaced), so that
        many roles are created and torn down side by side, or a fresh one for any other
        database."""
        if database is not None and database != self.target.admin.database:
            conn = await self._admin(database)
            try:
                return await fn(conn)
            finally:
                await conn.close(timeout=5)
        async with self._lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    min_size=1, max_size=ADMIN_POOL_SIZE, **self._admin_args())
        async with self._pool.acquire() as conn:
            return await fn(conn)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except asyncio.TimeoutError:
                pool.terminate()

    async def create_role(self, name: str, member_of: list[str], valid_until: float,
                          grant_id: int) -> None:
        """Create ``name`` NOLOGIN (or, if it exists from before a crash, reset it), marked as
        ours by its comment. It can log in only while the proxy opens a login window.

        Args:
            valid_until: POSIX seconds; becomes ``VALID UNTIL``.
        Raises:
            asyncpg.PostgresError, OSError: the admin connection or a statement failed.
        """
        until = datetime.fromtimestamp(valid_until, timezone.utc).isoformat()
        attrs = (f"NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
                 f"PASSWORD {quote_literal(scram_verifier(secrets.token_urlsafe(32)))} "
                 f"VALID UNTIL {quote_literal(until)}")

        async def run(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name)
                if exists:
                    await conn.execute(f"ALTER ROLE {quote_ident(name)} WITH {attrs}")
                else:
                    await conn.execute(f"CREATE ROLE {quote_ident(name)} WITH {attrs}")
                await conn.execute(f"COMMENT ON ROLE {quote_ident(name)} IS "
                                   f"{quote_literal(f'{ROLE_MARKER} (grant {grant_id})')}")
                for role in member_of:
                    await conn.execute(f"GRANT {quote_ident(role)} TO {quote_ident(name)}")
        await self._with_admin(run)
        self.report("db.role.created", {"role": name, "member_of": member_of,
                                        "valid_until": until})

    async def set_valid_until(self, name: str, valid_until: float) -> None:
        """Move ``VALID UNTIL`` (a first-use grant's window started)."""
        until = datetime.fromtimestamp(valid_until, timezone.utc).isoformat()
        await self._with_admin(lambda c: c.execute(
            f"ALTER ROLE {quote_ident(name)} VALID UNTIL {quote_literal(until)}"))

    async def open_login(self, name: str) -> EphemeralRole:
        """Let ``name`` log in, with a fresh password only the proxy knows (a password the user
        set with ALTER ROLE is overwritten, and useless anyway once the window closes)."""
        password = secrets.token_urlsafe(32)
        await self._with_admin(lambda c: c.execute(
            f"ALTER ROLE {quote_ident(name)} LOGIN PASSWORD "
            f"{quote_literal(scram_verifier(password))}"))
        return EphemeralRole(name, password)

    async def close_login(self, name: str) -> None:
        """NOLOGIN again: sessions already open carry on, nobody can start a new one."""
        await self._with_admin(lambda c: c.execute(f"ALTER ROLE {quote_ident(name)} NOLOGIN"))

    async def teardown(self, name: str) -> None:
        """NOLOGIN and out of the granted roles, terminate backends, drop the triggers it put on
        others' tables, reassign (to its leftovers role) and drop owned objects in every
        database where the role has any (``databases`` in the audit event), DROP ROLE.

        Idempotent: a role that is already gone is reported as dropped.
        Raises:
            asyncpg.PostgresError, OSError: a step failed (the caller retries the whole teardown).
        """
        ident = quote_ident(name)

        async def first_steps(conn: asyncpg.Connection) -> tuple[int, list[str]] | None:
            try:  # (one round trip for "does it exist" and NOLOGIN)
                await conn.execute(f"ALTER ROLE {ident} NOLOGIN")
            except asyncpg.UndefinedObjectError:
                self.report("db.role.dropped", {"role": name, "already_gone": True})
                return None
            # and no longer a member of the granted roles: code it owns that outlives this
            # teardown (a step that fails and is retried) then has only its own objects' rights
            held = [r["rolname"] for r in await conn.fetch(
                "SELECT b.rolname FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid"
                " JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = $1 ORDER BY 1", name)]
            if held:
                await conn.execute(f"REVOKE {', '.join(quote_ident(r) for r in held)} "
                                   f"FROM {ident}")
            self.report("db.role.nologin", {"role": name, "memberships_revoked": held})
            # signal every backend (not pg_terminate_backend's timeout form: it waits for each
            # backend in turn, 100 ms steps, holding this connection) and, for the usual case of
            # none left, the databases to reassign in, in the same round trip
            row = await conn.fetchrow(
                "SELECT (SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                f" WHERE usename = $1) AS killed, ARRAY({DATABASES_WITH_DEPENDENCIES})"
                " AS databases", name, self.target.admin.database)
            return row["killed"], list(row["databases"])
        first = await self._with_admin(first_steps)
        if first is None:
            return
        killed, databases = first
        if killed:
            # wait for the terminated backends to exit without holding the admin connection,
            # so that other roles' teardowns go on meanwhile (an expiry storm ends many at once)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + TERMINATE_WAIT
            while await self._with_admin(lambda c: c.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", name)) \
                    and loop.time() < deadline:
                await asyncio.sleep(0.05)
            # read again now that they are gone: one may have committed something as it went
            databases = [r["datname"] for r in await self._with_admin(
                lambda c: c.fetch(DATABASES_WITH_DEPENDENCIES, name,
                                  self.target.admin.database))]
        self.report("db.role.backends_terminated", {"role": name, "count": killed})
        leftovers = leftovers_role(name)
        if databases:
            await self._with_admin(lambda c: self._ensure_leftovers_role(c, leftovers))
        dropped: list[str] = []  # triggers, as "database: trigger ON table"
        for db in databases:
            async def reassign(c: asyncpg.Connection) -> None:
                async with c.transaction():
                    self_granted = not await c.fetchval(
                        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                    schemas: list[str] = []
                    if self_granted:
                        # REASSIGN and DROP OWNED need the privileges of both roles, and, for a
                        # function or a type, a new owner that may create in its schema: an
                        # admin with CREATEROLE (not a superuser) takes both for this
                        # transaction
                        await c.execute(f"GRANT {ident}, {quote_ident(leftovers)} TO "
                                        f"CURRENT_USER")
                        schemas = [r["nspname"] for r in await c.fetch(OBJECT_SCHEMAS, name)]
                        for schema in schemas:
                            await c.execute(f"GRANT CREATE ON SCHEMA {quote_ident(schema)} TO "
                                            f"{quote_ident(leftovers)}")
                    found = []
                    for t in await c.fetch(FOREIGN_TRIGGERS, name):
                        await c.execute(f"DROP TRIGGER {quote_ident(t['tgname'])} ON {t['tbl']}")
                        found.append(f"{db}: {t['tgname']} ON {t['tbl']}")
                    await c.execute(f"REASSIGN OWNED BY {ident} TO {quote_ident(leftovers)}")
                    await c.execute(f"DROP OWNED BY {ident}")
                    if self_granted:  # (taken for this work only)
                        for schema in schemas:
                            await c.execute(f"REVOKE CREATE ON SCHEMA {quote_ident(schema)} "
                                            f"FROM {quote_ident(leftovers)}")
                        await c.execute(f"REVOKE {ident}, {quote_ident(leftovers)} FROM "
                                        f"CURRENT_USER")
                dropped.extend(found)  # (once the transaction committed)
            await self._with_admin(reassign, database=db)
        fields = {"role": name, "databases": databases, "reassigned_to": leftovers,
                  "owner": self.target.owner}
        if dropped:
            fields["triggers_dropped"] = dropped
        self.report("db.role.objects_reassigned", fields)
        await self._with_admin(lambda c: c.execute(f"DROP ROLE IF EXISTS {ident}"))
        self.report("db.role.dropped", {"role": name})

    async def _ensure_leftovers_role(self, conn: asyncpg.Connection, leftovers: str) -> None:
        """Create ``leftovers`` if it is missing: NOLOGIN, no attribute, member of nothing, so
        code left behind (SECURITY DEFINER functions, views, rules, index expressions run by
        autovacuum as the table's owner) can do no more than PUBLIC may; then make the target's
        ``owner`` its member, which gives the owner's side the objects themselves.

        A role of that name made by someone else (no marker comment), or given a login, an
        attribute or a membership since, is not used.

        Raises:
            asyncpg.PostgresError, OSError: a statement failed (the teardown is retried).
            RuntimeError: the role exists and is not a powerless leftovers role (retried too,
                audited each time, until an operator drops or fixes it)."""
        ident = quote_ident(leftovers)
        row = await conn.fetchrow(
            "SELECT r.rolcanlogin OR r.rolsuper OR r.rolcreaterole OR r.rolcreatedb"
            " OR r.rolreplication OR r.rolbypassrls AS powers,"
            " EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid) AS member_of,"
            " coalesce(shobj_description(r.oid, 'pg_authid'), '') AS comment"
            " FROM pg_roles r WHERE r.rolname = $1", leftovers)
        if row is not None and (row["powers"] or row["member_of"]
                                or not row["comment"].startswith(LEFTOVERS_MARKER)):
            raise RuntimeError(f"role {leftovers} exists but is not a leftovers role of the "
                               f"proxy (a login, an attribute, a membership, or no marker "
                               f"comment): drop it, or make it NOLOGIN and member of nothing")
        if row is None:
            try:
                await conn.execute(f"CREATE ROLE {ident} WITH NOLOGIN NOSUPERUSER NOCREATEDB "
                                   f"NOCREATEROLE NOREPLICATION NOBYPASSRLS")
            except asyncpg.DuplicateObjectError:
                pass  # another teardown (or proxy) made it meanwhile
            else:
                comment = (f"{LEFTOVERS_MARKER}: owns what an ephemeral role created; its "
                           f"member (the target's owner) may use and adopt it")
                await conn.execute(f"COMMENT ON ROLE {ident} IS {quote_literal(comment)}")
        await conn.execute(f"GRANT {ident} TO {quote_ident(self.target.owner)}")

    async def existing_roles(self) -> list[str]:
        """Roles on the cluster that the proxy created: the prefix and our comment on the role
        (a role an operator created with the same prefix is left alone)."""
        rows = await self._with_admin(lambda c: c.fetch(
            "SELECT r.rolname FROM pg_roles r JOIN pg_shdescription d ON d.objoid = r.oid"
            " AND d.classoid = 'pg_authid'::regclass"
            " WHERE starts_with(r.rolname, $1) AND starts_with(d.description, $2)"
            " ORDER BY r.rolname", self.prefix, ROLE_MARKER))
        return [r["rolname"] for r in rows]

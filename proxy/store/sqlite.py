"""The embedded store: one SQLite file in WAL mode with durable (synchronous=FULL) commits.

What it is for: keeping every request, approval, grant, certificate and session across restarts.
Schema changes are numbered migrations applied in order and recorded in ``PRAGMA user_version``.

What it must not do: block the event loop (every call runs on one dedicated worker thread, which also
serialises writers), or keep secrets (it holds no key material).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from proxy.access.model import AccessRequest, Grant, GrantStatus, RequestStatus
from proxy.store import CertificateRecord, DBRoleRecord, SessionRecord, Visibility

T = TypeVar("T")

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        requester TEXT NOT NULL, target TEXT NOT NULL, login TEXT NOT NULL,
        duration INTEGER NOT NULL, reason TEXT NOT NULL, policy TEXT NOT NULL,
        status TEXT NOT NULL, created_at REAL NOT NULL,
        decided_at REAL, decided_by TEXT, decision_comment TEXT
    );
    CREATE INDEX requests_status ON requests(status);
    CREATE TABLE approvals (
        request_id INTEGER NOT NULL REFERENCES requests(id),
        approver TEXT NOT NULL, decision TEXT NOT NULL, comment TEXT, at REAL NOT NULL
    );
    CREATE TABLE grants (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id INTEGER NOT NULL UNIQUE REFERENCES requests(id),
        user TEXT NOT NULL, target TEXT NOT NULL, login TEXT NOT NULL, policy TEXT NOT NULL,
        starts_at REAL NOT NULL, ends_at REAL NOT NULL, status TEXT NOT NULL,
        ended_at REAL, ended_by TEXT
    );
    CREATE INDEX grants_status ON grants(status);
    CREATE TABLE certificates (
        serial INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL, key_id TEXT NOT NULL, principals TEXT NOT NULL,
        valid_after INTEGER NOT NULL, valid_before INTEGER NOT NULL,
        grant_id INTEGER REFERENCES grants(id), issued_at REAL NOT NULL
    );
    CREATE TABLE sessions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user TEXT NOT NULL, target TEXT NOT NULL, login TEXT NOT NULL,
        grant_id INTEGER NOT NULL REFERENCES grants(id),
        kind TEXT NOT NULL, detail TEXT, started_at REAL NOT NULL,
        ended_at REAL, end_reason TEXT, recording TEXT, recording_sha256 TEXT,
        bytes_up INTEGER NOT NULL DEFAULT 0, bytes_down INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX sessions_live ON sessions(ended_at);
    """,
    # 2: ephemeral database roles (names only: passwords live in memory, never on disk)
    """
    CREATE TABLE db_roles (
        grant_id INTEGER PRIMARY KEY REFERENCES grants(id),
        target TEXT NOT NULL, role TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL, dropped_at REAL
    );
    CREATE INDEX db_roles_live ON db_roles(dropped_at);
    """,
    # 3: first-use access windows
    """
    ALTER TABLE grants ADD COLUMN awaiting_first_use INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE grants ADD COLUMN duration INTEGER
    """,
    # 4: extension requests; one approval per approver and request
    """
    ALTER TABLE requests ADD COLUMN extends_grant INTEGER REFERENCES grants(id);
    CREATE UNIQUE INDEX approvals_once ON approvals(request_id, approver)
        WHERE decision = 'approval'
    """,
]


def _visible(sql: str, params: list, visible_to: Visibility | None, who: str,
             policy: str) -> tuple[str, list]:
    """Narrow a query to rows of the user or of the policies the user approves for, in SQL, so
    that LIMIT counts only what the user may see."""
    if visible_to is None:
        return sql, params
    user, policies = visible_to
    marks = ",".join("?" * len(policies))
    sql += f" AND ({who}=?" + (f" OR {policy} IN ({marks}))" if policies else ")")
    return sql, params + [user, *policies]


def _request(row: sqlite3.Row) -> AccessRequest:
    d = dict(row)
    d["status"] = RequestStatus(d["status"])
    return AccessRequest(**d)


def _grant(row: sqlite3.Row) -> Grant:
    d = dict(row)
    d["status"] = GrantStatus(d["status"])
    d["awaiting_first_use"] = bool(d["awaiting_first_use"])
    return Grant(**d)


def _settle(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():  # the caller gave up waiting; the write itself stands (or failed)
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class SQLiteStore:
    """``Store`` on SQLite. Open with ``await SQLiteStore.open(path)``."""

    def __init__(self, db: sqlite3.Connection, executor: ThreadPoolExecutor):
        self._db = db
        self._executor = executor
        # writes waiting for the next commit (group commit, see _write); the lock guards the
        # hand-over between the event loop and the store's thread
        self._batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future]] = []
        self._batch_lock = threading.Lock()

    @classmethod
    async def open(cls, path: Path) -> "SQLiteStore":
        """Open (creating, mode 0600, and migrating) the database at ``path``.

        Raises:
            sqlite3.DatabaseError: the file is not a database, or is from a newer version.
        """
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jit-store")
        loop = asyncio.get_running_loop()
        db = await loop.run_in_executor(executor, cls._connect, Path(path))
        return cls(db, executor)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(
                f"{path}: schema version {version} is newer than this jit-proxy "
                f"({len(MIGRATIONS)}); upgrade jit-proxy")
        for number in range(version + 1, len(MIGRATIONS) + 1):
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={number}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a write transaction; returns once it is durably committed.

        Group commit: writes that arrive while the store's thread is busy share its next
        transaction (one fsync for all), each in its own savepoint, so a write that fails is
        rolled back alone and only its caller sees the error. Writes commit in the order they
        were made, and a read made after a write runs after that write's commit.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        with self._batch_lock:
            self._batch.append((fn, fut))
            first = len(self._batch) == 1
        if first:  # otherwise a commit job is queued already and will take this write too
            self._executor.submit(self._commit_batch, loop)
        return await fut

    def _commit_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._batch_lock:
            batch, self._batch = self._batch, []
        outcomes: list[tuple[asyncio.Future, Any, BaseException | None]] = []
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for fn, fut in batch:
                    self._db.execute("SAVEPOINT jit_write")
                    try:
                        result = fn(self._db)
                    except Exception as exc:
                        self._db.execute("ROLLBACK TO jit_write")
                        self._db.execute("RELEASE jit_write")
                        outcomes.append((fut, None, exc))
                    else:
                        self._db.execute("RELEASE jit_write")
                        outcomes.append((fut, result, None))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except Exception as exc:  # BEGIN, a savepoint or COMMIT failed: nothing was written
            outcomes = [(fut, None, exc) for _, fut in batch]
        for fut, result, exc in outcomes:
            loop.call_soon_threadsafe(_settle, fut, result, exc)

    async def _read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        return await self._run(lambda: self._db.execute(sql, params).fetchall())

    # --- requests -------------------------------------------------------------------------------

    async def create_request(self, *, requester: str, target: str, login: str, duration: int,
                             reason: str, policy: str, now: float,
                             extends_grant: int | None = None) -> AccessRequest:
        def fn(db: sqlite3.Connection) -> AccessRequest:
            cur = db.execute(
                "INSERT INTO requests (requester, target, login, duration, reason, policy, status,"
                " created_at, extends_grant) VALUES (?,?,?,?,?,?,?,?,?)",
                (requester, target, login, duration, reason, policy,
                 RequestStatus.PENDING.value, now, extends_grant))
            return _request(db.execute("SELECT * FROM requests WHERE id=?",
                                       (cur.lastrowid,)).fetchone())
        return await self._write(fn)

    async def get_request(self, request_id: int) -> AccessRequest | None:
        rows = await self._read("SELECT * FROM requests WHERE id=?", (request_id,))
        return _request(rows[0]) if rows else None

    async def list_requests(self, *, status: RequestStatus | None = None,
                            requester: str | None = None, visible_to: Visibility | None = None,
                            limit: int = 100) -> list[AccessRequest]:
        sql, params = "SELECT * FROM requests WHERE 1=1", []
        if status is not None:
            sql += " AND status=?"
            params.append(status.value)
        if requester is not None:
            sql += " AND requester=?"
            params.append(requester)
        sql, params = _visible(sql, params, visible_to, "requester", "policy")
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [_request(r) for r in await self._read(sql, tuple(params))]

    async def decide_request(self, decided: AccessRequest, *, grant_ends_at: float | None,
                             now: float, first_use: bool = False) -> Grant | None:
        """Record a decision (approve, deny, cancel, expire) and, for an approval, the grant.

        The update only applies while the request is still pending, so two approvers racing cannot
        create two grants. Raises ``LookupError`` when the request was no longer pending.
        """
        def fn(db: sqlite3.Connection) -> Grant | None:
            cur = db.execute(
                "UPDATE requests SET status=?, decided_at=?, decided_by=?, decision_comment=?"
                " WHERE id=? AND status=?",
                (decided.status.value, decided.decided_at, decided.decided_by,
                 decided.decision_comment, decided.id, RequestStatus.PENDING.value))
            if cur.rowcount != 1:
                raise LookupError(f"request {decided.id} is no longer pending")
            if decided.decided_by is not None:
                db.execute("INSERT INTO approvals (request_id, approver, decision, comment, at)"
                           " VALUES (?,?,?,?,?)", (decided.id, decided.decided_by,
                                                   decided.status.value, decided.decision_comment,
                                                   now))
            if grant_ends_at is None:
                return None
            cur = db.execute(
                "INSERT INTO grants (request_id, user, target, login, policy, starts_at, ends_at,"
                " status, awaiting_first_use, duration) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (decided.id, decided.requester, decided.target, decided.login, decided.policy,
                 now, grant_ends_at, GrantStatus.ACTIVE.value, int(first_use), decided.duration))
            return _grant(db.execute("SELECT * FROM grants WHERE id=?",
                                     (cur.lastrowid,)).fetchone())
        return await self._write(fn)

    async def add_approval(self, request_id: int, approver: str, comment: str | None,
                           now: float) -> None:
        """Record one approval of a request that needs several (the request stays pending)."""
        await self._write(lambda db: db.execute(
            "INSERT INTO approvals (request_id, approver, decision, comment, at) VALUES"
            " (?,?,?,?,?)", (request_id, approver, "approval", comment, now)))

    async def approvers_of(self, request_id: int) -> list[str]:
        """Who has approved the request so far, in order."""
        rows = await self._read("SELECT approver FROM approvals WHERE request_id=? AND"
                                " decision IN ('approval', 'approved') ORDER BY rowid",
                                (request_id,))
        return [r["approver"] for r in rows]

    # --- grants ---------------------------------------------------------------------------------

    async def get_grant(self, grant_id: int) -> Grant | None:
        rows = await self._read("SELECT * FROM grants WHERE id=?", (grant_id,))
        return _grant(rows[0]) if rows else None

    async def list_grants(self, *, user: str | None = None, status: GrantStatus | None = None,
                          visible_to: Visibility | None = None, limit: int = 100) -> list[Grant]:
        sql, params = "SELECT * FROM grants WHERE 1=1", []
        if user is not None:
            sql += " AND user=?"
            params.append(user)
        if status is not None:
            sql += " AND status=?"
            params.append(status.value)
        sql, params = _visible(sql, params, visible_to, "user", "policy")
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [_grant(r) for r in await self._read(sql, tuple(params))]

    async def extend_grant(self, extended: Grant) -> bool:
        """Record a later end for an active grant; False when it is no longer active."""
        def fn(db: sqlite3.Connection) -> bool:
            return db.execute("UPDATE grants SET ends_at=?, duration=? WHERE id=? AND status=?",
                              (extended.ends_at, extended.duration, extended.id,
                               GrantStatus.ACTIVE.value)).rowcount == 1
        return await self._write(fn)

    async def start_window(self, started: Grant) -> bool:
        """Record a first-use grant's start; False when it had already started (or ended)."""
        def fn(db: sqlite3.Connection) -> bool:
            return db.execute("UPDATE grants SET starts_at=?, ends_at=?, awaiting_first_use=0"
                              " WHERE id=? AND awaiting_first_use=1 AND status=?",
                              (started.starts_at, started.ends_at, started.id,
                               GrantStatus.ACTIVE.value)).rowcount == 1
        return await self._write(fn)

    async def end_grant(self, ended: Grant) -> bool:
        """Record an expiry or revocation; False when the grant was no longer active."""
        def fn(db: sqlite3.Connection) -> bool:
            cur = db.execute("UPDATE grants SET status=?, ended_at=?, ended_by=? WHERE id=? AND"
                             " status=?", (ended.status.value, ended.ended_at, ended.ended_by,
                                           ended.id, GrantStatus.ACTIVE.value))
            return cur.rowcount == 1
        return await self._write(fn)

    # --- certificates ---------------------------------------------------------------------------

    async def record_certificate(self, *, kind: str, key_id_prefix: str, principals: list[str],
                                 valid_after: int, valid_before: int, grant_id: int | None,
                                 now: float) -> CertificateRecord:
        """Allocate the next serial (never reused) and record the certificate it will carry.

        The key id is ``key_id_prefix`` followed by ``serial=N``.
        """
        def fn(db: sqlite3.Connection) -> CertificateRecord:
            cur = db.execute(
                "INSERT INTO certificates (kind, key_id, principals, valid_after, valid_before,"
                " grant_id, issued_at) VALUES (?,?,?,?,?,?,?)",
                (kind, "", ",".join(principals), valid_after, valid_before, grant_id, now))
            serial = cur.lastrowid
            key_id = f"{key_id_prefix} serial={serial}"
            db.execute("UPDATE certificates SET key_id=? WHERE serial=?", (key_id, serial))
            return CertificateRecord(serial, kind, key_id, ",".join(principals), valid_after,
                                     valid_before, grant_id, now)
        return await self._write(fn)

    async def get_certificate(self, serial: int) -> CertificateRecord | None:
        rows = await self._read("SELECT * FROM certificates WHERE serial=?", (serial,))
        return CertificateRecord(**dict(rows[0])) if rows else None

    # --- sessions -------------------------------------------------------------------------------

    async def create_session(self, *, user: str, target: str, login: str, grant_id: int,
                             kind: str, detail: str | None, now: float) -> SessionRecord:
        def fn(db: sqlite3.Connection) -> SessionRecord:
            cur = db.execute("INSERT INTO sessions (user, target, login, grant_id, kind, detail,"
                             " started_at) VALUES (?,?,?,?,?,?,?)",
                             (user, target, login, grant_id, kind, detail, now))
            return SessionRecord(cur.lastrowid, user, target, login, grant_id, kind, detail, now)
        return await self._write(fn)

    async def end_session(self, session_id: int, *, now: float, reason: str,
                          recording: str | None, recording_sha256: str | None,
                          bytes_up: int, bytes_down: int) -> None:
        await self._write(lambda db: db.execute(
            "UPDATE sessions SET ended_at=?, end_reason=?, recording=?, recording_sha256=?,"
            " bytes_up=?, bytes_down=? WHERE id=? AND ended_at IS NULL",
            (now, reason, recording, recording_sha256, bytes_up, bytes_down, session_id)))

    async def list_sessions(self, *, live: bool | None = None, user: str | None = None,
                            visible_to: Visibility | None = None,
                            limit: int = 100) -> list[SessionRecord]:
        sql = ("SELECT s.* FROM sessions s JOIN grants g ON g.id = s.grant_id WHERE 1=1")
        params: list = []
        if live is True:
            sql += " AND s.ended_at IS NULL"
        elif live is False:
            sql += " AND s.ended_at IS NOT NULL"
        if user is not None:
            sql += " AND s.user=?"
            params.append(user)
        sql, params = _visible(sql, params, visible_to, "s.user", "g.policy")
        sql += " ORDER BY s.id DESC LIMIT ?"
        params.append(limit)
        return [SessionRecord(**dict(r)) for r in await self._read(sql, tuple(params))]

    async def close_orphan_sessions(self, *, now: float, reason: str) -> int:
        """Mark sessions left open by a previous process as ended; returns how many."""
        def fn(db: sqlite3.Connection) -> int:
            return db.execute("UPDATE sessions SET ended_at=?, end_reason=? WHERE ended_at IS NULL",
                              (now, reason)).rowcount
        return await self._write(fn)

    # --- ephemeral database roles ---------------------------------------------------------------

    async def record_db_role(self, *, grant_id: int, target: str, role: str, now: float) -> None:
        """Remember that ``role`` exists for ``grant_id`` (idempotent)."""
        await self._write(lambda db: db.execute(
            "INSERT INTO db_roles (grant_id, target, role, created_at) VALUES (?,?,?,?)"
            " ON CONFLICT(grant_id) DO NOTHING", (grant_id, target, role, now)))

    async def mark_db_role_dropped(self, role: str, *, now: float) -> None:
        await self._write(lambda db: db.execute(
            "UPDATE db_roles SET dropped_at=? WHERE role=? AND dropped_at IS NULL", (now, role)))

    async def list_db_roles(self, *, live: bool = True) -> list[DBRoleRecord]:
        sql = "SELECT * FROM db_roles" + (" WHERE dropped_at IS NULL" if live else "")
        return [DBRoleRecord(**dict(r)) for r in await self._read(sql + " ORDER BY grant_id")]

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)

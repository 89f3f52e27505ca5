"""proxy.store.sqlite.SQLiteStore: requests, decisions, grants, certificate serials, sessions,
durability across reopen, WAL, schema version and file mode. Coroutines run under asyncio.run."""

from __future__ import annotations

import asyncio
import sqlite3
import stat

import pytest

from proxy.access.model import GrantStatus, RequestStatus
from proxy.store.sqlite import MIGRATIONS, SQLiteStore

T0 = 1_800_000_000.0


async def _with_store(path, body):
    store = await SQLiteStore.open(path)
    try:
        return await body(store)
    finally:
        await store.close()


def with_store(path, body):
    """Open the store at ``path``, await ``body(store)``, close it; all under asyncio.run."""
    return asyncio.run(_with_store(path, body))


async def _new_request(store, requester="alice", target="web1", login="deploy", duration=600,
                       reason="INC-1: disk full", policy="web-deploy", now=T0):
    return await store.create_request(requester=requester, target=target, login=login,
                                      duration=duration, reason=reason, policy=policy, now=now)


def test_create_get_list_requests(tmp_path):
    async def body(store):
        r1 = await _new_request(store)
        r2 = await _new_request(store, requester="carol", reason="it's broken \u2603", now=T0 + 1)
        assert (r1.id, r2.id) == (1, 2)
        assert r1.status is RequestStatus.PENDING and r1.created_at == T0
        assert (r1.requester, r1.target, r1.login, r1.duration, r1.policy) == \
            ("alice", "web1", "deploy", 600, "web-deploy")
        assert r1.decided_at is None and r1.decided_by is None
        assert await store.get_request(2) == r2
        assert (await store.get_request(2)).reason == "it's broken \u2603"
        assert await store.get_request(99) is None
        assert [r.id for r in await store.list_requests()] == [2, 1]  # newest first
        assert [r.id for r in await store.list_requests(requester="alice")] == [1]
        assert [r.id for r in await store.list_requests(status=RequestStatus.PENDING)] == [2, 1]
        assert await store.list_requests(status=RequestStatus.APPROVED) == []
        assert [r.id for r in await store.list_requests(limit=1)] == [2]
    with_store(tmp_path / "s.db", body)


def test_approve_creates_grant_once(tmp_path):
    async def body(store):
        req = await _new_request(store)
        decided = req.decided("approve", "bob", T0 + 10, "ok")
        grant = await store.decide_request(decided, grant_ends_at=T0 + 610, now=T0 + 10)
        assert grant is not None
        assert (grant.request_id, grant.user, grant.target, grant.login, grant.policy) == \
            (req.id, "alice", "web1", "deploy", "web-deploy")
        assert (grant.starts_at, grant.ends_at) == (T0 + 10, T0 + 610)
        assert grant.status is GrantStatus.ACTIVE
        stored = await store.get_request(req.id)
        assert stored.status is RequestStatus.APPROVED
        assert (stored.decided_by, stored.decided_at, stored.decision_comment) == \
            ("bob", T0 + 10, "ok")
        assert await store.get_grant(grant.id) == grant

        # a second decision on the same request: LookupError, and no second grant
        with pytest.raises(LookupError, match=f"request {req.id} is no longer pending"):
            await store.decide_request(req.decided("approve", "carol", T0 + 11, None),
                                       grant_ends_at=T0 + 611, now=T0 + 11)
        with pytest.raises(LookupError):
            await store.decide_request(req.decided("deny", "carol", T0 + 11, "no"),
                                       grant_ends_at=None, now=T0 + 11)
        assert len(await store.list_grants()) == 1
        assert (await store.get_request(req.id)).decided_by == "bob"
        return grant.id
    with_store(tmp_path / "s.db", body)
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("SELECT request_id, approver, decision, comment FROM approvals").fetchall() \
        == [(1, "bob", "approved", "ok")]
    db.close()


def test_deny_creates_no_grant(tmp_path):
    async def body(store):
        req = await _new_request(store)
        result = await store.decide_request(req.decided("deny", "bob", T0 + 5, "not now"),
                                            grant_ends_at=None, now=T0 + 5)
        assert result is None
        assert (await store.get_request(req.id)).status is RequestStatus.DENIED
        assert await store.list_grants() == []
    with_store(tmp_path / "s.db", body)


def test_decide_unknown_request(tmp_path):
    async def body(store):
        req = await _new_request(store)
        ghost = req.__class__(**{**req.__dict__, "id": 42})
        with pytest.raises(LookupError):
            await store.decide_request(ghost.decided("approve", "bob", T0, None),
                                       grant_ends_at=T0 + 60, now=T0)
    with_store(tmp_path / "s.db", body)


def test_failed_decision_changes_nothing(tmp_path):
    """A decision whose grant insert fails rolls back the status change too."""
    async def body(store):
        req = await _new_request(store)
        g = await store.decide_request(req.decided("approve", "bob", T0, None),
                                       grant_ends_at=T0 + 60, now=T0)
        # sneak the request back to pending: the grant row's UNIQUE(request_id) must now fail
        await store._write(lambda db: db.execute("UPDATE requests SET status='pending'"))
        with pytest.raises(sqlite3.IntegrityError):
            await store.decide_request(req.decided("approve", "carol", T0 + 1, None),
                                       grant_ends_at=T0 + 61, now=T0 + 1)
        after = await store.get_request(req.id)
        assert after.status is RequestStatus.PENDING and after.decided_by == "bob"
        assert [x.id for x in await store.list_grants()] == [g.id]
    with_store(tmp_path / "s.db", body)


def test_end_grant_only_once(tmp_path):
    async def body(store):
        req = await _new_request(store)
        grant = await store.decide_request(req.decided("approve", "bob", T0, None),
                                           grant_ends_at=T0 + 600, now=T0)
        revoked = grant.ended("revoke", "bob", T0 + 5)
        assert await store.end_grant(revoked) is True
        assert await store.end_grant(grant.ended("expire", "system", T0 + 600)) is False
        stored = await store.get_grant(grant.id)
        assert stored.status is GrantStatus.REVOKED
        assert (stored.ended_by, stored.ended_at) == ("bob", T0 + 5)
        assert await store.list_grants(status=GrantStatus.ACTIVE) == []
        assert [g.id for g in await store.list_grants(status=GrantStatus.REVOKED)] == [grant.id]
    with_store(tmp_path / "s.db", body)


def test_list_grants_filters(tmp_path):
    async def body(store):
        ids = []
        for who in ("alice", "carol", "alice"):
            req = await _new_request(store, requester=who)
            g = await store.decide_request(req.decided("approve", "bob", T0, None),
                                           grant_ends_at=T0 + 60, now=T0)
            ids.append(g.id)
        assert [g.id for g in await store.list_grants(user="alice")] == [ids[2], ids[0]]
        assert [g.id for g in await store.list_grants(user="carol")] == [ids[1]]
        assert await store.list_grants(user="mallory") == []
        assert len(await store.list_grants(limit=2)) == 2
        assert await store.get_grant(999) is None
    with_store(tmp_path / "s.db", body)


def test_certificate_serials_strictly_increase(tmp_path):
    async def body(store):
        records = []
        for i in range(6):
            records.append(await store.record_certificate(
                kind="user" if i % 2 else "host", key_id_prefix=f"jit-proxy user=alice grant={i}",
                principals=["deploy"] if i % 2 else ["web1", "jit-proxy"],
                valid_after=int(T0), valid_before=int(T0) + 60, grant_id=None, now=T0 + i))
        serials = [r.serial for r in records]
        assert serials == sorted(serials) and len(set(serials)) == len(serials)
        assert all(b > a for a, b in zip(serials, serials[1:]))
        for i, r in enumerate(records):
            assert r.key_id == f"jit-proxy user=alice grant={i} serial={r.serial}"
            assert r.key_id.endswith(f"serial={r.serial}")
            assert await store.get_certificate(r.serial) == r
        assert records[0].principals == "web1,jit-proxy"
        assert await store.get_certificate(10_000) is None
        return serials[-1]
    last = with_store(tmp_path / "s.db", body)

    async def again(store):
        rec = await store.record_certificate(kind="user", key_id_prefix="x", principals=["p"],
                                             valid_after=0, valid_before=1, grant_id=None, now=T0)
        return rec.serial
    assert with_store(tmp_path / "s.db", again) > last


def test_serials_never_reused_after_delete(tmp_path):
    """AUTOINCREMENT: even if the newest row disappears, its serial is not handed out again."""
    async def body(store):
        a = await store.record_certificate(kind="user", key_id_prefix="x", principals=["p"],
                                           valid_after=0, valid_before=1, grant_id=None, now=T0)
        await store._write(lambda db: db.execute("DELETE FROM certificates"))
        b = await store.record_certificate(kind="user", key_id_prefix="x", principals=["p"],
                                           valid_after=0, valid_before=1, grant_id=None, now=T0)
        assert b.serial > a.serial
    with_store(tmp_path / "s.db", body)


def test_sessions(tmp_path):
    async def body(store):
        req = await _new_request(store)
        g = await store.decide_request(req.decided("approve", "bob", T0, None),
                                       grant_ends_at=T0 + 600, now=T0)
        s1 = await store.create_session(user="alice", target="web1", login="deploy",
                                        grant_id=g.id, kind="shell", detail=None, now=T0 + 1)
        s2 = await store.create_session(user="alice", target="web1", login="deploy",
                                        grant_id=g.id, kind="exec", detail="uptime", now=T0 + 2)
        assert s2.id > s1.id and s1.ended_at is None
        assert [s.id for s in await store.list_sessions(live=True)] == [s2.id, s1.id]
        await store.end_session(s1.id, now=T0 + 9, reason="exit", recording="/r/1.cast",
                                recording_sha256="ab" * 32, bytes_up=10, bytes_down=2000)
        # ending twice keeps the first end
        await store.end_session(s1.id, now=T0 + 99, reason="again", recording=None,
                                recording_sha256=None, bytes_up=0, bytes_down=0)
        assert [s.id for s in await store.list_sessions(live=True)] == [s2.id]
        ended = await store.list_sessions(live=False)
        assert len(ended) == 1
        e = ended[0]
        assert (e.id, e.ended_at, e.end_reason, e.recording, e.recording_sha256, e.bytes_up,
                e.bytes_down) == (s1.id, T0 + 9, "exit", "/r/1.cast", "ab" * 32, 10, 2000)
        assert len(await store.list_sessions()) == 2
        assert await store.list_sessions(user="bob") == []
        assert (await store.list_sessions(live=True))[0].detail == "uptime"
        return g.id, s2.id
    gid, live_id = with_store(tmp_path / "s.db", body)

    async def restart(store):
        assert await store.close_orphan_sessions(now=T0 + 50, reason="proxy restarted") == 1
        assert await store.list_sessions(live=True) == []
        s = [x for x in await store.list_sessions() if x.id == live_id][0]
        assert (s.ended_at, s.end_reason) == (T0 + 50, "proxy restarted")
        assert await store.close_orphan_sessions(now=T0 + 60, reason="again") == 0
    with_store(tmp_path / "s.db", restart)


def test_session_needs_existing_grant(tmp_path):
    async def body(store):
        with pytest.raises(sqlite3.IntegrityError):
            await store.create_session(user="a", target="t", login="l", grant_id=404,
                                       kind="shell", detail=None, now=T0)
        assert await store.list_sessions() == []
    with_store(tmp_path / "s.db", body)


def test_reopen_keeps_everything(tmp_path):
    path = tmp_path / "state" / "s.db"

    async def first(store):
        r1 = await _new_request(store)
        await _new_request(store, requester="carol", now=T0 + 1)
        g = await store.decide_request(r1.decided("approve", "bob", T0 + 2, "ok"),
                                       grant_ends_at=T0 + 602, now=T0 + 2)
        c = await store.record_certificate(kind="user", key_id_prefix="k", principals=["deploy"],
                                           valid_after=1, valid_before=2, grant_id=g.id, now=T0)
        s = await store.create_session(user="alice", target="web1", login="deploy",
                                       grant_id=g.id, kind="shell", detail=None, now=T0 + 3)
        return (await store.list_requests(), await store.list_grants(), c,
                await store.list_sessions())
    requests, grants, cert, sessions = with_store(path, first)

    async def second(store):
        assert await store.list_requests() == requests
        assert await store.list_grants() == grants
        assert await store.get_certificate(cert.serial) == cert
        assert await store.list_sessions() == sessions
        r3 = await _new_request(store)
        assert r3.id == 3
    with_store(path, second)


def test_pragmas_schema_version_and_file_mode(tmp_path):
    path = tmp_path / "new" / "s.db"
    with_store(path, lambda store: _new_request(store))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"requests", "approvals", "grants", "certificates", "sessions"} <= tables
    finally:
        db.close()


def test_wal_sidecar_files_are_private(tmp_path):
    path = tmp_path / "s.db"

    async def body(store):
        await _new_request(store)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            assert side.exists(), suffix  # WAL mode keeps both while a connection is open
            assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0, suffix
    with_store(path, body)


def test_newer_schema_refused(tmp_path):
    path = tmp_path / "s.db"
    with_store(path, lambda store: _new_request(store))
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer"):
        with_store(path, lambda store: store.list_requests())


def test_not_a_database(tmp_path):
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        with_store(path, lambda store: store.list_requests())


def test_reopen_does_not_rerun_migrations(tmp_path):
    path = tmp_path / "s.db"
    for _ in range(3):
        with_store(path, lambda store: _new_request(store))
    assert len(with_store(path, lambda store: store.list_requests())) == 3

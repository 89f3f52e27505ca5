"""Group commit in SQLiteStore: concurrent writes share commits, fail alone, keep their order."""

from __future__ import annotations

import asyncio

import pytest

from proxy.store.sqlite import SQLiteStore


def test_concurrent_writes_commit_in_order_and_a_failing_one_fails_alone(tmp_path):
    async def body():
        store = await SQLiteStore.open(tmp_path / "s.db")
        try:
            await store._write(lambda db: db.execute("CREATE TABLE t (n INTEGER)"))

            def insert(n):
                def fn(db):
                    db.execute("INSERT INTO t VALUES (?)", (n,))
                    if n == 7:
                        raise LookupError("seven")  # after writing: must be rolled back
                    return n
                return fn
            results = await asyncio.gather(*(store._write(insert(n)) for n in range(20)),
                                           return_exceptions=True)
            assert isinstance(results[7], LookupError)
            assert [r for i, r in enumerate(results) if i != 7] == [n for n in range(20)
                                                                    if n != 7]
            rows = await store._read("SELECT n FROM t ORDER BY rowid")
            assert [r["n"] for r in rows] == [n for n in range(20) if n != 7]
        finally:
            await store.close()
    asyncio.run(body())


def test_a_read_after_a_write_sees_it(tmp_path):
    async def body():
        store = await SQLiteStore.open(tmp_path / "s.db")
        try:
            await store._write(lambda db: db.execute("CREATE TABLE t (n INTEGER)"))
            writes = [asyncio.ensure_future(store._write(
                lambda db, n=n: db.execute("INSERT INTO t VALUES (?)", (n,)))) for n in range(5)]
            await asyncio.sleep(0)  # the writes are made (queued), not yet committed
            assert not any(w.done() for w in writes)
            rows = await store._read("SELECT count(*) AS c FROM t")
            assert rows[0]["c"] == 5
            await asyncio.gather(*writes)
        finally:
            await store.close()
    asyncio.run(body())


def test_a_failed_begin_fails_every_write_of_the_batch(tmp_path):
    async def body():
        store = await SQLiteStore.open(tmp_path / "s.db")
        try:
            await store._write(lambda db: db.execute("CREATE TABLE t (n INTEGER)"))
            store._db.execute("BEGIN")  # a transaction left open: BEGIN IMMEDIATE fails
            with pytest.raises(Exception):
                await store._write(lambda db: db.execute("INSERT INTO t VALUES (1)"))
            store._db.execute("ROLLBACK")
            await store._write(lambda db: db.execute("INSERT INTO t VALUES (2)"))
            rows = await store._read("SELECT n FROM t")
            assert [r["n"] for r in rows] == [2]
        finally:
            await store.close()
    asyncio.run(body())

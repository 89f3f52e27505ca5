"""PreparedStatements (proxy/postgres/statements.py): the SQL audited for an Execute is the SQL the
server runs, whatever each Parse turned out to do and however late its reply arrives. Checked
against a small model of the server's extended-query rules (PostgreSQL protocol docs, "Extended
Query"): a named statement cannot be redefined (42P05), an unnamed Parse drops the old unnamed
statement first, after an error everything up to Sync is skipped, a simple Query drops the
unnamed statement."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.postgres.statements import PORTAL, STATEMENT, PreparedStatements


class Server:
    """What the server does with each message, and the replies the tracker is told of."""

    def __init__(self):
        self.statements: dict[str, str] = {}
        self.portals: dict[str, str] = {}  # portal -> the SQL bound (dropped when a
        self.skipping = False              # transaction ends: here at every Sync)

    def bind(self, portal: str, name: str) -> list[str]:
        if self.skipping:
            return []
        if name not in self.statements:
            self.skipping = True
            return ["E"]
        self.portals[portal] = self.statements[name]
        return ["2"]

    def execute_portal(self, portal: str) -> tuple[list[str], str | None]:
        if self.skipping:
            return [], None
        if portal not in self.portals:
            self.skipping = True
            return ["E"], None
        return [], self.portals[portal]

    def parse(self, name: str, sql: str, valid: bool) -> list[str]:
        if self.skipping:
            return []
        if not name:
            self.statements.pop("", None)
        if (name and name in self.statements) or not valid:
            self.skipping = True
            return ["E"]
        self.statements[name] = sql
        return ["1"]

    def execute(self, name: str) -> tuple[list[str], str | None]:
        if self.skipping:
            return [], None
        if name not in self.statements:
            self.skipping = True
            return ["E"], None
        return [], self.statements[name]

    def close(self, name: str) -> list[str]:
        if self.skipping:
            return []
        self.statements.pop(name, None)
        return ["3"]

    def close_portal_named(self, portal: str) -> list[str]:
        if self.skipping:
            return []
        self.portals.pop(portal, None)
        return ["3"]

    def sync(self) -> list[str]:
        self.skipping = False
        self.portals.clear()
        return ["ZI"]

    def query(self) -> list[str]:
        self.statements.pop("", None)
        self.portals.clear()
        return ["ZI"]


NAMES = st.sampled_from(["", "s1", "s2"])
SQL = st.sampled_from(["SELECT 1", "DROP TABLE t", "SELECT 2"])
ACTION = st.one_of(
    st.tuples(st.just("parse"), NAMES, SQL, st.booleans()),
    st.tuples(st.just("execute"), NAMES),
    st.tuples(st.just("close"), NAMES),
    st.tuples(st.just("close_portal")),
    st.tuples(st.just("bind"), NAMES, NAMES),
    st.tuples(st.just("execute_portal"), NAMES),
    st.tuples(st.just("sync")),
    st.tuples(st.just("query")),
)


def deliver(tracker: PreparedStatements, reply: str) -> None:
    if reply.startswith("Z"):
        tracker.ready(idle=reply == "ZI")
    else:
        {"1": tracker.completed, "2": tracker.completed, "3": tracker.completed,
         "E": tracker.error}[reply]()


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(ACTION, st.integers(0, 3)), max_size=30))
def test_the_audited_sql_is_what_the_server_runs(steps):
    server, tracker = Server(), PreparedStatements()
    replies: list[str] = []
    extended_open = False
    for action, deliveries in steps:
        kind = action[0]
        if kind == "query" and extended_open:
            continue  # the listener refuses a simple Query inside an unfinished batch
        if kind == "parse":
            _, name, sql, valid = action
            tracker.parse(name, sql)
            replies += server.parse(name, sql, valid)
        elif kind == "execute":
            audited, instead, more = tracker.lookup(STATEMENT, action[1])
            audited = audited or ""
            out, ran = server.execute(action[1])
            replies += out
            if ran is not None:
                assert ran == audited or ran in instead or more, (ran, audited, instead)
        elif kind == "close":
            tracker.close(STATEMENT, action[1])
            replies += server.close(action[1])
        elif kind == "close_portal":
            tracker.close(PORTAL, "")
            replies += server.close_portal_named("")
        elif kind == "bind":
            _, portal, name = action
            sql, _, _ = tracker.lookup(STATEMENT, name)
            tracker.bind(portal, sql)
            replies += server.bind(portal, name)
        elif kind == "execute_portal":
            bound, others, more = tracker.lookup(PORTAL, action[1])
            out, ran = server.execute_portal(action[1])
            replies += out
            if ran is not None:
                assert ran == bound or ran in others or more, (ran, bound, others)
        elif kind == "sync":
            tracker.sync()
            replies += server.sync()
        else:
            tracker.sync(query=True)
            replies += server.query()
        extended_open = kind not in ("sync", "query")
        for _ in range(min(deliveries, len(replies))):  # replies arrive when they arrive
            deliver(tracker, replies.pop(0))
    tracker.sync()  # the batch a client leaves open ends with a Sync (or the connection)
    replies += server.sync()
    for reply in replies:
        deliver(tracker, reply)
    known = {k[1]: op.value for k, op in tracker._current.items()
             if k[0] == STATEMENT and op.value is not None}
    # every statement the server has, as the server has it (the tracker may still know one the
    # server dropped: a Bind of it fails, so nothing runs under a wrong name)
    assert {k: known.get(k) for k in server.statements} == server.statements
    assert not tracker._pending


def made(t: PreparedStatements, name: str, sql: str) -> None:
    """A Parse in a batch of its own, and the server's replies: it made the statement."""
    t.parse(name, sql)
    t.sync()
    t.completed()
    t.ready(idle=True)


def batch_failed(t: PreparedStatements) -> None:
    """The server's replies to the oldest open batch: an error, then ReadyForQuery."""
    t.error()
    t.ready(idle=True)


def test_a_refused_redefinition_keeps_the_old_statement():
    t = PreparedStatements()
    made(t, "s1", "SELECT 'harmless'")
    t.parse("s1", "DROP TABLE t")  # 42P05: s1 exists
    # a Bind in this batch is skipped if the Parse fails
    assert t.lookup(STATEMENT, "s1") == ("DROP TABLE t", [], False)
    t.sync()
    # a Bind in a later batch cannot know
    assert t.lookup(STATEMENT, "s1") == ("DROP TABLE t", ["SELECT 'harmless'"], False)
    batch_failed(t)
    assert t.lookup(STATEMENT, "s1") == ("SELECT 'harmless'", [], False)


def test_a_failed_parse_of_a_new_name_leaves_no_statement():
    t = PreparedStatements()
    t.parse("s2", "SELEC broken")
    t.sync()
    batch_failed(t)
    assert t.lookup(STATEMENT, "s2") == (None, [], False)
    made(t, "s2", "SELECT count(*) FROM items")  # the name is free: this one is made
    assert t.lookup(STATEMENT, "s2") == ("SELECT count(*) FROM items", [], False)


def test_after_a_failed_unnamed_parse_only_the_old_unnamed_statement_can_run():
    t = PreparedStatements()
    made(t, "", "SELECT 1")
    t.parse("", "SELEC broken")
    t.sync()
    assert t.lookup(STATEMENT, "") == ("SELEC broken", ["SELECT 1"], False)
    batch_failed(t)
    # dropped (a Bind fails) or kept by a skip
    assert t.lookup(STATEMENT, "") == ("SELECT 1", [], False)


def test_a_failed_parse_is_not_offered_as_what_a_later_one_falls_back_to():
    t = PreparedStatements()
    t.parse("s1", "SELEC broken")  # batch 0: fails
    t.sync()
    t.parse("s1", "SELECT 2")      # batch 1: its reply comes later
    t.sync()
    batch_failed(t)                # batch 0 over: s1 was never made by it
    # if batch 1 fails, a Bind of s1 fails too
    assert t.lookup(STATEMENT, "s1") == ("SELECT 2", [], False)


def test_unanswered_messages_and_alternatives_are_bounded():
    import pytest

    from proxy.postgres.statements import MAX_ALTERNATIVES, MAX_PENDING, TooManyPending
    t = PreparedStatements()
    for i in range(MAX_PENDING):
        t.parse("s1", f"SELECT {i}")
        t.sync()
    with pytest.raises(TooManyPending):
        t.parse("s2", "SELECT 'one too many'")
    sql, instead, more = t.lookup(STATEMENT, "s1")
    assert sql == f"SELECT {MAX_PENDING - 1}" and len(instead) == MAX_ALTERNATIVES and more
    for _ in range(MAX_PENDING):  # every batch fails: back to nothing
        batch_failed(t)
    assert t.lookup(STATEMENT, "s1") == (None, [], False)
    t.parse("s2", "SELECT 'room again'")


def test_syncs_the_server_ignored_in_copy_mode_do_not_count():
    t = PreparedStatements()
    t.sync()                     # Parse/Bind/Execute of COPY FROM STDIN, then Sync (libpq)
    t.copy_started(1)            # CopyInResponse: that Sync was ignored
    t.sync()                     # the Sync after CopyDone: the one ReadyForQuery
    t.ready(idle=True)
    t.parse("s", "SELEC broken")
    t.sync()
    batch_failed(t)              # must fail this Parse, not wait for a batch that never ends
    assert t.lookup(STATEMENT, "s") == (None, [], False)


def test_a_query_after_unsynced_messages_that_failed_makes_the_count_uncertain():
    t = PreparedStatements()
    t.parse("s", "SELECT 1")  # Parse, Describe, Flush (asyncpg's prepare), then a Query
    t.sync(query=True, unsynced=True)
    t.completed()
    t.ready(idle=True)        # no error: the Query's ReadyForQuery, counted right
    assert not t.uncertain
    t.parse("s2", "SELEC broken")
    t.sync(query=True, unsynced=True)
    t.error()                 # the server skipped the Query: no ReadyForQuery comes for it
    assert t.uncertain

"""PreparedStatements (proxy/postgres/statements.py): the SQL audited for an Execute is the SQL the
server runs, whatever each Parse turned out to do and however late its reply arrives. Checked
against a small model of the server's extended-query rules (PostgreSQL protocol docs, "Extended
Query"): a named statement cannot be redefined (42P05), an unnamed Parse drops the old unnamed
statement first, after an error everything up to Sync is skipped, a simple Query drops the
unnamed statement."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.postgres.statements import PreparedStatements


class Server:
    """What the server does with each message, and the replies the tracker is told of."""

    def __init__(self):
        self.statements: dict[str, str] = {}
        self.skipping = False

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

    def close_portal(self) -> list[str]:
        return [] if self.skipping else ["3"]

    def sync(self) -> list[str]:
        self.skipping = False
        return ["Z"]

    def query(self) -> list[str]:
        self.statements.pop("", None)
        return ["Z"]


NAMES = st.sampled_from(["", "s1", "s2"])
SQL = st.sampled_from(["SELECT 1", "DROP TABLE t", "SELECT 2"])
ACTION = st.one_of(
    st.tuples(st.just("parse"), NAMES, SQL, st.booleans()),
    st.tuples(st.just("execute"), NAMES),
    st.tuples(st.just("close"), NAMES),
    st.tuples(st.just("close_portal")),
    st.tuples(st.just("sync")),
    st.tuples(st.just("query")),
)


def deliver(tracker: PreparedStatements, reply: str) -> None:
    {"1": tracker.completed, "3": tracker.completed, "E": tracker.error,
     "Z": tracker.ready}[reply]()


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
            audited, instead = tracker.lookup(action[1])
            out, ran = server.execute(action[1])
            replies += out
            if ran is not None:
                assert ran == audited or ran in instead, (ran, audited, instead)
        elif kind == "close":
            tracker.close(action[1])
            replies += server.close(action[1])
        elif kind == "close_portal":
            tracker.close("", portal=True)
            replies += server.close_portal()
        elif kind == "sync":
            tracker.sync()
            replies += server.sync()
        else:
            tracker.sync(query=True)
            replies += server.query()
        extended_open = kind in ("parse", "execute", "close", "close_portal")
        for _ in range(min(deliveries, len(replies))):  # replies arrive when they arrive
            deliver(tracker, replies.pop(0))
    tracker.sync()  # the batch a client leaves open ends with a Sync (or the connection)
    replies += server.sync()
    for reply in replies:
        deliver(tracker, reply)
    known = {k: v[0] for k, v in tracker._current.items()}
    # every statement the server has, as the server has it (the tracker may still know one the
    # server dropped: a Bind of it fails, so nothing runs under a wrong name)
    assert {k: known.get(k) for k in server.statements} == server.statements
    assert not tracker._pending


def test_a_refused_redefinition_keeps_the_old_statement():
    t = PreparedStatements()
    t.parse("s1", "SELECT 'harmless'")
    t.sync()
    t.completed()
    t.ready()
    t.parse("s1", "DROP TABLE t")  # 42P05: s1 exists
    assert t.lookup("s1") == ("DROP TABLE t", [])  # a Bind in this batch is skipped if it fails
    t.sync()
    assert t.lookup("s1") == ("DROP TABLE t", ["SELECT 'harmless'"])  # a later batch: unknown
    t.error()
    t.ready()
    assert t.lookup("s1") == ("SELECT 'harmless'", [])


def test_a_failed_parse_of_a_new_name_leaves_no_statement():
    t = PreparedStatements()
    t.parse("s2", "SELEC broken")
    t.sync()
    t.error()
    t.ready()
    assert t.lookup("s2") == ("", [])
    t.parse("s2", "SELECT count(*) FROM items")  # the name is free: this one is made
    t.sync()
    t.completed()
    t.ready()
    assert t.lookup("s2") == ("SELECT count(*) FROM items", [])


def test_after_a_failed_unnamed_parse_only_the_old_unnamed_statement_can_run():
    t = PreparedStatements()
    t.parse("", "SELECT 1")
    t.sync()
    t.completed()
    t.ready()
    t.parse("", "SELEC broken")
    t.sync()
    assert t.lookup("") == ("SELEC broken", ["SELECT 1"])
    t.error()
    t.ready()
    assert t.lookup("") == ("SELECT 1", [])  # dropped (a Bind fails) or kept by a skip


def test_a_failed_parse_is_not_offered_as_what_a_later_one_falls_back_to():
    t = PreparedStatements()
    t.parse("s1", "SELEC broken")  # batch 0: fails
    t.sync()
    t.parse("s1", "SELECT 2")      # batch 1: its reply comes later
    t.sync()
    t.error()
    t.ready()                      # batch 0 over: s1 was never made by it
    assert t.lookup("s1") == ("SELECT 2", [])  # if batch 1 fails, a Bind of s1 fails too

"""A client's prepared statements as the server has them, for auditing what an Execute runs.

What it is for: the listener audits each Execute with the SQL of the statement its portal was bound
to. Which SQL that is depends on what the server did with each Parse and Close, which the proxy
learns only from the server's replies (PostgreSQL protocol, "Extended Query"): ParseComplete or
CloseComplete, or an ErrorResponse after which the server skips every message up to the next Sync,
and one ReadyForQuery per Sync or simple Query. Audits happen before a message goes upstream, so a
Parse or Close is applied at once (if it fails, the rest of its own Sync batch is skipped, Binds
included), and undone when the replies say it failed: a Parse naming a statement that exists
(42P05), a syntax error, a message after an error. (A failed unnamed Parse may have dropped the old
unnamed statement, or been skipped and kept it: the old one is kept here, since a Bind that runs at
all runs that one.) A Bind in a later batch than a Parse or Close whose reply has not come yet
cannot know which statement it gets: ``lookup`` then also gives the SQL it gets if those fail.

What it must not do: any I/O, or guess an outcome the server has not reported.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

Entry = tuple["str | None", object]  # (SQL, or None once closed; token of the op that made it)


@dataclass
class _Op:
    """A Parse or Close sent, its reply not yet seen."""
    batch: int              # the Sync batch it was sent in (0, 1, ...)
    name: str | None        # the statement (None: a portal's Close, which only takes a reply)
    token: object
    previous: Entry | None  # what ``name`` was before it


class PreparedStatements:
    def __init__(self) -> None:
        self._current: dict[str, Entry] = {}
        self._pending: deque[_Op] = deque()  # oldest first: replies come in this order
        self._made: dict[object, _Op] = {}   # token -> its pending op
        self._sent = 0   # Syncs and simple Queries sent: the batch being sent now
        self._ready = 0  # ReadyForQuery seen: the oldest batch without its reply

    # --- what the client sends -------------------------------------------------------------------

    def parse(self, name: str, sql: str) -> None:
        """A Parse of ``sql`` into statement ``name`` ("" is the unnamed one) is sent."""
        self._apply(name, sql)

    def close(self, name: str, portal: bool = False) -> None:
        """A Close of statement (or portal) ``name`` is sent; closing a missing one is no
        error."""
        if portal:
            self._pending.append(_Op(self._sent, None, object(), None))
        else:
            self._apply(name, None)

    def _apply(self, name: str, sql: str | None) -> None:
        op = _Op(self._sent, name, object(), self._current.get(name))
        self._current[name] = (sql, op.token)
        self._pending.append(op)
        self._made[op.token] = op

    def sync(self, query: bool = False) -> None:
        """A Sync is sent, or a simple Query (which also drops the unnamed statement: it runs
        after every earlier message, so that is settled)."""
        if query:
            self._current.pop("", None)
        self._sent += 1

    def lookup(self, name: str) -> tuple[str, list[str]]:
        """(the SQL a Bind of statement ``name`` sent now gets, "" if none; the SQL it gets
        instead if Parses or Closes of earlier batches, replies not yet seen, fail)."""
        entry = self._current.get(name)
        sql = entry[0] if entry is not None and entry[0] is not None else ""
        instead: list[str] = []
        while entry is not None:
            op = self._made.get(entry[1])
            if op is None or op.batch >= self._sent:  # settled, or fails with the Bind
                break
            entry = op.previous
            if entry is not None and entry[0] is not None and entry[0] not in instead:
                instead.append(entry[0])
        return sql, [s for s in instead if s != sql]

    # --- what the server replies -----------------------------------------------------------------

    def completed(self) -> None:
        """ParseComplete or CloseComplete: the oldest pending Parse or Close took effect."""
        if self._pending:
            self._made.pop(self._pending.popleft().token, None)

    def error(self) -> None:
        """ErrorResponse: no pending Parse or Close of the oldest unfinished batch took effect."""
        self._fail()

    def ready(self) -> None:
        """ReadyForQuery: the oldest unfinished batch is over."""
        self._fail()
        self._ready += 1

    def _fail(self) -> None:
        if not self._pending:  # the usual case: nothing unanswered
            return
        failed = [op for op in self._pending if op.batch <= self._ready]
        if not failed:
            return
        self._pending = deque(op for op in self._pending if op.batch > self._ready)
        for op in reversed(failed):  # newest first: each restores what the one before it made
            self._made.pop(op.token, None)
            if op.name is None:
                continue
            current = self._current.get(op.name)
            if current is not None and current[1] is op.token:
                if op.previous is None:
                    del self._current[op.name]
                else:
                    self._current[op.name] = op.previous
            for later in self._pending:  # a later op on the name must not restore this one
                if later.previous is not None and later.previous[1] is op.token:
                    later.previous = op.previous

"""A client's prepared statements and portals as the server has them, for auditing what runs.

What it is for: the listener audits each Execute with the SQL of the statement its portal was bound
to. What each Parse, Bind and Close did is known only from the server's replies (PostgreSQL
protocol, "Extended Query"): ParseComplete, BindComplete or CloseComplete, or an ErrorResponse
after which the server skips every message up to the next Sync; then one ReadyForQuery per Sync
or simple Query, except for Syncs sent while the server is in COPY FROM STDIN, which it ignores
(the listener reports those: ``copy_started``). Audits happen before a message goes upstream, so
each Parse, Bind or Close is applied at once (if it fails, the rest of its own Sync batch is
skipped as well) and undone when the replies say it failed. A lookup while such a message of an
earlier batch is unanswered also gives what holds if it fails (at most ``MAX_ALTERNATIVES``).

A failed unnamed Parse may have dropped the old unnamed statement, or been skipped and kept it:
the old one is kept here, since a Bind that runs at all runs that one. Statements made by
SQL-level PREPARE and portals made by SQL cursors (DECLARE, a function's refcursor) share these
names and are not seen here.

What it must not do: any I/O, or guess an outcome the server has not reported. The work per message
is constant however many messages a client pipelines (at most ``MAX_PENDING`` unanswered).
"""

from __future__ import annotations

from collections import deque
from typing import Any

STATEMENT, PORTAL = "S", "P"
MAX_ALTERNATIVES = 3
MAX_PENDING = 10_000  # unanswered Parse, Bind and Close messages a client may have in flight
MAX_NAMES = 100_000   # statements and portals a client may have open at once


class TooManyPending(Exception):
    """More than ``MAX_PENDING`` Parse, Bind and Close messages are unanswered, or more than
    ``MAX_NAMES`` statements and portals are open."""


class _Op:
    """A Parse, Bind or Close sent: what it makes its name mean, and until its reply comes,
    what the name meant before it."""

    __slots__ = ("batch", "key", "value", "previous", "settled")

    def __init__(self, batch: int, key: tuple[str, str], value: Any, previous: "_Op | None"):
        self.batch, self.key, self.value, self.previous = batch, key, value, previous
        self.settled = False


class PreparedStatements:
    def __init__(self) -> None:
        self._current: dict[tuple[str, str], _Op] = {}
        self._pending: deque[_Op] = deque()    # unanswered, oldest first: replies come so
        self._successor: dict[_Op, _Op] = {}   # op -> the later op whose ``previous`` it is
        self._portals: set[tuple[str, str]] = set()  # portals made, replies seen
        self._sent = 0   # Syncs and simple Queries sent: the batch being sent now
        self._ready = 0  # ReadyForQuery seen: the oldest batch without its reply
        self._query_ends: set[int] = set()  # batches a simple Query ended without a Sync
        # the count of batches may be off: a batch a simple Query ended without a Sync had an
        # error, after which the server skipped that Query (no ReadyForQuery for it)
        self.uncertain = False

    # --- what the client sends -------------------------------------------------------------------

    def parse(self, name: str, sql: str) -> None:
        """A Parse of ``sql`` into statement ``name`` ("" is the unnamed one) is sent.

        Raises:
            TooManyPending: more than ``MAX_PENDING`` messages would be unanswered.
        """
        self._apply((STATEMENT, name), sql)

    def bind(self, portal: str, value: Any) -> None:
        """A Bind making portal ``portal`` mean ``value`` is sent (raises as ``parse``)."""
        self._apply((PORTAL, portal), value)

    def close(self, kind: str, name: str) -> None:
        """A Close of statement (``kind`` "S") or portal ("P") ``name`` is sent; closing a
        missing one is no error (raises as ``parse``)."""
        self._apply((kind, name), None)

    def _apply(self, key: tuple[str, str], value: Any) -> None:
        if len(self._pending) >= MAX_PENDING:
            raise TooManyPending(f"more than {MAX_PENDING} Parse, Bind and Close messages "
                                 f"are unanswered")
        previous = self._current.get(key)
        if previous is None and len(self._current) >= MAX_NAMES:
            raise TooManyPending(f"more than {MAX_NAMES} statements and portals are open")
        op = _Op(self._sent, key, value, previous)
        if previous is not None:
            self._successor[previous] = op
        self._current[key] = op
        self._pending.append(op)

    def sync(self, query: bool = False, unsynced: bool = False) -> None:
        """A Sync is sent, or a simple Query (which also drops the unnamed statement);
        ``unsynced``: a Query after extended-query messages with no Sync (asyncpg's prepare
        sends Parse, Describe, Flush), which the server skips if one of them failed."""
        if query:
            self._current.pop((STATEMENT, ""), None)
            if unsynced:
                self._query_ends.add(self._sent)
        self._sent += 1

    def copy_started(self, ignored_syncs: int) -> None:
        """The server answered the last Execute or Query with CopyInResponse: it ignored the
        ``ignored_syncs`` Syncs sent after that message (no ReadyForQuery comes for them)."""
        self._sent = max(self._ready, self._sent - ignored_syncs)

    def lookup(self, kind: str, name: str) -> tuple[Any, list[Any], bool]:
        """(what statement (``kind`` "S") or portal ("P") ``name`` means for a message sent
        now, None if nothing; up to ``MAX_ALTERNATIVES`` other meanings it has if unanswered
        messages of earlier batches fail; whether there may be more than those)."""
        op = self._current.get((kind, name))
        value = op.value if op is not None else None
        instead: list[Any] = []
        steps = 0
        while (op is not None and not op.settled and op.batch < self._sent
               and len(instead) < MAX_ALTERNATIVES and steps < 4 * MAX_ALTERNATIVES):
            op, steps = op.previous, steps + 1
            if op is not None and op.value is not None and op.value != value \
                    and op.value not in instead:
                instead.append(op.value)
        more = op is not None and not op.settled and op.batch < self._sent
        return value, instead, more

    # --- what the server replies -----------------------------------------------------------------

    def completed(self) -> None:
        """ParseComplete, BindComplete or CloseComplete: the oldest unanswered message took
        effect."""
        if self._pending:
            op = self._pending.popleft()
            op.settled = True
            if op.previous is not None:  # what it replaced no longer matters
                self._successor.pop(op.previous, None)
                op.previous = None
            if op.key[0] == PORTAL and self._current.get(op.key) is op:
                self._portals.add(op.key)

    def error(self) -> None:
        """ErrorResponse: no unanswered message of the oldest unfinished batch took effect."""
        if self._ready in self._query_ends:
            self.uncertain = True
        self._fail_oldest_batch()

    def ready(self, idle: bool) -> None:
        """ReadyForQuery: the oldest unfinished batch is over. ``idle`` (status I): no
        transaction is open, so no portal made before is left."""
        self._fail_oldest_batch()
        self._query_ends.discard(self._ready)
        self._ready += 1
        if idle:
            for key in self._portals:
                op = self._current.get(key)
                if op is not None and op.settled:
                    del self._current[key]
            self._portals.clear()

    def _fail_oldest_batch(self) -> None:
        while self._pending and self._pending[0].batch <= self._ready:
            self._undo(self._pending.popleft())

    def _undo(self, op: _Op) -> None:
        """``op`` failed: its name means what it meant before; a later op on the name restores,
        if it fails too, what ``op`` replaced."""
        previous = op.previous
        if previous is not None:
            self._successor.pop(previous, None)
        successor = self._successor.pop(op, None)
        if successor is not None:
            successor.previous = previous
            if previous is not None:
                self._successor[previous] = successor
        elif self._current.get(op.key) is op:
            if previous is None:
                del self._current[op.key]
            else:
                self._current[op.key] = previous
                if previous.settled and op.key[0] == PORTAL:
                    self._portals.add(op.key)

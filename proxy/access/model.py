"""Requests and grants, and the transition tables of their state machines.

What it is for: the records the workflow passes around, and the only definition of which state
changes are legal. Invariants:
  - a request is decided once: pending -> approved | denied | cancelled | expired; nothing leaves
    approved/denied/cancelled/expired;
  - a grant exists only for an approved request; active -> expired | revoked, and never back;
  - a grant covers exactly one (user, target, login) for [starts_at, ends_at).

What it must not do: I/O of any kind, or read the clock (``now`` is always an argument).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from proxy.access.duration import format_duration


class RequestStatus(str, Enum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class GrantStatus(str, Enum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


REQUEST_TRANSITIONS: dict[tuple[RequestStatus, str], RequestStatus] = {
    (RequestStatus.PENDING, "approve"): RequestStatus.APPROVED,
    (RequestStatus.PENDING, "deny"): RequestStatus.DENIED,
    (RequestStatus.PENDING, "cancel"): RequestStatus.CANCELLED,
    (RequestStatus.PENDING, "expire"): RequestStatus.EXPIRED,
}

GRANT_TRANSITIONS: dict[tuple[GrantStatus, str], GrantStatus] = {
    (GrantStatus.ACTIVE, "expire"): GrantStatus.EXPIRED,
    (GrantStatus.ACTIVE, "revoke"): GrantStatus.REVOKED,
}


class InvalidTransition(Exception):
    """The event is not allowed in the record's current state (the caller's fault)."""


def next_request_status(status: RequestStatus, event: str) -> RequestStatus:
    """The state after ``event``; raises ``InvalidTransition`` when the table has no entry."""
    try:
        return REQUEST_TRANSITIONS[(status, event)]
    except KeyError:
        raise InvalidTransition(f"cannot {event} a request that is {status.value}") from None


def next_grant_status(status: GrantStatus, event: str) -> GrantStatus:
    """The state after ``event``; raises ``InvalidTransition`` when the table has no entry."""
    try:
        return GRANT_TRANSITIONS[(status, event)]
    except KeyError:
        raise InvalidTransition(f"cannot {event} a grant that is {status.value}") from None


@dataclass(frozen=True)
class AccessRequest:
    """A person's request for ``login`` on ``target`` for ``duration`` seconds."""

    id: int
    requester: str
    target: str
    login: str
    duration: int
    reason: str
    policy: str
    status: RequestStatus
    created_at: float
    decided_at: float | None = None
    decided_by: str | None = None
    decision_comment: str | None = None
    extends_grant: int | None = None  # an extension of that grant rather than a new grant

    def decided(self, event: str, by: str, at: float, comment: str | None) -> "AccessRequest":
        return replace(self, status=next_request_status(self.status, event), decided_by=by,
                       decided_at=at, decision_comment=comment)


def first_use_window(duration: int, start_by: str) -> str:
    """How a first-use grant not started yet is shown: its window and the deadline to start it
    (``duration`` seconds; ``start_by`` already formatted), e.g. "1h from first use, start by
    2026-12-01T00:00:00.000Z"."""
    return f"{format_duration(duration)} from first use, start by {start_by}"


@dataclass(frozen=True)
class Grant:
    """Access for ``user`` as ``login`` on ``target`` during [starts_at, ends_at) (POSIX seconds)."""

    id: int
    request_id: int
    user: str
    target: str
    login: str
    policy: str
    starts_at: float
    ends_at: float
    status: GrantStatus = GrantStatus.ACTIVE
    ended_at: float | None = None
    ended_by: str | None = None
    # a first-use window: until the first session, [starts_at, ends_at) is only the deadline to
    # start; the first session starts ``duration`` seconds of access
    awaiting_first_use: bool = False
    duration: int | None = None

    def extended(self, seconds: int) -> "Grant":
        """The grant ``seconds`` longer (an approved or self-service ``extend``); before a
        first-use grant starts, its window grows (its start deadline stays)."""
        if self.awaiting_first_use:
            return replace(self, duration=(self.duration or 0) + seconds)
        return replace(self, ends_at=self.ends_at + seconds)

    def started(self, now: float) -> "Grant":
        """The grant once its first session starts the window (first-use policies)."""
        assert self.awaiting_first_use and self.duration is not None
        return replace(self, starts_at=now, ends_at=now + self.duration, awaiting_first_use=False)

    def is_live(self, now: float) -> bool:
        return self.status is GrantStatus.ACTIVE and self.starts_at <= now < self.ends_at

    def ended(self, event: str, by: str, at: float) -> "Grant":
        return replace(self, status=next_grant_status(self.status, event), ended_at=at, ended_by=by)

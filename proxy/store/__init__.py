"""Durable state: requests, approvals, grants, issued certificates and sessions.

What it is for: the ``Store`` protocol the runtime programs against, so that the embedded SQLite
store and a later shared PostgreSQL store are interchangeable.

What it must not do: apply policy (callers decide; the store records), or be called from protocol
code (the runtime passes what protocol code needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.access.model import AccessRequest, Grant, GrantStatus, RequestStatus


# (user, policy names): rows of that user, or under policies the user approves for
Visibility = tuple[str, list[str]]


@dataclass(frozen=True)
class SessionRecord:
    id: int
    user: str
    target: str
    login: str
    grant_id: int
    kind: str            # "shell", "exec", "subsystem"
    detail: str | None   # the command or subsystem name
    started_at: float
    ended_at: float | None = None
    end_reason: str | None = None
    recording: str | None = None
    recording_sha256: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(frozen=True)
class CertificateRecord:
    serial: int
    kind: str            # "user" or "host"
    key_id: str
    principals: str      # comma-separated
    valid_after: int
    valid_before: int
    grant_id: int | None
    issued_at: float


@dataclass(frozen=True)
class DBRoleRecord:
    grant_id: int
    target: str
    role: str
    created_at: float
    dropped_at: float | None = None


class Store(Protocol):
    async def create_request(self, *, requester: str, target: str, login: str, duration: int,
                             reason: str, policy: str, now: float,
                             extends_grant: int | None = None) -> AccessRequest: ...
    async def extend_grant(self, extended: Grant) -> bool: ...
    async def get_request(self, request_id: int) -> AccessRequest | None: ...
    async def list_requests(self, *, status: RequestStatus | None = None,
                            requester: str | None = None, visible_to: Visibility | None = None,
                            limit: int = 100) -> list[AccessRequest]: ...
    async def decide_request(self, decided: AccessRequest, *, grant_ends_at: float | None,
                             now: float, first_use: bool = False) -> Grant | None: ...
    async def start_window(self, started: Grant) -> bool: ...
    async def add_approval(self, request_id: int, approver: str, comment: str | None,
                           now: float) -> None: ...
    async def approvers_of(self, request_id: int) -> list[str]: ...
    async def get_grant(self, grant_id: int) -> Grant | None: ...
    async def list_grants(self, *, user: str | None = None, status: GrantStatus | None = None,
                          visible_to: Visibility | None = None, limit: int = 100) -> list[Grant]: ...
    async def end_grant(self, ended: Grant) -> bool: ...
    async def record_certificate(self, *, kind: str, key_id_prefix: str, principals: list[str],
                                 valid_after: int, valid_before: int, grant_id: int | None,
                                 now: float) -> CertificateRecord: ...
    async def get_certificate(self, serial: int) -> CertificateRecord | None: ...
    async def create_session(self, *, user: str, target: str, login: str, grant_id: int,
                             kind: str, detail: str | None, now: float) -> SessionRecord: ...
    async def end_session(self, session_id: int, *, now: float, reason: str,
                          recording: str | None, recording_sha256: str | None,
                          bytes_up: int, bytes_down: int) -> None: ...
    async def list_sessions(self, *, live: bool | None = None, user: str | None = None,
                            visible_to: Visibility | None = None,
                            limit: int = 100) -> list[SessionRecord]: ...
    async def close_orphan_sessions(self, *, now: float, reason: str) -> int: ...
    async def record_db_role(self, *, grant_id: int, target: str, role: str,
                             now: float) -> None: ...
    async def mark_db_role_dropped(self, role: str, *, now: float) -> None: ...
    async def list_db_roles(self, *, live: bool = True) -> list[DBRoleRecord]: ...
    async def close(self) -> None: ...

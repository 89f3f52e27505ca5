"""The local admin socket: operators' commands on the proxy host, checked by SO_PEERCRED.

What it is for: a unix stream socket (mode 0660, group ``daemon.admin_group``) answering one JSON
request per connection — ``status``, ``sessions.kill``, ``grants.revoke``, ``recordings.list``,
``recordings.get`` — for ``jit-proxy status|sessions|grants|recordings`` run by root or a member
of the admin group. ``request()`` is the client side.

What it must not do: trust anything but the kernel's word on the peer (SO_PEERCRED), answer more
than one bounded request per connection, or let a refused peer learn anything but the refusal.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import socket
import struct
from pathlib import Path
from typing import Any

import logging

from proxy.clock import rfc3339
from proxy.runtime.service import AccessError, AccessService

MAX_REQUEST = 4096  # bytes of one JSON request
log = logging.getLogger("jit_proxy.admin")


class AdminError(Exception):
    """The admin socket refused or could not answer; the message says why."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


def peer_allowed(uid: int, gid: int, admin_group: str | None) -> bool:
    """Root, the daemon's own user, or a member (primary or supplementary) of ``admin_group``."""
    if uid in (0, os.geteuid()):
        return True
    if not admin_group:
        return False
    try:
        group = grp.getgrnam(admin_group)
    except KeyError:
        return False
    if gid == group.gr_gid:
        return True
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return name in group.gr_mem or group.gr_gid in os.getgrouplist(name, gid)


class AdminServer:
    def __init__(self, service: AccessService, daemon: Any):
        self.service = service
        self.daemon = daemon
        self.server: asyncio.base_events.Server | None = None
        self.path: Path | None = None

    async def start(self) -> None:
        cfg = self.service.config
        self.path = cfg.admin_socket_path
        # (0755: admin_group's members must reach the socket, which is 0660 and checks peers)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.path.unlink(missing_ok=True)
        old = os.umask(0o117)  # created 0660: never wider, not even briefly
        try:
            self.server = await asyncio.start_unix_server(self._client, str(self.path),
                                                          limit=MAX_REQUEST)
        finally:
            os.umask(old)
        if cfg.daemon.admin_group:
            try:
                os.chown(self.path, -1, grp.getgrnam(cfg.daemon.admin_group).gr_gid)
            except (KeyError, PermissionError) as exc:
                self.service.audit.emit("proxy.admin.group_unusable", "system",
                                        group=cfg.daemon.admin_group, error=str(exc))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
            try:
                user = pwd.getpwuid(uid).pw_name
            except KeyError:
                user = f"uid:{uid}"
            actor = f"local:{user}"
            if not peer_allowed(uid, gid, self.service.config.daemon.admin_group):
                self.service.audit.emit("proxy.admin.refused", actor, pid=pid, uid=uid)
                answer: dict[str, Any] = {"error": "not allowed: root or the admin group only"}
            else:
                try:
                    line = await asyncio.wait_for(reader.readline(), 10)
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                    answer = await self._answer(actor, request)
                except (ValueError, asyncio.LimitOverrunError, asyncio.TimeoutError) as exc:
                    answer = {"error": f"bad request: {exc}"}
                except AccessError as exc:
                    answer = {"error": str(exc)}
                except Exception:  # one bad request never takes the socket down
                    log.exception("admin request failed")
                    answer = {"error": "internal error (see the daemon's log)"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _answer(self, actor: str, request: dict) -> dict:
        service = self.service
        command = request.get("command")
        if command == "status":
            service.audit.emit("proxy.admin.status", actor)
            pending = await service.store.list_requests(status=_pending(), limit=1000)
            return {
                "listeners": self.daemon.listeners(),
                "live_sessions": [_session(s.record) for s in service.live_sessions.values()],
                "active_grants": [{"id": g.id, "user": g.user, "target": g.target,
                                   "login": g.login, "ends_at": rfc3339(g.ends_at),
                                   "awaiting_first_use": g.awaiting_first_use,
                                   "duration": g.duration}
                                  for g in service.active.values()],
                "pending_requests": [{"id": r.id, "requester": r.requester,
                                      "target": r.target, "login": r.login,
                                      "reason": r.reason} for r in pending],
                "lockouts": [{"subject": k, "until": rfc3339(t)} for k, t in service.lockouts()],
            }
        if command == "ca":
            from proxy.ssh.commands import ca_answer
            data, text = ca_answer(service, request.get("pg") is True)
            return {**data, "text": text}
        if command == "lockouts.clear":
            subject = request.get("subject")
            if not isinstance(subject, str):
                raise AccessError("expected a subject: user:NAME, keyholder:NAME or address:IP")
            service.unlock(actor, subject)
            return {"unlocked": subject}
        if command == "roles.forget":
            return {"forgotten": await _forget_role(service, actor, request.get("role"))}
        if command == "sessions.kill":
            record = await service.kill_session(actor, _id(request))
            return {"killed": _session(record)}
        if command == "grants.revoke":
            grant = service.active.get(_id(request))
            if grant is None:
                raise AccessError(f"no active grant {_id(request)}")
            ended = await service.end_grant(grant, "revoke", actor)
            return {"revoked": ended.id}
        if command == "recordings.list":
            from proxy.runtime.recordings import list_recordings
            return {"recordings": await list_recordings(service, request)}
        if command == "recordings.get":
            from proxy.runtime.recordings import get_recording
            return await get_recording(service, actor, _id(request),
                                       play=request.get("play") is True)
        raise AccessError(f"unknown command {command!r}")


async def _forget_role(service: AccessService, actor: str, role: Any) -> str:
    """Stop tracking ``role``, a role on a target that is no longer configured (reported as
    ``db.role.orphaned`` at every start), once an operator has dropped it by hand."""
    if not isinstance(role, str):
        raise AccessError("expected a role name (from a db.role.orphaned event)")
    from proxy.config import PostgresTarget
    records = [r for r in await service.store.list_db_roles(live=True) if r.role == role]
    if not records:
        raise AccessError(f"the proxy tracks no role {role!r}")
    target = records[0].target
    if isinstance(service.config.targets.get(target), PostgresTarget):
        raise AccessError(f"{role} is on {target}, a configured target: the proxy drops it "
                          f"itself at its grant's end")
    await service.store.mark_db_role_dropped(role, now=service.clock.now())
    service.audit.emit("db.role.forgotten", actor, role=role, target=target,
                       grant=records[0].grant_id)
    return role


def _pending():
    from proxy.access.model import RequestStatus
    return RequestStatus.PENDING


def _id(request: dict) -> int:
    value = request.get("id")
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**63:
        raise AccessError("an id (a positive integer) is required")
    return value


def _session(record: Any) -> dict:
    return {"id": record.id, "user": record.user, "target": record.target,
            "login": record.login, "kind": record.kind, "detail": record.detail,
            "grant": record.grant_id, "started_at": rfc3339(record.started_at)}


def request(path: Path, command: str, **fields: Any) -> dict:
    """Send one request to the admin socket at ``path`` and return the answer.

    Raises:
        AdminError: the socket is missing, not ours to use, or the daemon refused.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(str(path))
            sock.sendall(json.dumps({"command": command, **fields}).encode() + b"\n")
            data = b""
            while chunk := sock.recv(1 << 20):
                data += chunk
    except FileNotFoundError:
        raise AdminError(f"{path}: no admin socket (is jit-proxy running?)") from None
    except PermissionError:
        raise AdminError(f"{path}: permission denied (root or the admin group only)") from None
    except OSError as exc:
        raise AdminError(f"{path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise AdminError(f"{path}: the daemon sent no answer") from None
    if "error" in answer:
        raise AdminError(answer["error"])
    return answer

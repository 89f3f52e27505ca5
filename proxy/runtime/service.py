"""The access workflow: requests, approvals, grants, certificates and grant teardown.

What it is for: carrying out each workflow action for an authenticated actor — asking
``proxy.access.policy`` whether it is allowed, recording it in the store, auditing it (allowed or
refused), and, when a grant ends, closing every live connection under it.

What it must not do: speak a protocol (callers in ``proxy.ssh`` render results), or read the time
except through the injected clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import asyncssh

from ca import SSHCertificateAuthority, UserCertificateSpec
from proxy.access import policy
from proxy.access.duration import format_duration
from proxy.access.model import AccessRequest, Grant, GrantStatus, RequestStatus
from proxy.audit.log import AuditLog
from proxy.auth import address_of
from proxy.auth.identity import SystemIdentities
from proxy.clock import Clock, rfc3339
from proxy.config import Config
from proxy.store import SessionRecord, Store

log = logging.getLogger("jit_proxy.service")
# failed-login counts kept (users and addresses), and the most kept for users when addresses
# alone would not bring them under FAILURE_SUBJECTS (see AccessService._forget_failures)
FAILURE_SUBJECTS = 10_000
FAILURE_SUBJECTS_HARD = 50_000


def known_hosts_patterns(config: Config, ssh_port: int) -> list[str]:
    """The host patterns of the ``@cert-authority`` line clients need: the proxy's names (with
    ``[name]:port`` when it does not listen on 22) and the SSH targets' names. Narrower than ``*``,
    so the proxy's host CA vouches for nothing else the client connects to."""
    names = list(config.ssh.host_names)
    if ssh_port != 22:
        names += [f"[{n}]:{ssh_port}" for n in config.ssh.host_names]
    names += [name for name, t in config.targets.items() if t.kind == "ssh"]
    return names


MAX_PENDING_PER_USER = 20
AUTH_FAILURES_PER_MINUTE = 20  # audited one by one per source address; the rest are counted


def request_payload(req: AccessRequest) -> dict:
    """A request as JSON data (what ``requests --json`` and the webhook show)."""
    return {"id": req.id, "requester": req.requester, "target": req.target, "login": req.login,
            "duration": req.duration, "reason": req.reason, "policy": req.policy,
            "status": req.status.value, "created_at": rfc3339(req.created_at),
            "extends_grant": req.extends_grant}


class AccessError(Exception):
    """An action was refused; the message is the sentence shown to the person."""


class GrantHooks(Protocol):
    """Work a kind of target needs when a grant starts or ends (e.g. ephemeral database roles)."""

    async def granted(self, grant: Grant) -> None: ...

    def ended(self, grant: Grant) -> None:
        """Start the teardown; must not block (retries are the hook's own business)."""

    async def window_started(self, grant: Grant) -> None:
        """The grant's end is now known or moved (first use, extension)."""


class Terminable(Protocol):
    """A live connection under a grant that the service can end."""

    async def terminate(self, line: str, reason: str = "grant ended") -> None:
        """Close with ``line`` shown to the user; ``reason`` goes into the session's audit."""


@dataclass(frozen=True)
class ApprovalProgress:
    """An approval was recorded; the request needs ``needed`` distinct approvers in all."""

    request_id: int
    approvals: int
    needed: int


@dataclass(frozen=True)
class LiveSession:
    """A session in progress: its record, and how to end it (``await kill(line, reason)``)."""

    record: SessionRecord
    kill: Any


@dataclass
class _HostCert:
    cert: asyncssh.SSHCertificate
    renew_at: float


@dataclass
class AccessService:
    config: Config
    store: Store
    audit: AuditLog
    clock: Clock
    ca: SSHCertificateAuthority
    host_key: asyncssh.SSHKey
    active: dict[int, Grant] = field(default_factory=dict)
    connections: dict[int, set[Terminable]] = field(default_factory=dict)
    _host_certs: dict[str, _HostCert] = field(default_factory=dict)
    hooks: list[GrantHooks] = field(default_factory=list)
    live_sessions: dict[int, LiveSession] = field(default_factory=dict)
    request_listeners: set[asyncio.Queue] = field(default_factory=set)  # requests --watch
    # (user, target) of the ssh -J connections to targets begun before their login claimed
    # them (proxy.ssh.bridge.JumpConnection.connect_early): one each at most
    early_upstreams: set[tuple[str, str]] = field(default_factory=set)
    # and until when (loop time) none begins again for a (user, target) whose last one was
    # dropped unclaimed: each is a connection the target accepts and the audit log never sees
    early_cooldown: dict[tuple[str, str], float] = field(default_factory=dict)
    webhook: Any = None
    ssh_port: int = 22  # set by the listener once bound
    postgres: Any = None  # the PostgreSQL front door (db-login, its CA) when configured
    _unpersisted: dict[int, Grant] = field(default_factory=dict)
    _ending: set[int] = field(default_factory=set)  # grants an expiry sweep is ending now
    _background: set[asyncio.Task] = field(default_factory=set)
    _auth_failures: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    _preauth: dict[str, int] = field(default_factory=dict)
    _approval_locks: dict[int, asyncio.Lock] = field(default_factory=dict)
    _failures: dict[str, list[float]] = field(default_factory=dict)
    _locked_until: dict[str, float] = field(default_factory=dict)
    _in_flight: dict[str, int] = field(default_factory=dict)  # PAM checks running, per key
    _checks: set[asyncio.Task] = field(default_factory=set)  # their verdict tasks
    _preauth_total: int = 0
    _refused_preauth: int = 0
    identities: SystemIdentities = field(default_factory=SystemIdentities)

    def __post_init__(self) -> None:
        self.use_config(self.config)

    def use_config(self, config: Config) -> None:
        """Run with ``config`` from now on (at start and on reload); its ``group:`` references
        see the system groups resolved at login when ``auth.identities`` is ``system``."""
        config.bind_system_groups(self.identities.cached_groups)
        self.config = config
        for grant in self.active.values():  # (none at start: grants are loaded afterwards)
            allowed = policy.grant_allowed(config, grant)
            if not allowed:
                self.audit.emit("access.grant.disallowed", "system", grant=grant.id,
                                user=grant.user, target=grant.target, login=grant.login,
                                why=allowed.reason)
                log.warning("grant %s (%s, %s@%s) is no longer allowed: %s; it opens no new "
                            "session, and its live ones carry on until it ends or is revoked "
                            "(jit-proxy grants revoke %s)", grant.id, grant.user, grant.login,
                            grant.target, allowed.reason, grant.id)

    def spawn(self, coro: Any, drain: bool = True) -> asyncio.Task:
        """Run ``coro`` in the background; ``drain`` waits for all of them (at shutdown) but
        those spawned with ``drain=False`` (login checks, cancelled when the process ends)."""
        task = asyncio.get_running_loop().create_task(coro)
        tasks = self._background if drain else self._checks
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    async def drain(self) -> None:
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def terminate_all(self, line: str, reason: str) -> int:
        """Close every live connection (grants stay active); returns how many there were."""
        conns = [c for group in self.connections.values() for c in group]
        await asyncio.gather(*(c.terminate(line, reason) for c in conns), return_exceptions=True)
        return len(conns)

    async def start(self) -> None:
        """Load active grants; end sessions a previous process left open; expire what is due."""
        for grant in await self.store.list_grants(status=GrantStatus.ACTIVE, limit=1_000_000):
            self.active[grant.id] = grant
        n = await self.store.close_orphan_sessions(now=self.clock.now(), reason="proxy restarted")
        if n:
            self.audit.emit("ssh.session.orphaned", "system", count=n)
        await self.expire_due()

    # --- requests --------------------------------------------------------------------------------

    async def request(self, actor: str, target: str, login: str, duration: int,
                      reason: str) -> AccessRequest:
        decision = policy.decide_request(self.config, actor, target, login, duration, reason)
        if not decision:
            self.audit.emit("access.request.refused", actor, target=target, login=login,
                            duration=duration, reason=reason, why=decision.reason)
            raise AccessError(decision.reason)
        _, why = await self._pending_of(actor)
        if why is not None:
            self.audit.emit("access.request.refused", actor, target=target, login=login,
                            duration=duration, reason=reason, why=why)
            raise AccessError(why)
        req = await self.store.create_request(requester=actor, target=target, login=login,
                                              duration=duration, reason=reason,
                                              policy=decision.policy or "", now=self.clock.now())
        self.audit.emit("access.request.created", actor, request=req.id, target=target,
                        login=login, duration=duration, reason=reason, policy=req.policy)
        if not policy.auto_approves(self.config, req):
            self._announce(req)
        else:
            grant = await self._grant(req, f"policy:{req.policy}", "approved by policy",
                                      auto=True)
            return replace(req, status=RequestStatus.APPROVED,
                           decided_by=f"policy:{req.policy}", decided_at=grant.starts_at)
        return req

    async def expire_pending(self) -> int:
        """Mark pending requests past their policy's request TTL as expired; returns how many."""
        now = self.clock.now()
        count = 0
        for req in await self.store.list_requests(status=RequestStatus.PENDING, limit=100_000):
            if policy.request_expired(self.config, req, now):
                try:
                    await self.store.decide_request(req.decided("expire", "system", now, None),
                                                    grant_ends_at=None, now=now)
                except LookupError:
                    continue
                self.audit.emit("access.request.expired", "system", request=req.id,
                                requester=req.requester, target=req.target)
                count += 1
        return count

    async def _pending_of(self, actor: str) -> tuple[list[AccessRequest], str | None]:
        """``actor``'s pending requests, and why they may not add one (the per-user cap)."""
        pending = await self.store.list_requests(status=RequestStatus.PENDING, requester=actor,
                                                 limit=MAX_PENDING_PER_USER)
        if len(pending) >= MAX_PENDING_PER_USER:
            return pending, (f"{actor} already has {MAX_PENDING_PER_USER} pending requests; "
                             f"wait for a decision")
        return pending, None

    async def _pending(self, actor: str, request_id: int, what: str
                       ) -> tuple[AccessRequest, tuple[str, ...]]:
        """The pending request ``actor`` may decide, and (an approval) who approved it so far.

        Raises:
            AccessError: no such request, or the policy does not let ``actor`` decide it."""
        req = await self.store.get_request(request_id)
        if req is None:
            self.audit.emit(f"access.{what}.refused", actor, request=request_id,
                            why="no such request")
            raise AccessError(f"no request {request_id}")
        prior = tuple(await self.store.approvers_of(req.id)) if what == "approval" else ()
        decision = policy.decide_approval(self.config, actor, req, self.clock.now(), prior)
        if not decision:
            self.audit.emit(f"access.{what}.refused", actor, request=request_id,
                            why=decision.reason)
            raise AccessError(decision.reason)
        return req, prior

    def _check_text(self, actor: str, text: str | None, what: str, event: str) -> None:
        problem = policy.text_problem(text, what) if text else None
        if problem is not None:
            self.audit.emit(event, actor, why=problem)
            raise AccessError(problem)

    async def approve(self, actor: str, request_id: int, comment: str | None
                      ) -> Grant | ApprovalProgress:
        """One approval; the grant once the policy's number of distinct approvers is reached."""
        self._check_text(actor, comment, "comment", "access.approval.refused")
        lock = self._approval_locks.setdefault(request_id, asyncio.Lock())
        try:
            async with lock:  # check, count and record as one step per request
                req, approved = await self._pending(actor, request_id, "approval")
                p = policy.policy_named(self.config, req.policy)
                needed = p.approvals if p is not None else 1
                prior = set(approved)
                if p is not None:  # an approver a reload took away no longer counts
                    prior = {a for a in prior if policy.may_match(self.config, a, p.approvers)}
                have = len(prior | {actor})
                if have < needed:
                    await self.store.add_approval(req.id, actor, comment, self.clock.now())
                    self.audit.emit("access.request.approval_recorded", actor, request=req.id,
                                    comment=comment, approvals=have, needed=needed)
                    return ApprovalProgress(req.id, have, needed)
                return await self._grant(req, actor, comment)
        finally:
            if not lock.locked() and not lock._waiters:  # type: ignore[attr-defined]
                self._approval_locks.pop(request_id, None)

    async def extend(self, actor: str, grant_id: int, seconds: int, reason: str
                     ) -> Grant | AccessRequest:
        """Ask for ``seconds`` more on one's own active grant: applied at once when the policy
        allows self-extension, else an extension request that needs approval like any other.

        Raises:
            AccessError: not the actor's active grant, no reason, or beyond the maximum.
        """
        grant = self.active.get(grant_id)
        p = policy.policy_named(self.config, grant.policy) if grant is not None else None
        why = None
        if grant is None or grant.user != actor:
            why = f"grant {grant_id} is not an active grant of yours"
            ended = await self.store.get_grant(grant_id) if grant is None else None
            if ended is not None and ended.user == actor:
                why = (f"grant {grant_id} ended at {rfc3339(ended.ended_at or ended.ends_at)} "
                       f"({ended.status.value}): request the access anew")
        elif p is None:
            why = "the grant's policy no longer exists"
        elif not (allowed := policy.grant_allowed(self.config, grant)):
            why = f"grant {grant_id} is no longer allowed: {allowed.reason}"
        elif policy.reason_problem(reason, p):
            why = policy.reason_problem(reason, p)
        else:  # the whole grant, extensions included, stays within the policy's maximum
            total = (grant.duration or 0) + seconds if grant.awaiting_first_use else \
                grant.ends_at + seconds - grant.starts_at
            if total > p.max_duration:
                why = (f"the grant would last {format_duration(total)}, beyond the maximum of "
                       f"{format_duration(p.max_duration)} (policy {p.name})")
        if why is None and p is not None and not p.self_extend:
            pending, why = await self._pending_of(actor)
            if why is None and any(r.extends_grant == grant_id for r in pending):
                why = f"an extension of grant {grant_id} is already waiting for approval"
        if why is not None:
            self.audit.emit("access.extend.refused", actor, grant=grant_id, why=why)
            raise AccessError(why)
        assert grant is not None and p is not None
        if p.self_extend:
            return await self._extend(grant, seconds, actor, None)
        req = await self.store.create_request(
            requester=actor, target=grant.target, login=grant.login, duration=seconds,
            reason=reason, policy=grant.policy, now=self.clock.now(), extends_grant=grant.id)
        self.audit.emit("access.request.created", actor, request=req.id, target=req.target,
                        login=req.login, duration=seconds, reason=reason, policy=req.policy,
                        extends_grant=grant.id)
        self._announce(req)
        return req

    def _announce(self, req: AccessRequest) -> None:
        """Tell watchers and the webhook about a request waiting for approvers."""
        for listener in list(self.request_listeners):
            try:
                listener.put_nowait(req)
            except asyncio.QueueFull:  # a watcher that fell behind loses it, not the request
                pass
        if self.webhook is not None:
            self.webhook.request_created(request_payload(req))

    async def _extend(self, grant: Grant, seconds: int, actor: str,
                      request_id: int | None) -> Grant:
        longer = grant.extended(seconds)
        if not await self.store.extend_grant(longer) or grant.id not in self.active:
            raise AccessError(f"grant {grant.id} has ended")
        self.active[grant.id] = longer
        self.audit.emit("access.grant.extended", actor, grant=grant.id, request=request_id,
                        seconds=seconds, ends_at=rfc3339(longer.ends_at))
        for hook in self.hooks:  # e.g. the role's VALID UNTIL follows
            try:
                await hook.window_started(longer)
            except Exception as exc:
                log.error("moving the end of grant %s failed: %r", grant.id, exc)
        return longer

    async def _grant(self, req: AccessRequest, actor: str, comment: str | None,
                     auto: bool = False) -> Grant:
        now = self.clock.now()
        if req.extends_grant is not None:  # an approved extension: the grant lives longer
            grant = self.active.get(req.extends_grant)
            if grant is None:
                raise AccessError(f"grant {req.extends_grant} has ended; request access anew")
            try:
                await self.store.decide_request(req.decided("approve", actor, now, comment),
                                                grant_ends_at=None, now=now)
            except LookupError as exc:
                raise AccessError(str(exc)) from None
            self.audit.emit("access.request.approved", actor, request=req.id, comment=comment,
                            requester=req.requester, by_policy=auto)
            return await self._extend(grant, req.duration, actor, req.id)
        p = policy.policy_named(self.config, req.policy)
        first_use = p is not None and p.window_starts == "first_use"
        ends = now + (p.request_ttl if first_use and p is not None else req.duration)
        try:
            grant = await self.store.decide_request(req.decided("approve", actor, now, comment),
                                                    grant_ends_at=ends, now=now,
                                                    first_use=first_use)
        except LookupError as exc:
            raise AccessError(str(exc)) from None
        assert grant is not None
        self.active[grant.id] = grant
        self.audit.emit("access.request.approved", actor, request=req.id, comment=comment,
                        requester=req.requester, by_policy=auto)
        self.audit.emit("access.grant.created", actor, grant=grant.id, request=req.id,
                        user=grant.user, target=grant.target, login=grant.login,
                        starts_at=rfc3339(grant.starts_at), ends_at=rfc3339(grant.ends_at))
        for hook in self.hooks:
            try:
                await hook.granted(grant)
            except Exception as exc:  # the grant stands; the hook retries on first use
                log.error("preparing grant %s failed: %r", grant.id, exc)
                self.audit.emit("access.grant.setup_failed", "system", grant=grant.id,
                                error=str(exc)[:500])
        return grant

    async def deny(self, actor: str, request_id: int, reason: str) -> AccessRequest:
        problem = policy.reason_problem(reason)
        if problem is not None:
            self.audit.emit("access.denial.refused", actor, request=request_id, why=problem)
            raise AccessError(problem)
        req, _ = await self._pending(actor, request_id, "denial")
        decided = req.decided("deny", actor, self.clock.now(), reason)
        try:
            await self.store.decide_request(decided, grant_ends_at=None, now=self.clock.now())
        except LookupError as exc:
            raise AccessError(str(exc)) from None
        self.audit.emit("access.request.denied", actor, request=req.id, reason=reason,
                        requester=req.requester)
        return decided

    async def cancel(self, actor: str, request_id: int) -> AccessRequest:
        """Withdraw ``actor``'s own pending request (``access.request.cancelled``). Raises
        AccessError (audited as ``access.cancel.refused``): no such request of ``actor``'s
        (another's is not told apart from none), or no longer pending (decided, expired, or
        approved meanwhile: the store's conditional update lets only one decision win)."""
        req = await self.store.get_request(request_id)
        why = ("no such request" if req is None or req.requester != actor else
               None if req.status is RequestStatus.PENDING else f"it is {req.status.value}")
        if req is not None and why is None:
            decided = req.decided("cancel", actor, self.clock.now(), None)
            try:
                await self.store.decide_request(decided, grant_ends_at=None, now=self.clock.now())
            except LookupError:
                why = "it is no longer pending"
            else:
                self.audit.emit("access.request.cancelled", actor, request=req.id,
                                target=req.target, login=req.login)
                return decided
        self.audit.emit("access.cancel.refused", actor, request=request_id, why=why)
        raise AccessError(f"no request {request_id} of yours" if why == "no such request"
                          else f"request {request_id} cannot be cancelled: {why}")

    async def list_requests(self, actor: str, pending_only: bool) -> list[AccessRequest]:
        return await self.store.list_requests(
            status=RequestStatus.PENDING if pending_only else None,
            visible_to=self.visibility(actor), limit=200)

    # --- grants ----------------------------------------------------------------------------------

    def visibility(self, actor: str) -> tuple[str, list[str]]:
        """What ``actor`` may list: their own rows and those of policies they approve for."""
        return actor, [p.name for p in self.config.policies
                       if self.config.matches(actor, p.approvers)]

    async def list_live_sessions(self, actor: str) -> list[SessionRecord]:
        """Live sessions of ``actor``, and of grants whose policy ``actor`` approves for."""
        return await self.store.list_sessions(live=True, visible_to=self.visibility(actor),
                                              limit=500)

    async def list_grants(self, actor: str, active_only: bool) -> list[Grant]:
        return await self.store.list_grants(
            status=GrantStatus.ACTIVE if active_only else None,
            visible_to=self.visibility(actor), limit=200)

    async def revoke(self, actor: str, grant_id: int) -> Grant:
        grant = self.active.get(grant_id) or await self.store.get_grant(grant_id)
        if grant is None:
            self.audit.emit("access.revoke.refused", actor, grant=grant_id, why="no such grant")
            raise AccessError(f"no grant {grant_id}")
        decision = policy.decide_revoke(self.config, actor, grant)
        if not decision:
            self.audit.emit("access.revoke.refused", actor, grant=grant_id, why=decision.reason)
            raise AccessError(decision.reason)
        if grant_id not in self.active:  # memory is the truth about what is live
            ended = "ended" if grant.status is GrantStatus.ACTIVE else grant.status.value
            raise AccessError(f"grant {grant_id} has already {ended}" if ended == "ended"
                              else f"grant {grant_id} is already {ended}")
        return await self.end_grant(grant, "revoke", actor)

    async def use_grant(self, grant: Grant) -> Grant:
        """The grant a new session runs under: a first-use grant starts its window now."""
        current = self.active.get(grant.id, grant)
        if not current.awaiting_first_use:
            return current
        started = current.started(self.clock.now())
        if await self.store.start_window(started):
            self.active[grant.id] = started
            self.audit.emit("access.grant.started", current.user, grant=grant.id,
                            starts_at=rfc3339(started.starts_at),
                            ends_at=rfc3339(started.ends_at))
            for hook in self.hooks:
                try:
                    await hook.window_started(started)
                except Exception as exc:
                    log.error("starting the window of grant %s failed: %r", grant.id, exc)
            return started
        return self.active.get(grant.id, current)

    def live_grant(self, user: str, target: str, login: str) -> Grant | None:
        """The grant a new session of ``user`` as ``login`` on ``target`` runs under (live, and
        still allowed by the configuration as it is now), or None."""
        return policy.find_live_grant(self.live_grants_on(user, target), user, target, login,
                                      self.clock.now())

    def live_grants_on(self, user: str, target: str) -> list[Grant]:
        """``user``'s grants on ``target`` that may open a new session now (as ``live_grant``)."""
        now = self.clock.now()
        return [g for g in self.active.values()
                if g.user == user and g.target == target and g.is_live(now)
                and policy.grant_allowed(self.config, g)]

    def usable(self, grant_id: int) -> Grant | None:
        """Grant ``grant_id`` as it stands now, if it may open a new session (as ``live_grant``)."""
        grant = self.active.get(grant_id)
        if grant is None or not grant.is_live(self.clock.now()) \
                or not policy.grant_allowed(self.config, grant):
            return None
        return grant

    async def expire_due(self) -> list[Grant]:
        """End every active grant whose end has passed, concurrently, and retry recording ends
        that failed to persist. Safe to call often, also while an earlier call is still closing
        its grants' sessions (the sweep does not wait for it: grants ending a second later are
        not held up by a storm before them)."""
        now = self.clock.now()
        due = [g for g in self.active.values() if g.ends_at <= now and g.id not in self._ending]
        retry = [g for g in self._unpersisted.values() if g.id not in self._ending]
        self._ending.update(g.id for g in due + retry)  # a sweep meanwhile leaves them alone
        try:
            results = await asyncio.gather(*(self.end_grant(g, "expire", "system") for g in due),
                                           *(self._persist_end(g) for g in retry),
                                           return_exceptions=True)
        finally:
            self._ending.difference_update(g.id for g in due + retry)
        ended = []
        for grant, result in zip(due, results):
            if isinstance(result, BaseException):  # one grant's failure never blocks the others
                log.error("ending grant %s failed: %r", grant.id, result)
            else:
                ended.append(result)
        return ended

    async def end_grant(self, grant: Grant, event: str, actor: str) -> Grant:
        """End ``grant`` (``event`` is "expire" or "revoke"), in the order of DESIGN.md's
        teardown: refuse new sessions at once, close live connections with a line saying which
        access ended and when, then record the end (retried by the sweep if the store fails)."""
        now = self.clock.now()
        # it ended at its own end (the sweep that finds it runs up to a tick later), or now
        ended = grant.ended(event, actor, min(grant.ends_at, now))
        if self.active.pop(grant.id, None) is None:
            raise AccessError(f"grant {grant.id} has already ended")
        how = "was revoked by " + actor if event == "revoke" else "expired"
        try:
            self.audit.emit(f"access.grant.{'revoked' if event == 'revoke' else 'expired'}",
                            actor, grant=grant.id, user=grant.user, target=grant.target,
                            login=grant.login, ends_at=rfc3339(grant.ends_at))
        except Exception:  # e.g. a full disk: the sessions are closed all the same
            log.exception("auditing the end of grant %s failed", grant.id)
        line = (f"jit-proxy: access to {grant.login}@{grant.target} ended at "
                f"{rfc3339(ended.ended_at)} (grant {grant.id} {how})")
        conns = list(self.connections.pop(grant.id, ()))
        if conns:
            results = await asyncio.gather(*(c.terminate(line) for c in conns),
                                           return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            for r in failed:
                log.error("closing a connection of grant %s failed: %r", grant.id, r)
            self.audit.emit("access.grant.sessions_closed", "system", grant=grant.id,
                            connections=len(conns), failed=len(failed),
                            lag=round(max(0.0, self.clock.now() - min(grant.ends_at, now)), 3))
        await self._persist_end(ended)
        for hook in self.hooks:
            try:
                hook.ended(ended)
            except Exception:
                log.exception("tearing down grant %s failed to start", grant.id)
        return ended

    async def _persist_end(self, ended: Grant) -> None:
        try:
            await self.store.end_grant(ended)
        except Exception:
            log.exception("recording the end of grant %s failed; will retry", ended.id)
            self._unpersisted[ended.id] = ended
        else:
            self._unpersisted.pop(ended.id, None)

    def admit(self, address: str) -> bool:
        """Count a new unauthenticated connection (SSH or PostgreSQL) from ``address``; False
        when over ``ssh.max_unauthenticated`` in all or ``ssh.max_unauthenticated_per_address``
        (like sshd's MaxStartups). Every True must be followed by one ``leave``."""
        cfg = self.config.ssh
        if (self._preauth_total >= cfg.max_unauthenticated or
                self._preauth.get(address, 0) >= cfg.max_unauthenticated_per_address):
            self._refused_preauth += 1
            if self._refused_preauth in (1, 10, 100, 1000) or self._refused_preauth % 10000 == 0:
                self.audit.emit("ssh.connection.refused", "system", peer=address,
                                why="too many unauthenticated connections",
                                refused_so_far=self._refused_preauth)
            return False
        self._preauth_total += 1
        self._preauth[address] = self._preauth.get(address, 0) + 1
        return True

    def leave(self, address: str) -> None:
        self._preauth_total -= 1
        left = self._preauth.get(address, 1) - 1
        if left:
            self._preauth[address] = left
        else:
            self._preauth.pop(address, None)

    def auth_failure(self, claimed_user: str, peer: str, *, count: bool = True,
                     guessable: bool = True, after_key: bool = False, **fields: Any) -> None:
        """Audit a failed login (``auth.failure``, rate-limited per source address) and, unless
        ``count`` is False (the system failed, not the user: e.g. a PAM module missing), count it
        towards the lockout of that address and, for a ``guessable`` secret (a password, PAM),
        of that user. Keys and one-time secrets cannot be guessed: their failures count only
        against the address, so nobody can lock a named user out by failing on purpose. A
        password given ``after_key`` (the PAM step of a chain, after the user's key) is held back
        by ``keyholder:NAME`` only (see ``_lockout_keys``) and counts against it and against
        ``user:NAME`` too: a stolen key buys no second round of guesses at the user's password
        through the user's other password logins. The event's ``counts_against`` lists the
        subjects it counted against."""
        if not count:
            self.audit_unauthenticated("auth.failure", claimed_user, peer, counted=False,
                                       **fields)
            return
        now, cfg = self.clock.now(), self.config.auth
        # a subject already locked out is not counted (its lockout runs its course, it is not
        # extended); the others still are (a guess that ends while only the address is locked
        # out is still a guess at the user's password)
        keys = self._lockout_keys(claimed_user, peer, guessable, after_key)
        if guessable and after_key:  # (the user's own subject, as for a password without key)
            keys.insert(1, self._lockout_keys(claimed_user, peer)[0])
        keys = [(key, limit) for key, limit in keys if self._locked_until.get(key, 0) <= now]
        self.audit_unauthenticated("auth.failure", claimed_user, peer,
                                   counts_against=[key for key, _ in keys], **fields)
        for key, limit in keys:
            recent = [t for t in self._failures.get(key, []) if now - t < cfg.failure_window]
            recent.append(now)
            self._failures[key] = recent[-limit:]
            if len(recent) >= limit:
                self._locked_until[key] = now + cfg.lockout
                self.audit.emit("auth.lockout", "system", subject=key, failures=len(recent),
                                until=rfc3339(now + cfg.lockout))
        if len(self._failures) > FAILURE_SUBJECTS:
            self._forget_failures(now)
        for key in [k for k, until in self._locked_until.items() if until <= now]:
            del self._locked_until[key]

    def _forget_failures(self, now: float) -> None:
        """Keep the failure counts bounded without wiping a user's: failures outside
        ``auth.failure_window`` go first, then the addresses with the oldest failures (a flood
        from many addresses used to push a user's count out and reset it), and users' counts
        only past ``FAILURE_SUBJECTS_HARD``."""
        window = self.config.auth.failure_window
        for key in [k for k, times in self._failures.items() if now - times[-1] >= window]:
            del self._failures[key]
        by_age = sorted(self._failures, key=lambda k: self._failures[k][-1])
        addresses = [k for k in by_age if k.startswith("address:")]
        for key in addresses[:max(0, len(self._failures) - FAILURE_SUBJECTS // 2)]:
            del self._failures[key]
        left = [k for k in by_age if k in self._failures]  # users (and addresses, if few)
        for key in left[:max(0, len(self._failures) - FAILURE_SUBJECTS_HARD)]:
            del self._failures[key]

    def _lockout_keys(self, user: str, peer: str, guessable: bool = True,
                      after_key: bool = False) -> list[tuple[str, int]]:
        """The subjects whose lockouts hold back a login of ``user`` from ``peer`` and that its
        failures count against, each with its limit (``auth.max_failures``,
        ``auth.max_failures_per_address``): only the address's for a secret that cannot be
        guessed (see ``auth_failure``). For a password ``after_key``, ``keyholder:NAME``
        instead of ``user:NAME``: only whoever holds the user's key can run it up, so others
        failing passwords (e.g. on a ``client_auth: pam`` PostgreSQL port) do not hold back the
        password step of the user's own chain (its failures count against ``user:NAME`` too:
        ``auth_failure`` adds it)."""
        cfg = self.config.auth
        address = [(f"address:{address_of(peer)}", cfg.max_failures_per_address)]
        if not guessable:
            return address
        return [(f"{'keyholder' if after_key else 'user'}:{user[:64]}", cfg.max_failures),
                *address]

    def begin_attempt(self, user: str, peer: str, after_key: bool = False
                      ) -> tuple[str, list[str]] | None:
        """Reserve a slot for one password check (PAM) of ``user`` from ``peer`` (``after_key``:
        the PAM step of a chain, see ``_lockout_keys``); None, or why not and the subjects that
        hold it back: ``"locked out"``, or ``"too many logins in progress"`` (as many checks
        running as failures still allowed, so checks in flight cannot outrun the lockout). Pair
        with ``end_attempt`` (same arguments) once the check has ended."""
        locked = self.locked_subjects(user, peer, after_key=after_key)
        if locked:
            return "locked out", locked
        now, window = self.clock.now(), self.config.auth.failure_window
        keys = self._lockout_keys(user, peer, after_key=after_key)
        busy = [key for key, limit in keys
                if sum(1 for t in self._failures.get(key, []) if now - t < window)
                + self._in_flight.get(key, 0) >= limit]
        if busy:
            return "too many logins in progress", busy
        for key, _ in keys:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return None

    def end_attempt(self, user: str, peer: str, after_key: bool = False) -> None:
        for key, _ in self._lockout_keys(user, peer, after_key=after_key):
            left = self._in_flight.get(key, 0) - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)

    def auth_succeeded(self, user: str) -> None:
        """A completed login: the user's earlier failures no longer count (as pam_faillock);
        the source address's do, and a running lockout is not lifted."""
        self._failures.pop(f"user:{user[:64]}", None)
        self._failures.pop(f"keyholder:{user[:64]}", None)

    def lockouts(self) -> list[tuple[str, float]]:
        """Running lockouts: ``(subject, until)`` with subject ``user:NAME``, ``keyholder:NAME``
        (see ``_lockout_keys``) or ``address:IP`` and ``until`` in POSIX seconds, soonest end
        first."""
        now = self.clock.now()
        return sorted(((k, t) for k, t in self._locked_until.items() if t > now),
                      key=lambda kt: kt[1])

    def unlock(self, actor: str, subject: str) -> None:
        """End the lockout of ``subject`` (``user:NAME``, ``keyholder:NAME`` or ``address:IP``)
        now and forget its failures; audited as ``auth.unlocked``. Raises AccessError when it is
        not locked."""
        locked = ", ".join(k for k, _ in self.lockouts()) or "none"
        if not subject.startswith(("user:", "keyholder:", "address:")):
            raise AccessError(f"{subject!r}: give user:NAME, keyholder:NAME or address:IP "
                              f"(locked: {locked})")
        if self._locked_until.get(subject, 0) <= self.clock.now():
            raise AccessError(f"{subject!r} is not locked out (locked: {locked})")
        del self._locked_until[subject]
        self._failures.pop(subject, None)
        self.audit.emit("auth.unlocked", actor, subject=subject)

    def locked_out(self, user: str, peer: str, guessable: bool = True,
                   after_key: bool = False) -> bool:
        """Whether logins of ``user`` or from ``peer``'s address are locked out now; for a
        secret that cannot be guessed (a key, a one-time secret), only the address's lockout
        counts, for a password ``after_key`` the ``keyholder:NAME`` one instead of the user's
        (see ``_lockout_keys``)."""
        return bool(self.locked_subjects(user, peer, guessable, after_key))

    def lockout_text(self, subjects: list[str]) -> str:
        """What a client refused for the lockouts of ``subjects`` is told: that, and how long is
        left (rounded up to minutes, as pam_faillock says it), or "later" when none runs."""
        now = self.clock.now()
        left = max((self._locked_until.get(s, 0) - now for s in subjects), default=0)
        when = (f"in {format_duration(60 * math.ceil(left / 60))}" if left > 0 else "later")
        return f"jit-proxy: too many failed logins; try again {when}."

    def locked_subjects(self, user: str, peer: str, guessable: bool = True,
                        after_key: bool = False) -> list[str]:
        """The subjects (``user:NAME``, ``keyholder:NAME``, ``address:IP``) whose lockout holds
        back that login now (``locked_out``), for the audit events that refuse it."""
        now = self.clock.now()
        return [k for k, _ in self._lockout_keys(user, peer, guessable, after_key)
                if self._locked_until.get(k, 0) > now]

    def audit_unauthenticated(self, type: str, claimed_user: str, peer: str,
                              **fields: Any) -> None:
        """Audit something an unauthenticated peer did, at most ``AUTH_FAILURES_PER_MINUTE``
        events per source address a minute; the rest are counted and reported in one
        ``auth.failure.suppressed`` event, so nobody can fill the audit log without credentials."""
        address = address_of(peer)
        now = self.clock.now()
        window, count, suppressed = self._auth_failures.get(address, (now, 0, 0))
        if now - window >= 60:
            if suppressed:
                self.audit.emit("auth.failure.suppressed", "system", peer=address,
                                count=suppressed, since=rfc3339(window))
            window, count, suppressed = now, 0, 0
        if count < AUTH_FAILURES_PER_MINUTE:
            self.audit.emit(type, claimed_user[:64], peer=peer, **fields)
            count += 1
        else:
            suppressed += 1
        self._auth_failures[address] = (window, count, suppressed)
        if len(self._auth_failures) > 10_000:  # bounded: forget the oldest windows
            for key in sorted(self._auth_failures, key=lambda k: self._auth_failures[k][0])[:5000]:
                del self._auth_failures[key]

    async def kill_session(self, actor: str, session_id: int) -> SessionRecord:
        """End one live session now (operators); its grant stays valid.

        Raises:
            AccessError: no such live session.
        """
        live = self.live_sessions.get(session_id)
        if live is None:
            raise AccessError(f"no live session {session_id}")
        self.audit.emit("ssh.session.killed" if live.record.kind != "postgres"
                        else "db.session.killed", actor, session=session_id,
                        user=live.record.user, target=live.record.target)
        await live.kill(f"jit-proxy: this session was ended by an operator ({actor})",
                        f"killed by {actor}")
        return live.record

    def known_hosts_line(self) -> str:
        """The one known_hosts line that makes clients trust the proxy and its targets."""
        return self.ca.known_hosts_line(",".join(known_hosts_patterns(self.config, self.ssh_port)))

    def attach(self, grant_id: int, conn: Terminable) -> None:
        self.connections.setdefault(grant_id, set()).add(conn)

    def detach(self, grant_id: int, conn: Terminable) -> None:
        conns = self.connections.get(grant_id)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.connections[grant_id]

    # --- certificates ----------------------------------------------------------------------------

    async def user_certificate(self, grant: Grant, public_key: asyncssh.SSHKey
                               ) -> asyncssh.SSHCertificate:
        """Mint the certificate the proxy presents to the target for ``grant``: principal = the
        grant's login, valid from now minus the clock skew until the grant's end."""
        now = self.clock.now()
        valid_after = int(now - self.config.ca.clock_skew)
        valid_before = int(grant.ends_at)
        allow = policy.permissions(self.config, grant)
        rec = await self.store.record_certificate(
            kind="user", key_id_prefix=(f"jit-proxy user={grant.user} grant={grant.id} "
                                        f"request={grant.request_id}"),
            principals=[grant.login], valid_after=valid_after, valid_before=valid_before,
            grant_id=grant.id, now=now)
        cert = self.ca.issue_user_certificate(public_key, UserCertificateSpec(
            serial=rec.serial, key_id=rec.key_id, principal=grant.login,
            valid_after=valid_after, valid_before=valid_before,
            permit_agent_forwarding=allow.agent_forwarding,
            permit_port_forwarding=allow.port_forwarding,
            permit_x11_forwarding=allow.x11_forwarding))
        self.audit.emit("ca.certificate.issued", "system", kind="user", serial=rec.serial,
                        key_id=rec.key_id, principals=[grant.login], grant=grant.id,
                        valid_after=rfc3339(valid_after), valid_before=rfc3339(valid_before))
        return cert

    def clear_host_certificates(self) -> None:
        """Forget cached host certificates (after a reload, names may have changed)."""
        self._host_certs.clear()

    async def host_certificate(self, name: str, principals: list[str]) -> asyncssh.SSHCertificate:
        """The proxy host key's certificate for ``principals`` (cached, renewed at half-life)."""
        now = self.clock.now()
        cached = self._host_certs.get(name)
        if cached is not None and now < cached.renew_at:
            return cached.cert
        validity = self.config.ca.host_certificate_validity
        valid_after = int(now - self.config.ca.clock_skew)
        valid_before = int(now + validity)
        rec = await self.store.record_certificate(
            kind="host", key_id_prefix=f"jit-proxy host={name}", principals=principals,
            valid_after=valid_after, valid_before=valid_before, grant_id=None, now=now)
        cert = self.ca.issue_host_certificate(
            self.host_key, serial=rec.serial, key_id=rec.key_id, principals=principals,
            valid_after=valid_after, valid_before=valid_before)
        self.audit.emit("ca.certificate.issued", "system", kind="host", serial=rec.serial,
                        key_id=rec.key_id, principals=principals,
                        valid_after=rfc3339(valid_after), valid_before=rfc3339(valid_before))
        self._host_certs[name] = _HostCert(cert, now + validity / 2)
        return cert

    async def describe_denial(self, user: str, target: str, login: str | None) -> str:
        """The sentence telling a user which grant is missing and how to get it: that their
        request for it waits for an approver, else the request command when a policy lets them
        ask for it, else which logins they may ask for."""
        who = f"{login}@{target}" if login else target
        now = self.clock.now()
        for g in self.active.values():  # held, but a reload took it away
            if g.user == user and g.target == target and login in (None, g.login) \
                    and g.is_live(now) and not (allowed := policy.grant_allowed(self.config, g)):
                return (f"jit-proxy: {user}'s grant {g.id} for {g.login}@{target} is no longer "
                        f"allowed: {allowed.reason} (the configuration changed); it opens no "
                        f"new session.")
        head = f"jit-proxy: {user} has no active grant for {who}."
        try:  # (an extension of a grant that has ended can never be approved: not named)
            waiting = [r for r in await self.store.list_requests(
                           status=RequestStatus.PENDING, requester=user, limit=1000)
                       if r.target == target and login in (None, r.login)
                       and r.extends_grant is None]
        except Exception:  # the refusal goes out all the same, without the request
            log.exception("looking up %s's pending requests failed", user)
            waiting = []
        if waiting:
            r = max(waiting, key=lambda r: r.id)
            return (f"{head} Your request {r.id} ({r.login}@{target}) is waiting for approval: "
                    f"an approver decides it (ssh jit-proxy approve {r.id}).")
        allowed = sorted({name for p in self.config.policies
                          if target in p.targets and self.config.matches(user, p.requesters)
                          for name in policy.access_names(self.config, p, target)})
        if not allowed:
            return f"{head} No policy lets {user} request access to {target}."
        if login is not None and login not in allowed:
            return (f"{head} No policy lets {user} request {who}; logins {user} may request "
                    f"on {target}: {', '.join(allowed)}.")
        try:
            ended = [g for g in await self.store.list_grants(user=user, limit=20)
                     if g.target == target and login in (None, g.login)
                     and g.status is not GrantStatus.ACTIVE]
        except Exception:  # the refusal goes out all the same
            log.exception("looking up %s's grants failed", user)
            ended = []
        if ended:  # (the newest: list_grants gives the newest first)
            g = ended[0]
            head += (f" Your grant {g.id} ({g.login}@{target}) ended at "
                     f"{rfc3339(g.ended_at or g.ends_at)} ({g.status.value}).")
        return (f"{head} Request one with:\n  ssh jit-proxy request {target} --login "
                f"{login or allowed[0]} --for 1h --reason \"...\"")

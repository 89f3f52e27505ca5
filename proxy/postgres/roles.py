"""The ephemeral roles of all PostgreSQL grants: provisioning, credentials, teardown, reconciliation.

What it is for: the ``GrantHooks`` of PostgreSQL targets. At approval it creates the grant's role
(``Provisioner.create_role``, NOLOGIN); the listener opens a login window for each client
(``login_window``: LOGIN with a fresh password, closed again once the proxy is in); at the grant's end
it tears the role down in the background, retrying with exponential backoff so that one failing
cluster never blocks other grants; at start it reconciles: roles of ended grants and prefixed roles
that no live grant owns are dropped. A role stays with the provisioner it was made through (its
cluster's address and admin credentials) until it is dropped, whatever a reload does to its target
meanwhile; a role whose target is missing at start cannot be reached and is reported
(``db.role.orphaned``) at every start, until the target is configured again.

What it must not do: write a password anywhere (each login window sets a fresh one, kept in memory
only while the window is open), or let a teardown failure propagate into the grant's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from proxy.access.model import Grant
from proxy.config import PostgresTarget
from proxy.postgres.provisioner import EphemeralRole, Provisioner, role_name
from proxy.runtime.service import AccessService

log = logging.getLogger("jit_proxy.roles")

BACKOFF_START = 0.5
BACKOFF_MAX = 60.0


@dataclass
class _Window:
    count: int = 0
    role: EphemeralRole | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RoleManager:
    def __init__(self, service: AccessService):
        self.service = service
        self._names: dict[int, str] = {}  # grant id -> the name its role has (store, or made)
        self._made: set[int] = set()  # grants whose role this process made (or reset)
        self._windows: dict[int, _Window] = {}
        self._provisioners: dict[str, Provisioner] = {}  # configured target -> its provisioner
        # role name -> the provisioner of the cluster it lives on, until it is dropped: a reload
        # that changes or removes its target leaves it where it is
        self._placed: dict[str, Provisioner] = {}
        self.teardowns: dict[str, asyncio.Task] = {}  # role name -> its teardown
        self._creating: dict[int, asyncio.Task] = {}
        self._closing = False

    def _target(self, name: str) -> PostgresTarget | None:
        target = self.service.config.targets.get(name)
        return target if isinstance(target, PostgresTarget) else None

    def provisioner(self, target_name: str) -> Provisioner:
        """The target's provisioner (one per target, rebuilt when a reload changed it; the old
        one serves the roles made with it until they are dropped)."""
        target = self._target(target_name)
        assert target is not None and self.service.config.postgres is not None
        prefix = self.service.config.postgres.role_prefix
        cached = self._provisioners.get(target_name)
        if cached is not None and cached.prefix == prefix:
            if cached.target is target:
                return cached
            if cached.target == target:  # a reload with the same settings
                cached.target = target
                return cached
        if cached is not None:
            del self._provisioners[target_name]
            self._retire(cached)

        def report(step: str, fields: dict) -> None:
            self.service.audit.emit(step, "system", target=target_name, **fields)
        fresh = Provisioner(target_name, target, prefix, report)
        self._provisioners[target_name] = fresh
        return fresh

    def role_name(self, grant: Grant) -> str:
        """The grant's role: the name it was made with (``postgres.role_prefix`` may have
        changed since), or the name it gets."""
        known = self._names.get(grant.id)
        if known is not None:
            return known
        assert self.service.config.postgres is not None
        return role_name(self.service.config.postgres.role_prefix, grant.user, grant.id)

    def _role_provisioner(self, grant: Grant) -> Provisioner:
        """The provisioner of the cluster the grant's role lives on (its target's, if the role
        is not made yet)."""
        return self._placed.get(self.role_name(grant)) or self.provisioner(grant.target)

    # --- GrantHooks ------------------------------------------------------------------------------

    async def granted(self, grant: Grant) -> None:
        if self._target(grant.target) is not None:
            await self.credentials(grant)

    async def window_started(self, grant: Grant) -> None:
        if self._target(grant.target) is not None and grant.id in self._made:
            async with self._window(grant).lock:  # a client of the grant may be logging in
                await self._role_provisioner(grant).set_valid_until(self.role_name(grant),
                                                                    grant.ends_at)

    def ended(self, grant: Grant) -> None:
        name = self.role_name(grant)
        self._made.discard(grant.id)
        self._names.pop(grant.id, None)
        self._windows.pop(grant.id, None)
        provisioner = self._placed.get(name)  # where the role is, whatever a reload did since
        if provisioner is None and self._target(grant.target) is not None:
            provisioner = self.provisioner(grant.target)  # made before a restart, or never
        if provisioner is not None:  # (None: an SSH target, or a role this process never knew)
            self.schedule_teardown(grant.target, name, grant.id, provisioner)

    # --- roles and login windows -----------------------------------------------------------------

    async def credentials(self, grant: Grant) -> str:
        """Make sure the grant's role exists (first use, or after a restart); returns its name.

        Raises:
            LookupError: the grant is no longer active.
            asyncpg.PostgresError, OSError: the target cluster refused or is unreachable.
        """
        if grant.id not in self.service.active:
            raise LookupError(f"grant {grant.id} has ended")
        if grant.id in self._made:
            return self.role_name(grant)
        task = self._creating.get(grant.id)
        if task is None:  # one creation at a time per grant, shared by concurrent callers
            task = asyncio.get_running_loop().create_task(self._create(grant))
            self._creating[grant.id] = task
            task.add_done_callback(lambda _: self._creating.pop(grant.id, None))
        await asyncio.shield(task)
        return self.role_name(grant)

    async def _create(self, grant: Grant) -> None:
        target = self._target(grant.target)
        assert target is not None
        name = self.role_name(grant)
        provisioner = self.provisioner(grant.target)
        self._placed[name] = provisioner  # from the first statement on, the role may exist
        try:
            await provisioner.create_role(name, list(target.roles[grant.login]), grant.ends_at,
                                          grant.id)
            await self.service.store.record_db_role(grant_id=grant.id, target=grant.target,
                                                    role=name, now=self.service.clock.now())
        except BaseException:
            if grant.id in self.service.active:  # (the grant's end tears it down otherwise)
                self._placed.pop(name, None)
                self._retire(provisioner)
            raise
        if grant.id in self.service.active:
            self._names[grant.id] = name
            self._made.add(grant.id)
        else:  # the grant ended while we were creating: undo at once
            self.schedule_teardown(grant.target, name, grant.id, provisioner)
            raise LookupError(f"grant {grant.id} has ended")

    def _window(self, grant: Grant) -> _Window:
        """The grant's one ``_Window``: every ALTER ROLE of a live grant's role (LOGIN, NOLOGIN,
        VALID UNTIL) runs under its lock. It lives as long as the grant (``ended`` forgets it):
        were it dropped when no client was logging in, a client arriving while another's window
        closes would get a lock of its own, and its LOGIN would race the NOLOGIN on the same
        catalog row ("tuple concurrently updated", or a NOLOGIN landing after the LOGIN).

        Raises:
            LookupError: the grant is no longer active (no window is made for it).
        """
        if grant.id not in self.service.active:
            raise LookupError(f"grant {grant.id} has ended")
        return self._windows.setdefault(grant.id, _Window())

    @contextlib.asynccontextmanager
    async def login_window(self, grant: Grant) -> AsyncIterator[EphemeralRole]:
        """The role may log in (with a fresh password) while the block runs; windows of
        concurrent clients of the same grant share one opening.

        Raises:
            LookupError: the grant is no longer active.
            asyncpg.PostgresError, OSError: the target cluster refused or is unreachable.
        """
        name = await self.credentials(grant)
        window = self._window(grant)
        provisioner = self._role_provisioner(grant)
        async with window.lock:
            if window.count == 0:
                window.role = await provisioner.open_login(name)
            window.count += 1
        try:
            assert window.role is not None
            yield window.role
        finally:
            async with window.lock:
                window.count -= 1
                if window.count == 0:
                    window.role = None
                    try:
                        await provisioner.close_login(name)
                    except Exception as exc:  # teardown makes it NOLOGIN in any case
                        log.warning("closing the login window of %s failed: %s", name, exc)

    # --- teardown --------------------------------------------------------------------------------

    def schedule_teardown(self, target: str, role: str, grant_id: int | None,
                          provisioner: Provisioner) -> None:
        """Drop ``role`` through ``provisioner`` (the cluster it lives on) in the background,
        retrying with backoff until it is gone."""
        if role in self.teardowns:
            return
        self._placed[role] = provisioner
        task = asyncio.get_running_loop().create_task(
            self._teardown(target, role, grant_id, provisioner))
        self.teardowns[role] = task

        def done(task: asyncio.Task) -> None:
            self.teardowns.pop(role, None)
            if not task.cancelled() and task.exception() is None:
                self._placed.pop(role, None)
                self._retire(provisioner)
        task.add_done_callback(done)

    def reloaded(self) -> None:
        """The configuration changed: provisioners of targets a reload removed or changed are
        closed once no role lives on them."""
        for name, provisioner in list(self._provisioners.items()):
            target = self._target(name)
            if target is None or target != provisioner.target:
                del self._provisioners[name]
                self._retire(provisioner)

    def _retire(self, provisioner: Provisioner) -> None:
        """Close ``provisioner`` if it serves no configured target and no role lives on it."""
        if (self._closing or any(p is provisioner for p in self._provisioners.values())
                or any(p is provisioner for p in self._placed.values())):
            return
        self.service.spawn(provisioner.close())

    async def _teardown(self, target: str, role: str, grant_id: int | None,
                        provisioner: Provisioner) -> None:
        delay = BACKOFF_START
        attempt = 1
        while True:
            try:
                await provisioner.teardown(role)
                await self.service.store.mark_db_role_dropped(role, now=self.service.clock.now())
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # retried with backoff, never blocks other grants
                self.service.audit.emit("db.role.teardown_failed", "system", target=target,
                                        role=role, grant=grant_id, attempt=attempt,
                                        error=str(exc)[:500], retry_in=delay)
                log.warning("teardown of role %s on %s failed (attempt %d): %s", role, target,
                            attempt, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            attempt += 1

    async def reconcile(self) -> None:
        """At start: drop roles of ended grants, and prefixed roles no live grant owns (on any
        target: several targets may share one cluster, whose roles each of them lists); learn
        the names of live grants' roles; report roles whose target is gone."""
        live = {g.id for g in self.service.active.values() if self._target(g.target)}
        owned: set[str] = set()
        for rec in await self.service.store.list_db_roles(live=True):
            if rec.grant_id in live:
                owned.add(rec.role)
                self._names[rec.grant_id] = rec.role
                self._placed[rec.role] = self.provisioner(rec.target)
            elif self._target(rec.target) is not None:
                self.schedule_teardown(rec.target, rec.role, rec.grant_id,
                                       self.provisioner(rec.target))
            else:
                self._orphaned(rec.target, rec.role, rec.grant_id)
        for name, target in self.service.config.targets.items():
            if not isinstance(target, PostgresTarget):
                continue
            try:
                existing = await self.provisioner(name).existing_roles()
            except Exception as exc:
                self.service.audit.emit("db.reconcile.failed", "system", target=name,
                                        error=str(exc)[:500])
                continue
            for role in existing:
                if role not in owned:
                    self.schedule_teardown(name, role, None, self.provisioner(name))

    def _orphaned(self, target: str, role: str, grant_id: int | None) -> None:
        """A role on a target no longer configured, which the proxy cannot reach: say so (the
        event is a warning in the operator's log too)."""
        why = (f"{target} is no longer a configured PostgreSQL target: drop the role on its "
               f"cluster by hand, then run 'jit-proxy roles forget {role}' (or configure the "
               f"target again: the proxy then drops it); until then this repeats at every start")
        self.service.audit.emit("db.role.orphaned", "system", target=target, role=role,
                                grant=grant_id, why=why)

    async def close(self) -> None:
        """Cancel teardowns and creations (a restart reconciles), then close every provisioner."""
        self._closing = True
        tasks = list(self.teardowns.values()) + list(self._creating.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        provisioners = {id(p): p for p in [*self._provisioners.values(), *self._placed.values()]}
        self._provisioners.clear()
        self._placed.clear()
        for provisioner in provisioners.values():
            try:
                await provisioner.close()
            except Exception:
                pass

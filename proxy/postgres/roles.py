"""The ephemeral roles of all PostgreSQL grants: provisioning, credentials, teardown, reconciliation.

What it is for: the ``GrantHooks`` of PostgreSQL targets. At approval it creates the grant's role
(``Provisioner.create_role``, NOLOGIN); the listener opens a login window for each client
(``login_window``: LOGIN with a fresh password, closed again once the proxy is in); at the grant's end
it tears the role down in the background, retrying with exponential backoff so that one failing
cluster never blocks other grants; at start it reconciles: roles of ended grants and prefixed roles
that no live grant owns are dropped. A target that a reload removed keeps its provisioner (the old
address and admin credentials) until its grants' roles are dropped at their end; a role on a target
missing at start cannot be reached and is reported (``db.role.orphaned``), at every start.

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
        self.roles: dict[int, str] = {}  # grant id -> role name, for roles that exist
        self._windows: dict[int, _Window] = {}
        self._provisioners: dict[str, Provisioner] = {}
        self.teardowns: dict[str, asyncio.Task] = {}  # role name -> its teardown
        self._teardown_targets: dict[str, str] = {}   # role name -> target, while it runs
        self._creating: dict[int, asyncio.Task] = {}

    def _target(self, name: str) -> PostgresTarget | None:
        target = self.service.config.targets.get(name)
        return target if isinstance(target, PostgresTarget) else None

    def provisioner(self, target_name: str) -> Provisioner:
        """The target's provisioner (one per target, rebuilt when a reload changed it)."""
        target = self._target(target_name)
        assert target is not None and self.service.config.postgres is not None
        prefix = self.service.config.postgres.role_prefix
        cached = self._provisioners.get(target_name)
        if cached is not None and cached.target is target and cached.prefix == prefix:
            return cached
        if cached is not None:
            self.service.spawn(cached.close())

        def report(step: str, fields: dict) -> None:
            self.service.audit.emit(step, "system", target=target_name, **fields)
        fresh = Provisioner(target_name, target, prefix, report)
        self._provisioners[target_name] = fresh
        return fresh

    def role_name(self, grant: Grant) -> str:
        assert self.service.config.postgres is not None
        return role_name(self.service.config.postgres.role_prefix, grant.user, grant.id)

    # --- GrantHooks ------------------------------------------------------------------------------

    async def granted(self, grant: Grant) -> None:
        if self._target(grant.target) is not None:
            await self.credentials(grant)

    async def window_started(self, grant: Grant) -> None:
        if self._target(grant.target) is not None and grant.id in self.roles:
            async with self._window(grant).lock:  # a client of the grant may be logging in
                await self.provisioner(grant.target).set_valid_until(self.role_name(grant),
                                                                     grant.ends_at)

    def ended(self, grant: Grant) -> None:
        name = self.roles.pop(grant.id, None)  # the name it was made with (role_prefix may change)
        self._windows.pop(grant.id, None)
        if self._target(grant.target) is None and grant.target not in self._provisioners:
            return  # an SSH target, or a PostgreSQL target this process never reached
        # (a target a reload removed is torn down with the settings it had: see _teardown)
        self.schedule_teardown(grant.target, name or self.role_name(grant), grant.id)

    # --- roles and login windows -----------------------------------------------------------------

    async def credentials(self, grant: Grant) -> str:
        """Make sure the grant's role exists (first use, or after a restart); returns its name.

        Raises:
            LookupError: the grant is no longer active.
            asyncpg.PostgresError, OSError: the target cluster refused or is unreachable.
        """
        if grant.id not in self.service.active:
            raise LookupError(f"grant {grant.id} has ended")
        if grant.id in self.roles:
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
        await self.provisioner(grant.target).create_role(
            name, list(target.roles[grant.login]), grant.ends_at, grant.id)
        await self.service.store.record_db_role(grant_id=grant.id, target=grant.target,
                                                role=name, now=self.service.clock.now())
        if grant.id in self.service.active:
            self.roles[grant.id] = name
        else:  # the grant ended while we were creating: undo at once
            self.schedule_teardown(grant.target, name, grant.id)
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
        provisioner = self.provisioner(grant.target)
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

    def schedule_teardown(self, target: str, role: str, grant_id: int | None) -> None:
        if role in self.teardowns:
            return
        task = asyncio.get_running_loop().create_task(self._teardown(target, role, grant_id))
        self.teardowns[role] = task
        self._teardown_targets[role] = target

        def done(_: asyncio.Task) -> None:
            self.teardowns.pop(role, None)
            self._teardown_targets.pop(role, None)
            self._retire(target)
        task.add_done_callback(done)

    def _teardown_provisioner(self, target: str) -> Provisioner | None:
        """The configured target's provisioner; for a target a reload removed, the one this
        process last used for it (the old address and admin credentials), or None."""
        if self._target(target) is not None:
            return self.provisioner(target)
        return self._provisioners.get(target)

    def reloaded(self) -> None:
        """The configuration changed: close what removed targets no longer need."""
        for target in list(self._provisioners):
            self._retire(target)

    def _retire(self, target: str) -> None:
        """Close the provisioner of a removed target once no grant or teardown needs it."""
        if (self._target(target) is None and target in self._provisioners
                and target not in self._teardown_targets.values()
                and not any(g.target == target for g in self.service.active.values())):
            self.service.spawn(self._provisioners.pop(target).close())

    async def _teardown(self, target: str, role: str, grant_id: int | None) -> None:
        delay = BACKOFF_START
        attempt = 1
        while True:
            try:
                provisioner = self._teardown_provisioner(target)
                if provisioner is None:  # removed by a reload, and re-added and removed since
                    self._orphaned(target, role, grant_id)
                    return
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
        """At start: drop roles of ended grants, and prefixed roles no live grant owns."""
        live = {g.id for g in self.service.active.values() if self._target(g.target)}
        owned: dict[str, set[str]] = {}
        for rec in await self.service.store.list_db_roles(live=True):
            if rec.grant_id in live:
                owned.setdefault(rec.target, set()).add(rec.role)
            elif self._target(rec.target) is not None:
                self.schedule_teardown(rec.target, rec.role, rec.grant_id)
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
                if role not in owned.get(name, set()):
                    self.schedule_teardown(name, role, None)

    def _orphaned(self, target: str, role: str, grant_id: int | None) -> None:
        """A role on a target no longer configured, which the proxy cannot reach: say so (the
        event is a warning in the operator's log too)."""
        why = (f"target {target} is no longer configured: drop the role on its cluster by hand, "
               f"or configure the target again and restart the proxy, which drops it then")
        self.service.audit.emit("db.role.orphaned", "system", target=target, role=role,
                                grant=grant_id, why=why)

    async def close(self) -> None:
        for task in list(self.teardowns.values()) + list(self._creating.values()):
            task.cancel()
        for provisioner in self._provisioners.values():
            try:
                await provisioner.close()
            except Exception:
                pass

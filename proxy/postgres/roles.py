"""The ephemeral roles of all PostgreSQL grants: provisioning, credentials, teardown, reconciliation.

What it is for: the ``GrantHooks`` of PostgreSQL targets. At approval it creates the grant's role
(``Provisioner.create_role``); the listener asks it for the role's credentials; at the grant's end
it tears the role down in the background, retrying with exponential backoff so that one failing
cluster never blocks other grants; at start it reconciles: roles of ended grants and prefixed roles
that no live grant owns are dropped.

What it must not do: write a password anywhere (memory only: after a restart the role gets a new
one), or let a teardown failure propagate into the grant's end.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.access.model import Grant
from proxy.config import PostgresTarget
from proxy.postgres.provisioner import EphemeralRole, Provisioner, role_name
from proxy.runtime.service import AccessService

log = logging.getLogger("jit_proxy.roles")

BACKOFF_START = 0.5
BACKOFF_MAX = 60.0


class RoleManager:
    def __init__(self, service: AccessService):
        self.service = service
        self.roles: dict[int, EphemeralRole] = {}
        self.teardowns: dict[str, asyncio.Task] = {}
        self._creating: dict[int, asyncio.Task] = {}

    def _target(self, name: str) -> PostgresTarget | None:
        target = self.service.config.targets.get(name)
        return target if isinstance(target, PostgresTarget) else None

    def provisioner(self, target_name: str) -> Provisioner:
        target = self._target(target_name)
        assert target is not None and self.service.config.postgres is not None

        def report(step: str, fields: dict) -> None:
            self.service.audit.emit(step, "system", target=target_name, **fields)
        return Provisioner(target_name, target, self.service.config.postgres.role_prefix, report)

    def role_name(self, grant: Grant) -> str:
        assert self.service.config.postgres is not None
        return role_name(self.service.config.postgres.role_prefix, grant.user, grant.id)

    # --- GrantHooks ------------------------------------------------------------------------------

    async def granted(self, grant: Grant) -> None:
        if self._target(grant.target) is not None:
            await self.credentials(grant)

    def ended(self, grant: Grant) -> None:
        if self._target(grant.target) is None:
            return
        self.roles.pop(grant.id, None)
        self.schedule_teardown(grant.target, self.role_name(grant), grant.id)

    # --- credentials -----------------------------------------------------------------------------

    async def credentials(self, grant: Grant) -> EphemeralRole:
        """The role and password to log in upstream for ``grant``, creating the role if needed
        (first use, or after a restart, when only the name survived).

        Raises:
            asyncpg.PostgresError, OSError: the target cluster refused or is unreachable.
        """
        role = self.roles.get(grant.id)
        if role is not None:
            return role
        task = self._creating.get(grant.id)
        if task is None:  # one creation at a time per grant, shared by concurrent callers
            task = asyncio.get_running_loop().create_task(self._create(grant))
            self._creating[grant.id] = task
            task.add_done_callback(lambda _: self._creating.pop(grant.id, None))
        return await asyncio.shield(task)

    async def _create(self, grant: Grant) -> EphemeralRole:
        target = self._target(grant.target)
        assert target is not None
        name = self.role_name(grant)
        role = await self.provisioner(grant.target).create_role(
            name, list(target.roles[grant.login]), grant.ends_at)
        await self.service.store.record_db_role(grant_id=grant.id, target=grant.target,
                                                role=name, now=self.service.clock.now())
        if grant.id in self.service.active:
            self.roles[grant.id] = role
        else:  # the grant ended while we were creating: undo at once
            self.schedule_teardown(grant.target, name, grant.id)
        return role

    # --- teardown --------------------------------------------------------------------------------

    def schedule_teardown(self, target: str, role: str, grant_id: int | None) -> None:
        if role in self.teardowns:
            return
        task = asyncio.get_running_loop().create_task(self._teardown(target, role, grant_id))
        self.teardowns[role] = task
        task.add_done_callback(lambda _: self.teardowns.pop(role, None))

    async def _teardown(self, target: str, role: str, grant_id: int | None) -> None:
        delay = BACKOFF_START
        attempt = 1
        while True:
            try:
                await self.provisioner(target).teardown(role)
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

    async def close(self) -> None:
        for task in list(self.teardowns.values()) + list(self._creating.values()):
            task.cancel()

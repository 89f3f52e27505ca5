"""Users and groups from the system (NSS: passwd and group), for ``auth.identities: system``.

What it is for: telling whether a user name exists on the system and which groups (by name) it
belongs to, as ``getgrouplist(3)`` reports them (its primary group included), and keeping the groups
of users who logged in, so policies can name ``group:sre`` without the config listing its members.
Lookups may reach a directory service (sssd, LDAP): callers run ``resolve`` in a thread.

What it must not do: decide access, create or change accounts, or do I/O in ``cached_groups`` (it
is called from policy decisions on the event loop).
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd

MAX_CACHED = 100_000


def system_groups(user: str) -> frozenset[str] | None:
    """The names of ``user``'s system groups, or None when NSS knows no such user by exactly
    that name (blocking)."""
    try:
        entry = pwd.getpwnam(user)
    except (KeyError, ValueError, UnicodeError):
        return None
    if entry.pw_name != user:  # e.g. sssd matching ALICE or alice@corp: one person, one name
        return None
    names = set()
    for gid in os.getgrouplist(user, entry.pw_gid):
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return frozenset(names)


class SystemIdentities:
    """System groups of users as resolved at their last login."""

    def __init__(self) -> None:
        self._groups: dict[str, frozenset[str]] = {}

    async def resolve(self, user: str) -> bool:
        """Look ``user`` up (in a thread) and remember its groups; False when NSS has no such
        user (then it has no system groups)."""
        groups = await asyncio.to_thread(system_groups, user)
        if groups is None:
            self._groups.pop(user, None)
            return False
        if len(self._groups) >= MAX_CACHED:
            self._groups.clear()
        self._groups[user] = groups
        return True

    def cached_groups(self, user: str) -> set[str]:
        """The groups remembered for ``user`` (empty if it never logged in since start)."""
        return set(self._groups.get(user, ()))

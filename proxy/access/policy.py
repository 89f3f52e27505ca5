"""Policy decisions: may this person request this, approve that, revoke this, use that grant?

What it is for: answering each question with a ``Decision`` whose ``reason`` is the sentence shown
to the person (and audited), from the configuration and explicit facts.

What it must not do: I/O, or read the clock (``now`` is passed in).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from proxy.access.duration import format_duration
from proxy.access.model import AccessRequest, Grant, RequestStatus
from proxy.config import Config, Permissions, Policy


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    policy: str | None = None

    def __bool__(self) -> bool:
        return self.allowed


MAX_TEXT = 1000  # characters of a reason or comment


def text_problem(text: str, what: str) -> str | None:
    """Why ``text`` cannot be a reason or comment (too long, or characters that could rewrite an
    approver's terminal: control, format and bidirectional-override characters), or None."""
    import unicodedata
    if len(text) > MAX_TEXT:
        return f"the {what} is longer than {MAX_TEXT} characters"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in text):
        return f"the {what} contains control or invisible characters"
    return None


def reason_problem(reason: str, policy: Policy | None = None) -> str | None:
    """Why ``reason`` cannot be a request's reason — empty, characters that could rewrite an
    approver's terminal, or not matching ``policy.reason_pattern`` — or None."""
    if not reason.strip():
        return "a reason is required (--reason TEXT)"
    problem = text_problem(reason, "reason")
    if problem is not None:
        return problem
    if policy is not None and policy.reason_pattern and not re.search(policy.reason_pattern,
                                                                      reason):
        return (f"the reason (--reason TEXT) must match {policy.reason_pattern!r} (policy "
                f"{policy.name}), e.g. a ticket id")
    return None


def decide_request(config: Config, user: str, target: str, login: str, duration: int,
                   reason: str) -> Decision:
    """May ``user`` ask for ``login`` on ``target`` for ``duration`` seconds? For a PostgreSQL
    target ``login`` is the name of one of the target's ``roles``.

    The first policy (in file order) that names the user as requester, the target and the login, and
    whose ``max_duration`` covers ``duration``, decides; its name is returned in ``policy``.
    """
    if target not in config.targets:
        mine = {name.lower(): name for p in config.policies
                if config.matches(user, p.requesters) for name in p.targets}
        close = difflib.get_close_matches(target.lower(), list(mine), n=1)
        near = f"; did you mean {mine[close[0]]!r}?" if close else ""
        return Decision(False, f"unknown target {target!r}{near} ('targets' lists yours)")
    problem = reason_problem(reason)
    if problem is not None:
        return Decision(False, problem)
    matching = [p for p in config.policies
                if target in p.targets and login in access_names(config, p, target)
                and config.matches(user, p.requesters)]
    if not matching:
        ssh = config.targets[target].kind != "postgres"
        allowed = sorted({name for p in config.policies
                          if target in p.targets and config.matches(user, p.requesters)
                          for name in access_names(config, p, target)})
        kind, flag = ("an SSH target", "logins (--login)") if ssh else \
            ("a PostgreSQL target", "roles (--role)")
        may = f"{flag} {user} may request there: {', '.join(allowed)}" if allowed else \
            f"no policy lets {user} request anything there"
        return Decision(False, f"no policy lets {user} request {login}@{target} ({target} is "
                               f"{kind}; {may})")
    for policy in matching:
        if duration <= policy.max_duration:
            problem = reason_problem(reason, policy)
            if problem is not None:
                return Decision(False, problem)
            return Decision(True, f"allowed by policy {policy.name}", policy.name)
    longest = max(p.max_duration for p in matching)
    return Decision(False, f"duration {format_duration(duration)} exceeds the maximum of "
                           f"{format_duration(longest)} for {login}@{target}")


def access_names(config: Config, policy: Policy, target: str) -> list[str]:
    """What ``policy`` lets one request on ``target``: logins (SSH) or role names (PostgreSQL)."""
    return policy.roles if config.targets[target].kind == "postgres" else policy.logins


def policy_named(config: Config, name: str) -> Policy | None:
    return next((p for p in config.policies if p.name == name), None)


def decide_approval(config: Config, approver: str, request: AccessRequest,
                    now: float | None = None, prior_approvers: tuple[str, ...] = ()) -> Decision:
    """May ``approver`` approve (or deny) ``request`` at ``now``? Requesters never decide their
    own, nobody approves the same request twice, and expired requests cannot be decided."""
    if request.status is not RequestStatus.PENDING:
        return Decision(False, f"request {request.id} is {request.status.value}, not pending")
    if now is not None and request_expired(config, request, now):
        return Decision(False, f"request {request.id} has expired; ask for a new one")
    if approver in prior_approvers:
        return Decision(False, f"you already approved request {request.id}; it needs another "
                               f"approver")
    if approver == request.requester:
        return Decision(False, "you cannot approve or deny your own request")
    policy = policy_named(config, request.policy)
    if policy is None:
        return Decision(False, f"policy {request.policy!r} of request {request.id} no longer exists")
    if not config.matches(approver, policy.approvers):
        return Decision(False, f"{approver} is not an approver for policy {policy.name}")
    gone = _no_longer_covered(config, policy, request.requester, request.target, request.login)
    if gone is not None:
        return Decision(False, f"request {request.id} can no longer be approved: {gone} (the "
                               f"configuration changed); deny it")
    return Decision(True, f"approver under policy {policy.name}", policy.name)


def _no_longer_covered(config: Config, policy: Policy, user: str, target: str,
                       login: str) -> str | None:
    """Why ``policy``, as configured now, no longer lets ``user`` have ``login`` on ``target``
    (None while it does)."""
    if target not in config.targets or target not in policy.targets \
            or login not in access_names(config, policy, target):
        return f"policy {policy.name} no longer covers {login}@{target}"
    if not may_match(config, user, policy.requesters):
        return f"{user} is no longer a requester under policy {policy.name}"
    return None


def may_match(config: Config, user: str, refs: list[str]) -> bool:
    """Whether ``user`` is still named by ``refs`` as far as the proxy can tell: with
    ``auth.identities: system`` a group the file does not define is a system group, whose
    members are known only from each user's own latest login (a cache a restart empties), so a
    reference to one is given the benefit of the doubt; names and the file's groups are
    judged."""
    if config.matches(user, refs):
        return True
    return config.auth.identities == "system" and any(
        ref.startswith("group:") and ref.removeprefix("group:") not in config.groups
        for ref in refs)


def grant_allowed(config: Config, grant: Grant) -> Decision:
    """Does the configuration, as it is now (after a reload), still let the grant's user have
    its access under its policy? A grant it no longer allows opens no new session (live ones
    carry on until the grant ends or is revoked)."""
    policy = policy_named(config, grant.policy)
    if policy is None:
        return Decision(False, f"policy {grant.policy!r} of grant {grant.id} no longer exists")
    gone = _no_longer_covered(config, policy, grant.user, grant.target, grant.login)
    if gone is not None:
        return Decision(False, gone)
    return Decision(True, f"allowed by policy {policy.name}", policy.name)


def request_expired(config: Config, request: AccessRequest, now: float) -> bool:
    """A pending request lapses ``request_ttl`` seconds after it was made (its policy's; a
    day when the policy is gone)."""
    policy = policy_named(config, request.policy)
    ttl = policy.request_ttl if policy is not None else 86400
    return now >= request.created_at + ttl


def auto_approves(config: Config, request: AccessRequest) -> bool:
    """Whether the request's policy approves it by itself (its ``auto_approve`` rule matches)."""
    policy = policy_named(config, request.policy)
    rule = policy.auto_approve if policy is not None else None
    return rule is not None and rule.covers(config, request.requester, request.target)


def decide_revoke(config: Config, actor: str, grant: Grant) -> Decision:
    """The grant's own user may give it up; the policy's approvers may take it away."""
    if actor == grant.user:
        return Decision(True, "own grant")
    policy = policy_named(config, grant.policy)
    if policy is not None and config.matches(actor, policy.approvers):
        return Decision(True, f"approver under policy {policy.name}")
    return Decision(False, f"{actor} may not revoke grant {grant.id}")


def permissions(config: Config, grant: Grant) -> Permissions:
    """What the grant's policy allows beyond a plain session; nothing when the policy is gone."""
    policy = policy_named(config, grant.policy)
    return policy.allow if policy is not None else Permissions()


def find_live_grant(grants: list[Grant], user: str, target: str, login: str,
                    now: float) -> Grant | None:
    """The live grant (ending last) covering ``user`` as ``login`` on ``target`` at ``now``."""
    live = [g for g in grants
            if g.user == user and g.target == target and g.login == login and g.is_live(now)]
    return max(live, key=lambda g: g.ends_at, default=None)

"""proxy.access.model transition tables and proxy.access.policy decisions (pure, clock-free)."""

from __future__ import annotations

import itertools

import pytest

from jitp_unit_support import FILENAME, config_text
from proxy.access.model import (GRANT_TRANSITIONS, REQUEST_TRANSITIONS, AccessRequest, Grant,
                                GrantStatus, InvalidTransition, RequestStatus, next_grant_status,
                                next_request_status)
from proxy.access.policy import (decide_approval, decide_request, decide_revoke, find_live_grant,
                                 grant_allowed, permissions, policy_named)
from proxy.config import Config, Permissions, parse_config

T0 = 1_800_000_000.0
REQUEST_EVENTS = ["approve", "deny", "cancel", "expire", "revoke", "reopen"]
GRANT_EVENTS = ["expire", "revoke", "approve", "renew", "cancel"]


@pytest.fixture(scope="module")
def cfg() -> Config:
    return parse_config(config_text(), FILENAME)


def make_request(**kw) -> AccessRequest:
    base = dict(id=7, requester="alice", target="web1", login="deploy", duration=600,
                reason="INC-1", policy="web-deploy", status=RequestStatus.PENDING, created_at=T0)
    base.update(kw)
    return AccessRequest(**base)


def make_grant(**kw) -> Grant:
    base = dict(id=3, request_id=7, user="alice", target="web1", login="deploy",
                policy="web-deploy", starts_at=T0, ends_at=T0 + 600)
    base.update(kw)
    return Grant(**base)


# --- transition tables ---------------------------------------------------------------------------

EXPECTED_REQUEST = {
    (RequestStatus.PENDING, "approve"): RequestStatus.APPROVED,
    (RequestStatus.PENDING, "deny"): RequestStatus.DENIED,
    (RequestStatus.PENDING, "cancel"): RequestStatus.CANCELLED,
    (RequestStatus.PENDING, "expire"): RequestStatus.EXPIRED,
}
EXPECTED_GRANT = {
    (GrantStatus.ACTIVE, "expire"): GrantStatus.EXPIRED,
    (GrantStatus.ACTIVE, "revoke"): GrantStatus.REVOKED,
}


def test_request_table_is_exactly_the_documented_one():
    assert REQUEST_TRANSITIONS == EXPECTED_REQUEST


def test_grant_table_is_exactly_the_documented_one():
    assert GRANT_TRANSITIONS == EXPECTED_GRANT


@pytest.mark.parametrize("status, event", list(itertools.product(RequestStatus, REQUEST_EVENTS)))
def test_every_request_transition(status, event):
    expected = EXPECTED_REQUEST.get((status, event))
    if expected is not None:
        assert next_request_status(status, event) is expected
    else:
        with pytest.raises(InvalidTransition) as info:
            next_request_status(status, event)
        assert str(info.value) == f"cannot {event} a request that is {status.value}"


@pytest.mark.parametrize("status, event", list(itertools.product(GrantStatus, GRANT_EVENTS)))
def test_every_grant_transition(status, event):
    expected = EXPECTED_GRANT.get((status, event))
    if expected is not None:
        assert next_grant_status(status, event) is expected
    else:
        with pytest.raises(InvalidTransition) as info:
            next_grant_status(status, event)
        assert str(info.value) == f"cannot {event} a grant that is {status.value}"


def test_terminal_request_states_have_no_way_out():
    for status in RequestStatus:
        if status is RequestStatus.PENDING:
            continue
        assert not [e for (s, e) in REQUEST_TRANSITIONS if s is status]


def test_request_decided_records_who_when_and_why():
    req = make_request()
    done = req.decided("approve", "bob", T0 + 5, "ok")
    assert done.status is RequestStatus.APPROVED
    assert (done.decided_by, done.decided_at, done.decision_comment) == ("bob", T0 + 5, "ok")
    assert req.status is RequestStatus.PENDING  # frozen: the original is unchanged
    with pytest.raises(InvalidTransition):
        done.decided("deny", "bob", T0 + 6, "changed my mind")


def test_grant_ended_records_who_and_when():
    g = make_grant()
    ended = g.ended("revoke", "bob", T0 + 10)
    assert ended.status is GrantStatus.REVOKED
    assert (ended.ended_by, ended.ended_at) == ("bob", T0 + 10)
    assert g.status is GrantStatus.ACTIVE
    with pytest.raises(InvalidTransition):
        ended.ended("expire", "system", T0 + 700)


@pytest.mark.parametrize("now, live", [
    (T0 - 0.001, False), (T0, True), (T0 + 599.999, True), (T0 + 600, False), (T0 + 601, False),
])
def test_grant_is_live_in_half_open_window(now, live):
    assert make_grant().is_live(now) is live


@pytest.mark.parametrize("status", [GrantStatus.EXPIRED, GrantStatus.REVOKED])
def test_ended_grant_is_never_live(status):
    assert make_grant(status=status).is_live(T0 + 1) is False


# --- decide_request ------------------------------------------------------------------------------

def test_request_allowed_by_group(cfg):
    d = decide_request(cfg, "alice", "web1", "deploy", 3600, "INC-1: disk full")
    assert d.allowed and bool(d)
    assert d.policy == "web-deploy"
    assert "web-deploy" in d.reason


def test_request_allowed_by_user_name(cfg):
    d = decide_request(cfg, "alice", "db1", "postgres", 1800, "check")
    assert d.allowed and d.policy == "db-admin"


def test_request_at_exactly_max_duration(cfg):
    assert decide_request(cfg, "carol", "web1", "root", 7200, "x").allowed


def test_request_unknown_target(cfg):
    d = decide_request(cfg, "alice", "web9", "deploy", 60, "x")
    assert not d and d.policy is None
    assert d.reason == "unknown target 'web9'; did you mean 'web1'? ('targets' lists yours)"
    # a near name among the targets the user may request only (mallory may request none)
    assert decide_request(cfg, "alice", "DB1", "postgres", 60, "x").reason == (
        "unknown target 'DB1'; did you mean 'db1'? ('targets' lists yours)")
    assert decide_request(cfg, "mallory", "web9", "deploy", 60, "x").reason == (
        "unknown target 'web9' ('targets' lists yours)")
    assert decide_request(cfg, "alice", "zzz", "deploy", 60, "x").reason == (
        "unknown target 'zzz' ('targets' lists yours)")


def test_request_no_policy_for_user(cfg):
    d = decide_request(cfg, "mallory", "web1", "deploy", 60, "x")
    assert not d
    assert d.reason == ("no policy lets mallory request deploy@web1 (web1 is an SSH target; no "
                        "policy lets mallory request anything there)")


def test_request_no_policy_for_login(cfg):
    d = decide_request(cfg, "alice", "web1", "postgres", 60, "x")
    assert not d and d.reason == ("no policy lets alice request postgres@web1 (web1 is an SSH "
                                  "target; logins (--login) alice may request there: deploy, root)")


def test_request_not_requester_of_that_policy(cfg):
    # carol is in dev (web-deploy) but db-admin names only alice
    d = decide_request(cfg, "carol", "db1", "postgres", 60, "x")
    assert not d and d.reason.startswith("no policy lets carol request postgres@db1 (")


def test_request_over_max_duration_names_the_max(cfg):
    d = decide_request(cfg, "alice", "web1", "deploy", 7201, "x")
    assert not d
    assert d.reason == "duration 2h1s exceeds the maximum of 2h for deploy@web1"


@pytest.mark.parametrize("reason", ["", "   ", "\t\n"])
def test_request_needs_a_reason(cfg, reason):
    d = decide_request(cfg, "alice", "web1", "deploy", 60, reason)
    assert not d and "reason is required" in d.reason


def test_first_fitting_policy_decides():
    text = config_text().replace(
        "policies:\n",
        "policies:\n  - name: web-short\n    targets: [web1]\n    logins: [deploy]\n"
        "    requesters: [alice]\n    approvers: [bob]\n    max_duration: 10m\n", 1)
    cfg = parse_config(text, FILENAME)
    assert decide_request(cfg, "alice", "web1", "deploy", 600, "x").policy == "web-short"
    # longer than web-short allows: the next matching policy (web-deploy, 2h) takes it
    assert decide_request(cfg, "alice", "web1", "deploy", 601, "x").policy == "web-deploy"
    d = decide_request(cfg, "alice", "web1", "deploy", 3 * 3600, "x")
    assert not d and "maximum of 2h" in d.reason


# --- decide_approval -----------------------------------------------------------------------------

def test_approver_by_group_allowed(cfg):
    d = decide_approval(cfg, "bob", make_request())
    assert d.allowed and d.policy == "web-deploy"


def test_approver_by_user_ref_allowed(cfg):
    assert decide_approval(cfg, "carol", make_request()).allowed


def test_self_approval_refused_even_for_an_approver(cfg):
    d = decide_approval(cfg, "carol", make_request(requester="carol"))
    assert not d
    assert d.reason == "you cannot approve or deny your own request"


@pytest.mark.parametrize("who", ["mallory", "alice"])
def test_non_approver_refused(cfg, who):
    d = decide_approval(cfg, who, make_request(requester="carol"))
    assert not d
    assert d.reason == f"{who} is not an approver for policy web-deploy"


@pytest.mark.parametrize("status", [s for s in RequestStatus if s is not RequestStatus.PENDING])
def test_non_pending_refused(cfg, status):
    d = decide_approval(cfg, "bob", make_request(status=status))
    assert not d
    assert d.reason == f"request 7 is {status.value}, not pending"


def test_policy_gone_refused(cfg):
    d = decide_approval(cfg, "bob", make_request(policy="vanished"))
    assert not d and "no longer exists" in d.reason


def test_db_policy_approvers(cfg):
    req = make_request(target="db1", login="postgres", policy="db-admin")
    assert decide_approval(cfg, "bob", req).allowed
    assert not decide_approval(cfg, "carol", req).allowed  # carol approves web-deploy only


def _reloaded(cfg: Config, old: str, new: str) -> Config:
    """``cfg``'s text with ``old`` replaced by ``new``: the configuration after a reload."""
    text = config_text()
    assert old in text
    return parse_config(text.replace(old, new, 1), FILENAME)


# what a reload may take away, and the reason each gives (found by a newcomer run-through: a
# user taken out of a policy's group could still have a pending request approved, and their live
# grant still opened new sessions)
RELOADS = [
    ("      - alice\n      - carol", "      - carol", "alice is no longer a requester under "
                                                       "policy web-deploy"),
    ("logins: [deploy, root]", "logins: [root]", "policy web-deploy no longer covers deploy@web1"),
    ("targets: [web1]", "targets: [db1]", "policy web-deploy no longer covers deploy@web1"),
    ("name: web-deploy", "name: web-renamed", "policy 'web-deploy' of grant 3 no longer exists"),
]


@pytest.mark.parametrize("old,new,why", RELOADS, ids=["requester", "login", "target", "policy"])
def test_a_reload_takes_away_what_it_no_longer_allows(cfg, old, new, why):
    assert decide_approval(cfg, "bob", make_request(), T0).allowed
    assert grant_allowed(cfg, make_grant())
    after = _reloaded(cfg, old, new)
    d = decide_approval(after, "bob", make_request(), T0)
    assert not d
    if "of grant" not in why:  # (a vanished policy has its own message, tested above)
        assert d.reason == (f"request 7 can no longer be approved: {why} (the configuration "
                            f"changed); deny it")
    g = grant_allowed(after, make_grant())
    assert not g and g.reason == why


def test_with_system_identities_only_system_groups_are_not_judged_again(cfg):
    """System groups are known only from a user's own latest login (a cache that a restart
    empties): an approval or a new session must not be refused for a membership not seen yet
    (found by an attack review: after a restart, approvals of valid requests were refused, and
    the first jump after a start raced the login's group lookup)."""
    text = config_text().replace("  identities: config\n", "")
    assert "auth:" not in text
    after = parse_config(text.replace("users:\n", "auth:\n  identities: system\nusers:\n", 1)
                         .replace("      - alice\n      - carol", "      - carol"), FILENAME)
    assert after.auth.identities == "system"
    # the file's own group dev no longer holds alice: judged as with identities: config
    assert not grant_allowed(after, make_grant())
    # a group the file does not define is a system group: not judged
    sysgroup = parse_config(text.replace("users:\n", "auth:\n  identities: system\nusers:\n", 1)
                            .replace("    requesters: [group:dev]\n",
                                     "    requesters: [group:ops]\n"), FILENAME)
    assert grant_allowed(sysgroup, make_grant())
    assert decide_approval(sysgroup, "bob", make_request(), T0).allowed
    # what the file alone decides still applies
    gone = parse_config(text.replace("users:\n", "auth:\n  identities: system\nusers:\n", 1)
                        .replace("logins: [deploy, root]", "logins: [root]"), FILENAME)
    assert not grant_allowed(gone, make_grant())


def test_a_reload_keeps_what_it_still_allows(cfg):
    after = _reloaded(cfg, "      - alice\n      - carol", "      - carol")
    assert grant_allowed(after, make_grant(user="carol"))
    assert decide_approval(after, "bob", make_request(requester="carol"), T0).allowed


# --- decide_revoke / permissions -----------------------------------------------------------------

def test_revoke_own_grant(cfg):
    assert decide_revoke(cfg, "alice", make_grant()).allowed


def test_revoke_by_approver(cfg):
    assert decide_revoke(cfg, "bob", make_grant()).allowed
    assert decide_revoke(cfg, "carol", make_grant()).allowed


def test_revoke_by_other_refused(cfg):
    d = decide_revoke(cfg, "mallory", make_grant())
    assert not d and d.reason == "mallory may not revoke grant 3"


def test_revoke_policy_gone_only_owner(cfg):
    g = make_grant(policy="vanished")
    assert not decide_revoke(cfg, "bob", g)
    assert decide_revoke(cfg, "alice", g)


def test_permissions(cfg):
    assert permissions(cfg, make_grant(policy="db-admin")).port_forwarding is True
    assert permissions(cfg, make_grant()) == Permissions()
    assert permissions(cfg, make_grant(policy="vanished")) == Permissions()
    assert policy_named(cfg, "db-admin").name == "db-admin"
    assert policy_named(cfg, "nope") is None


# --- find_live_grant -----------------------------------------------------------------------------

def test_find_live_grant_matches_user_target_login_and_time():
    g = make_grant()
    grants = [g]
    assert find_live_grant(grants, "alice", "web1", "deploy", T0 + 1) is g
    assert find_live_grant(grants, "bob", "web1", "deploy", T0 + 1) is None
    assert find_live_grant(grants, "alice", "web2", "deploy", T0 + 1) is None
    assert find_live_grant(grants, "alice", "web1", "root", T0 + 1) is None
    assert find_live_grant(grants, "alice", "web1", "deploy", T0 - 1) is None
    assert find_live_grant(grants, "alice", "web1", "deploy", T0 + 600) is None
    assert find_live_grant([], "alice", "web1", "deploy", T0) is None


def test_find_live_grant_ignores_ended_grants():
    revoked = make_grant(id=1, status=GrantStatus.REVOKED, ends_at=T0 + 9999)
    expired = make_grant(id=2, status=GrantStatus.EXPIRED, ends_at=T0 + 9999)
    assert find_live_grant([revoked, expired], "alice", "web1", "deploy", T0 + 1) is None
    live = make_grant(id=4)
    assert find_live_grant([revoked, live, expired], "alice", "web1", "deploy", T0 + 1) is live


def test_find_live_grant_prefers_the_one_ending_last():
    short = make_grant(id=1, ends_at=T0 + 100)
    long = make_grant(id=2, ends_at=T0 + 5000)
    future = make_grant(id=3, starts_at=T0 + 50, ends_at=T0 + 9000)
    assert find_live_grant([short, long, future], "alice", "web1", "deploy", T0 + 10) is long
    assert find_live_grant([short, long, future], "alice", "web1", "deploy", T0 + 60) is future
    assert find_live_grant([short, long, future], "alice", "web1", "deploy", T0 + 6000) is future

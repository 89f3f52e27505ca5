"""Approval policy (issue 4, first slice): several approvers, request TTL, reason patterns,
auto-approval — through the command shell against a real store, with a clock moved by hand."""

from __future__ import annotations

import asyncio

from jitp_unit_support import config_text
from proxy.clock import ManualClock
from proxy.ssh.commands import run_command
from test_unit_commands import T0, host_key, service_in  # noqa: F401 (host_key: a fixture)

POLICY = config_text().replace("""    approvers: [group:sre, user:carol]
    max_duration: 2h""", """    approvers: [group:sre, user:carol]
    max_duration: 2h
    approvals: 2
    request_ttl: 1h
    reason_pattern: "INC-[0-9]+"
    auto_approve:
      requesters: [user:carol]""")


def test_two_distinct_approvers_are_needed(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key, text=POLICY) as svc:
            r = await run_command(svc, "alice", "request web1 --login deploy --for 10m "
                                                "--reason INC-7 disk")
            assert r.status == 0, r.err
            r = await run_command(svc, "alice", "approve 1")
            assert r.status == 1 and "your own request" in r.err
            r = await run_command(svc, "bob", "approve 1")
            assert r.status == 0 and "approval 1 of 2 recorded" in r.out
            assert svc.active == {}  # not granted after one approval
            r = await run_command(svc, "bob", "approve 1")
            assert r.status == 1 and "already approved" in r.err
            assert svc.active == {}  # nor after the same approver twice
            r = await run_command(svc, "carol", "approve 1 --comment second")
            assert r.status == 0 and "grant 1 gives alice" in r.out, r.err
            assert [g.user for g in svc.active.values()] == ["alice"]
    asyncio.run(scenario())


def test_an_approval_by_someone_a_reload_took_away_no_longer_counts(tmp_path, host_key):
    """Found by an attack review: bob approved (1 of 2), a reload took bob out of the approvers,
    and carol's single approval then made the grant."""
    from proxy.config import parse_config

    async def scenario():
        async with service_in(tmp_path, host_key, text=POLICY) as svc:
            await run_command(svc, "alice", "request web1 --login deploy --for 10m --reason INC-9")
            r = await run_command(svc, "bob", "approve 1")
            assert r.status == 0 and "approval 1 of 2 recorded" in r.out
            svc.use_config(parse_config(POLICY.replace("approvers: [group:sre, user:carol]",
                                                       "approvers: [user:carol, user:mallory]")))
            r = await run_command(svc, "carol", "approve 1")
            assert r.status == 0 and "approval 1 of 2 recorded" in r.out, r.out + r.err
            assert svc.active == {}
            r = await run_command(svc, "mallory", "approve 1")
            assert r.status == 0 and "grant 1 gives alice" in r.out, r.err
    asyncio.run(scenario())


def test_an_expired_pending_request_cannot_be_approved(tmp_path, host_key):
    clock = ManualClock(T0)

    async def scenario():
        async with service_in(tmp_path, host_key, text=POLICY, clock=clock) as svc:
            await run_command(svc, "alice", "request web1 --login deploy --for 10m "
                                            "--reason INC-8")
            clock.advance(3601)
            r = await run_command(svc, "bob", "approve 1")
            assert r.status == 1 and "expired" in r.err
            assert await svc.expire_pending() == 1
            r = await run_command(svc, "bob", "requests --json")
            assert '"status": "expired"' in r.out
    asyncio.run(scenario())


def test_reason_pattern_and_auto_approval(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key, text=POLICY) as svc:
            r = await run_command(svc, "alice", "request web1 --login deploy --for 10m "
                                                "--reason just because")
            assert r.status == 1 and "must match 'INC-[0-9]+'" in r.err
            r = await run_command(svc, "carol", "request web1 --login deploy --for 10m "
                                                "--reason INC-9 on call")
            assert r.status == 0 and "approved by policy web-deploy" in r.out, r.err
            assert [g.user for g in svc.active.values()] == ["carol"]
    asyncio.run(scenario())
    import json
    events = [json.loads(l) for l in (tmp_path / "state" / "audit.jsonl").read_text()
              .splitlines()]
    approved = [e for e in events if e["type"] == "access.request.approved"]
    assert approved[-1]["actor"] == "policy:web-deploy" and approved[-1]["by_policy"] is True


def test_a_first_use_window_starts_at_the_first_session_not_at_approval(tmp_path, host_key):
    clock = ManualClock(T0)
    text = POLICY.replace("approvals: 2", "approvals: 1\n    window_starts: first_use")

    async def scenario():
        async with service_in(tmp_path, host_key, text=text, clock=clock) as svc:
            await run_command(svc, "alice", "request web1 --login deploy --for 10m --reason INC-1")
            r = await run_command(svc, "bob", "approve 1")
            assert r.status == 0, r.err
            grant = svc.active[1]
            assert grant.awaiting_first_use and grant.ends_at == T0 + 3600  # request_ttl
            # what it says is the window and the deadline to start it, not "until" the deadline
            deadline = "2027-01-15T09:00:00.000Z"  # T0 + request_ttl
            assert r.out == (f"request 1 approved: grant 1 gives alice deploy@web1 for 10m "
                             f"from first use, start by {deadline}\n")
            r = await run_command(svc, "alice", "whoami")
            assert f"grant 1: deploy@web1 for 10m from first use, start by {deadline}" \
                in r.out, r.out
            r = await run_command(svc, "alice", "grants")
            assert f"10m from first use, start by {deadline}" in r.out, r.out
            clock.advance(1800)  # half an hour later, the first session
            assert svc.live_grant("alice", "web1", "deploy") is not None
            started = await svc.use_grant(grant)
            assert (started.starts_at, started.ends_at) == (T0 + 1800, T0 + 1800 + 600)
            assert (await svc.use_grant(started)).ends_at == T0 + 2400  # only the first starts
            clock.advance(601)
            await svc.expire_due()
            assert svc.active == {}
            assert (await svc.store.get_grant(1)).ends_at == T0 + 2400  # persisted
    asyncio.run(scenario())


def test_extend_needs_approval_unless_the_policy_allows_self_extension(tmp_path, host_key):
    clock = ManualClock(T0)
    text = POLICY.replace("approvals: 2", "approvals: 1")

    async def scenario():
        async with service_in(tmp_path, host_key, text=text, clock=clock) as svc:
            await run_command(svc, "alice", "request web1 --login deploy --for 10m --reason INC-1")
            await run_command(svc, "bob", "approve 1")
            assert svc.active[1].ends_at == T0 + 600
            r = await run_command(svc, "carol", "extend 1 --for 10m --reason INC-1")
            assert r.status == 1 and "not an active grant of yours" in r.err
            r = await run_command(svc, "alice", "extend 1 --for 10m --reason INC-1 more")
            assert r.status == 0 and "waits for approval" in r.out, r.err
            assert svc.active[1].ends_at == T0 + 600  # not before approval
            r = await run_command(svc, "bob", "approve 2")
            assert r.status == 0, r.err
            assert svc.active[1].ends_at == T0 + 1200 and len(svc.active) == 1
            assert (await svc.store.get_grant(1)).ends_at == T0 + 1200
        async with service_in(tmp_path / "self", host_key,
                              text=text.replace("approvals: 1", "approvals: 1\n    self_extend: true"),
                              clock=clock) as svc:
            await run_command(svc, "alice", "request web1 --login deploy --for 10m --reason INC-2")
            await run_command(svc, "bob", "approve 1")
            r = await run_command(svc, "alice", "extend 1 --for 5m --reason INC-2")
            assert r.status == 0 and "extended" in r.out, r.err
            assert svc.active[1].ends_at == T0 + 900
            r = await run_command(svc, "alice", "extend 1 --for 3h --reason INC-2")
            assert r.status == 1 and "beyond the maximum of 2h" in r.err
            for _ in range(6):  # repeated self-extensions cannot add up past the maximum
                r = await run_command(svc, "alice", "extend 1 --for 30m --reason INC-2")
            assert r.status == 1 and "beyond the maximum of 2h" in r.err
            assert svc.active[1].ends_at - svc.active[1].starts_at <= 7200
    asyncio.run(scenario())



def test_one_approver_racing_himself_does_not_count_twice(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key, text=POLICY) as svc:
            await run_command(svc, "alice", "request web1 --login deploy --for 10m "
                                            "--reason INC-5")
            results = await asyncio.gather(svc.approve("bob", 1, None),
                                           svc.approve("bob", 1, None),
                                           return_exceptions=True)
            assert svc.active == {}, results  # still needs a second, distinct approver
            assert await svc.store.approvers_of(1) == ["bob"]
    asyncio.run(scenario())


def test_extensions_are_checked_against_the_grants_own_policy_and_shown_as_such(tmp_path,
                                                                                 host_key):
    text = POLICY.replace("approvals: 2", "approvals: 1").replace(
        "    targets: [web1]\n    logins: [deploy, root]",
        "    targets: [web1]\n    logins: [deploy, root]", 1)

    async def scenario():
        async with service_in(tmp_path, host_key, text=text) as svc:
            await run_command(svc, "alice", "request web1 --login deploy --for 10m --reason INC-1")
            await run_command(svc, "bob", "approve 1")
            r = await run_command(svc, "alice", "extend 1 --for 10m --reason no ticket")
            assert r.status == 1 and "must match" in r.err  # the grant's policy's pattern
            r = await run_command(svc, "alice", "extend 1 --for 10m --reason INC-1")
            assert r.status == 0
            r = await run_command(svc, "alice", "extend 1 --for 10m --reason INC-1")
            assert r.status == 1 and "already waiting" in r.err
            r = await run_command(svc, "bob", "requests --pending --json")
            assert '"extends_grant": 1' in r.out
    asyncio.run(scenario())


def test_extending_a_first_use_grant_before_its_start_lengthens_its_window(tmp_path, host_key):
    clock = ManualClock(T0)
    text = POLICY.replace("approvals: 2", "approvals: 1\n    window_starts: first_use\n"
                                          "    self_extend: true")

    async def scenario():
        async with service_in(tmp_path, host_key, text=text, clock=clock) as svc:
            await run_command(svc, "alice", "request web1 --login deploy --for 10m --reason INC-1")
            await run_command(svc, "bob", "approve 1")
            r = await run_command(svc, "alice", "extend 1 --for 20m --reason INC-1")
            assert r.status == 0, r.err
            clock.advance(60)
            started = await svc.use_grant(svc.active[1])
            assert started.ends_at == T0 + 60 + 1800
    asyncio.run(scenario())

"""proxy.ssh.commands.run_command against a real AccessService (SQLite store in tmp_path, audit
log, ManualClock, CA keys, host key): the whole request -> approve -> use -> revoke/expire
workflow as the command shell sees it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from contextlib import asynccontextmanager

import asyncssh
import pytest

from ca import SSHCertificateAuthority
from jitp_unit_support import FILENAME, config_text
from proxy.access.model import GrantStatus, RequestStatus
from proxy.audit.log import AuditLog, verify_log
from proxy.clock import ManualClock, rfc3339
from proxy.config import ConfigError, parse_config
from proxy.runtime.service import AccessService
from proxy.ssh.commands import HELP, run_command
from proxy.store.sqlite import SQLiteStore

T0 = 1_800_000_000.0
REQUEST_WEB1 = "request web1 --login deploy --for 10m --reason INC-1: disk full"


@pytest.fixture(scope="module")
def host_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@asynccontextmanager
async def service_in(tmp_path, host_key, text=None, clock=None):
    clock = clock or ManualClock(T0)
    store = await SQLiteStore.open(tmp_path / "state" / "jit.db")
    audit = AuditLog(tmp_path / "state" / "audit.jsonl", clock)
    svc = AccessService(parse_config(text or config_text(), FILENAME), store, audit, clock,
                        SSHCertificateAuthority.open(tmp_path / "ca"), host_key)
    await svc.start()
    try:
        yield svc
    finally:
        await store.close()
        audit.close()


def run(coro):
    return asyncio.run(coro)


def audit_events(tmp_path) -> list[dict]:
    path = tmp_path / "state" / "audit.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def assert_audit_ok(tmp_path) -> None:
    result = verify_log(tmp_path / "state" / "audit.jsonl")
    assert result.ok, result


# --- the whole workflow --------------------------------------------------------------------------

def test_request_approve_revoke_workflow(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            clock = svc.clock
            r = await run_command(svc, "alice", REQUEST_WEB1)
            assert r.status == 0, r
            assert r.out == ("request 1 created: deploy@web1 for 10m (policy web-deploy); "
                             "waiting for approval.\n")
            assert r.err == ""
            req = await svc.store.get_request(1)
            assert req.reason == "INC-1: disk full"  # several shell words kept whole
            assert req.status is RequestStatus.PENDING

            # the approver sees it pending; an unrelated user does not; the requester does
            r = await run_command(svc, "bob", "requests --pending")
            assert r.status == 0
            assert re.search(r"^1\s+pending\s+alice\s+deploy@web1\s+10m\s+\S+\s+INC-1: disk full$",
                             r.out, re.M), r.out
            r = await run_command(svc, "mallory", "requests --pending")
            assert (r.status, r.out) == (0, "(none)\n")
            r = await run_command(svc, "mallory", "requests --pending --json")
            assert json.loads(r.out) == []
            r = await run_command(svc, "alice", "requests --json")
            [mine] = json.loads(r.out)
            assert mine["id"] == 1 and mine["status"] == "pending" and mine["requester"] == "alice"
            assert mine["created_at"] == rfc3339(T0)

            # self-approval and a non-approver are refused, with the reason, and change nothing
            r = await run_command(svc, "alice", "approve 1")
            assert r.status == 1
            assert r.err == "jit-proxy: you cannot approve or deny your own request\n"
            r = await run_command(svc, "mallory", "approve 1 --comment sure")
            assert r.status == 1
            assert r.err == "jit-proxy: mallory is not an approver for policy web-deploy\n"
            r = await run_command(svc, "mallory", "approve 1 --json")
            assert r.status == 1
            assert json.loads(r.out) == {"error": "mallory is not an approver for policy "
                                                  "web-deploy"}
            assert (await svc.store.get_request(1)).status is RequestStatus.PENDING
            assert await svc.store.list_grants() == []

            clock.advance(30)
            r = await run_command(svc, "bob", "approve 1 --comment looks fine")
            assert r.status == 0, r
            ends = rfc3339(T0 + 30 + 600)
            assert r.out == f"request 1 approved: grant 1 gives alice deploy@web1 until {ends}\n"
            req = await svc.store.get_request(1)
            assert req.status is RequestStatus.APPROVED
            assert (req.decided_by, req.decision_comment) == ("bob", "looks fine")
            assert svc.live_grant("alice", "web1", "deploy").id == 1
            assert svc.live_grant("alice", "web1", "root") is None
            assert svc.live_grant("carol", "web1", "deploy") is None

            # approving again: the request is no longer pending
            r = await run_command(svc, "carol", "approve 1")
            assert r.status == 1 and "approved, not pending" in r.err

            r = await run_command(svc, "alice", "grants")
            assert r.status == 0
            assert re.search(rf"^1\s+active\s+alice\s+deploy@web1\s+{re.escape(ends)}\s+1$",
                             r.out, re.M), r.out
            r = await run_command(svc, "alice", "grants --json")
            [g] = json.loads(r.out)
            assert (g["id"], g["status"], g["user"], g["target"], g["login"], g["request_id"]) \
                == (1, "active", "alice", "web1", "deploy", 1)
            assert (g["starts_at"], g["ends_at"], g["ended_at"]) == (rfc3339(T0 + 30), ends, None)
            assert json.loads((await run_command(svc, "mallory", "grants --json")).out) == []
            r = await run_command(svc, "bob", "requests --json")
            assert json.loads(r.out)[0]["decided_by"] == "bob"

            r = await run_command(svc, "alice", "whoami --json")
            who = json.loads(r.out)
            assert who["user"] == "alice" and who["groups"] == ["dev"]
            assert [x["id"] for x in who["active_grants"]] == [1]

            # revoke: not by a stranger; yes by the approver
            r = await run_command(svc, "mallory", "revoke 1")
            assert r.status == 1 and r.err == "jit-proxy: mallory may not revoke grant 1\n"
            clock.advance(60)
            r = await run_command(svc, "bob", "revoke 1")
            assert (r.status, r.out) == (0, "grant 1 revoked; its sessions are closed\n")
            grant = await svc.store.get_grant(1)
            assert grant.status is GrantStatus.REVOKED
            assert (grant.ended_by, grant.ended_at) == ("bob", T0 + 90)
            assert svc.live_grant("alice", "web1", "deploy") is None
            r = await run_command(svc, "bob", "revoke 1")
            assert r.status == 1 and "already revoked" in r.err
            assert (await run_command(svc, "alice", "grants")).out == "(none)\n"
            [g] = json.loads((await run_command(svc, "alice", "grants --all --json")).out)
            assert g["status"] == "revoked" and g["ended_by"] == "bob"
            assert g["ended_at"] == rfc3339(T0 + 90)

    run(scenario())
    types = [e["type"] for e in audit_events(tmp_path)]
    for expected in ("access.request.created", "access.approval.refused",
                     "access.request.approved", "access.grant.created", "access.revoke.refused",
                     "access.grant.revoked"):
        assert expected in types, (expected, types)
    assert types.count("access.approval.refused") == 4  # alice, mallory twice, carol (not pending)
    created = next(e for e in audit_events(tmp_path) if e["type"] == "access.request.created")
    assert created["actor"] == "alice" and created["reason"] == "INC-1: disk full"
    assert created["duration"] == 600 and created["policy"] == "web-deploy"
    assert_audit_ok(tmp_path)


def test_self_approval_refused_for_an_approver(tmp_path, host_key):
    """carol may approve web-deploy requests, but never her own."""
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            assert (await run_command(svc, "carol", REQUEST_WEB1)).status == 0
            r = await run_command(svc, "carol", "approve 1")
            assert r.status == 1
            assert "your own request" in r.err
            assert (await svc.store.get_request(1)).status is RequestStatus.PENDING
            r = await run_command(svc, "carol", "deny 1 --reason nope")
            assert r.status == 1 and "your own request" in r.err
            assert (await run_command(svc, "bob", "approve 1")).status == 0
    run(scenario())
    assert_audit_ok(tmp_path)


def test_a_requester_cancels_their_own_pending_request_only(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            await run_command(svc, "alice", REQUEST_WEB1)
            await run_command(svc, "alice", REQUEST_WEB1)
            r = await run_command(svc, "carol", "cancel 1")  # not hers: told apart from none
            assert (r.status, r.err) == (1, "jit-proxy: no request 1 of yours\n")
            assert (await run_command(svc, "alice", "cancel 42")).err == \
                "jit-proxy: no request 42 of yours\n"
            r = await run_command(svc, "alice", "cancel 1")
            assert (r.status, r.out) == (0, "request 1 cancelled\n")
            assert (await svc.store.get_request(1)).status is RequestStatus.CANCELLED
            r = await run_command(svc, "bob", "approve 1")  # a cancelled request stays so
            assert r.status == 1 and "cancelled, not pending" in r.err
            r = await run_command(svc, "alice", "cancel 1")
            assert r.err == "jit-proxy: request 1 cannot be cancelled: it is cancelled\n"
            assert (await run_command(svc, "bob", "approve 2")).status == 0
            r = await run_command(svc, "alice", "cancel 2")
            assert r.err == "jit-proxy: request 2 cannot be cancelled: it is approved\n"
            assert [g.request_id for g in await svc.store.list_grants()] == [2]
    run(scenario())
    events = audit_events(tmp_path)
    assert [e["request"] for e in events if e["type"] == "access.request.cancelled"] == [1]
    refused = [(e["actor"], e["why"]) for e in events if e["type"] == "access.cancel.refused"]
    assert refused == [("carol", "no such request"), ("alice", "no such request"),
                       ("alice", "it is cancelled"), ("alice", "it is approved")]
    assert_audit_ok(tmp_path)


def test_a_refusal_still_goes_out_when_pending_requests_cannot_be_read(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            await run_command(svc, "alice", REQUEST_WEB1)
            waiting = await svc.describe_denial("alice", "web1", None)

            async def broken(**kw):
                raise OSError("disk I/O error")
            svc.store.list_requests = broken
            return waiting, await svc.describe_denial("alice", "web1", None)
    waiting, fallback = run(scenario())
    assert "Your request 1 (deploy@web1) is waiting for approval" in waiting
    assert fallback.startswith("jit-proxy: alice has no active grant for web1. Request one with")


def test_deny(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            await run_command(svc, "alice", REQUEST_WEB1)
            r = await run_command(svc, "bob", "deny 1 --reason use the runbook first")
            assert (r.status, r.out) == (0, "request 1 denied\n")
            req = await svc.store.get_request(1)
            assert req.status is RequestStatus.DENIED
            assert req.decision_comment == "use the runbook first"
            assert await svc.store.list_grants() == []
            r = await run_command(svc, "bob", "approve 1")
            assert r.status == 1 and "denied, not pending" in r.err
    run(scenario())
    assert "access.request.denied" in [e["type"] for e in audit_events(tmp_path)]
    assert_audit_ok(tmp_path)


@pytest.mark.parametrize("command_line, reason", [
    ("request web1 --login deploy --for 10m --reason don't panic", "don't panic"),
    ("request web1 --login deploy --for 10m --reason \"it's quoted\"", "it's quoted"),
    ("request web1 --login deploy --for 10m --reason 'INC-2: \"a\" b'", 'INC-2: "a" b'),
    ("request web1 --login deploy --for 10m --reason INC-3   spaced", "INC-3   spaced"),
    ("request web1 --login deploy --for 10m --reason caf\u00e9 \u2603 #42", "caf\u00e9 \u2603 #42"),
    ("request web1 --login deploy --reason first --for 10m", "first"),
])
def test_reason_forms(tmp_path, host_key, command_line, reason):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            r = await run_command(svc, "alice", command_line)
            assert r.status == 0, r
            assert (await svc.store.get_request(1)).reason == reason
            [listed] = json.loads((await run_command(svc, "bob", "requests --json")).out)
            assert listed["reason"] == reason
    run(scenario())
    assert_audit_ok(tmp_path)


USAGE_ERRORS = [
    "bogus",
    "request",
    "request web1",
    "request web1 --login deploy --for 10m",
    "request web1 --login deploy --reason x",
    "request web1 --login deploy --for 2x --reason x",
    "request web1 --login deploy --for 0s --reason x",
    "request web1 --login deploy --for 10m --reason",
    "request web1 --login deploy --for 10m --reason x --bogus",
    "request --help",
    "approve",
    "approve abc",
    "approve 1 --comment",
    "approve 1 2",
    "deny 1",
    "revoke",
    "revoke one",
    "grants --bogus",
    "--json",
    "requests --pending extra",
    "'unterminated",
]


def test_usage_errors_return_2(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            for command_line in USAGE_ERRORS:
                r = await run_command(svc, "alice", command_line)
                assert r.status == 2, (command_line, r)
                assert r.out == "", command_line
                assert "Try 'ssh jit-proxy help'" in r.err or r.err == HELP, (command_line, r)
            assert await svc.store.list_requests() == []
    run(scenario())
    refused = [e for e in audit_events(tmp_path) if e["type"] == "command.refused"]
    assert len(refused) == len(USAGE_ERRORS)
    assert_audit_ok(tmp_path)


def test_usage_error_explains_bad_duration(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            r = await run_command(svc, "alice", "request web1 --login deploy --for 2x --reason x")
            assert r.status == 2
            assert "invalid duration '2x'" in r.err and "15m" in r.err
            r = await run_command(svc, "alice", "request web1 --login deploy --for 0s --reason x")
            assert r.status == 2 and "longer than 0s" in r.err
    run(scenario())
    refused = [e for e in audit_events(tmp_path) if e["type"] == "command.refused"]
    assert len(refused) == 2 and refused[0]["command"] == "request"


def test_an_option_given_twice_is_refused_not_silently_overridden(tmp_path, host_key):
    """ssh joins a command's words, so --reason "fix --for 4h" arrives as a reason "fix" and a
    second --for: the request must not go out for 4h."""
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            r = await run_command(svc, "alice", "request web1 --login deploy --for 10m "
                                                "--reason fix --for 4h")
            assert r.status == 2
            assert "--for is given twice" in r.err and "cannot hold one" in r.err
            r = await run_command(svc, "bob", "approve 1 --comment ok --comment=sure")
            assert r.status == 2 and "--comment is given twice" in r.err
            for second in ("--fo 4h", "--f=4h"):  # no abbreviations that would get round it
                r = await run_command(svc, "alice", "request web1 --login deploy --for 10m "
                                                    f"--reason fix {second}")
                assert r.status == 2 and "unrecognized arguments" in r.err, r
            assert await svc.store.list_requests() == []
    run(scenario())
    refused = [e for e in audit_events(tmp_path) if e["type"] == "command.refused"]
    assert [e["command"] for e in refused] == ["request", "approve", "request", "request"]


@pytest.mark.parametrize("command_line", ["", "help", "-h", "--help", "help --json"])
def test_help(tmp_path, host_key, command_line):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            r = await run_command(svc, "alice", command_line)
            assert r.status == 0
            if command_line.endswith("--json"):
                assert json.loads(r.out) == {"help": HELP}
            else:
                assert r.out == HELP
    run(scenario())


def test_duration_over_max_refused_with_the_max(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            r = await run_command(svc, "alice",
                                  "request web1 --login deploy --for 3h --reason INC-9")
            assert r.status == 1
            assert r.err == ("jit-proxy: duration 3h exceeds the maximum of 2h for "
                             "deploy@web1\n")
            r = await run_command(svc, "alice",
                                  "request db1 --login postgres --for 31m --reason x --json")
            assert r.status == 1
            assert json.loads(r.out) == {
                "error": "duration 31m exceeds the maximum of 30m for postgres@db1"}
            assert await svc.store.list_requests() == []
            r = await run_command(svc, "alice",
                                  "request web1 --login deploy --for 2h --reason at the max")
            assert r.status == 0
    run(scenario())
    refused = [e for e in audit_events(tmp_path) if e["type"] == "access.request.refused"]
    assert len(refused) == 2 and "maximum of 2h" in refused[0]["why"]
    assert_audit_ok(tmp_path)


@pytest.mark.parametrize("actor, command_line, message", [
    ("alice", "request web9 --login deploy --for 10m --reason x", "unknown target 'web9'"),
    ("mallory", REQUEST_WEB1, "no policy lets mallory request deploy@web1"),
    ("alice", "request web1 --login postgres --for 10m --reason x", "no policy lets alice"),
    ("alice", "request web1 --login deploy --for 10m --reason ' '", "a reason is required"),
    ("bob", "approve 42", "no request 42"),
    ("bob", "deny 42 --reason x", "no request 42"),
    ("bob", "revoke 42", "no grant 42"),
])
def test_refusals_return_1(tmp_path, host_key, actor, command_line, message):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            r = await run_command(svc, actor, command_line)
            assert r.status == 1, r
            assert r.err.startswith("jit-proxy: ") and message in r.err
            assert await svc.store.list_requests() == []
    run(scenario())
    assert_audit_ok(tmp_path)


def test_expire_due(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            await run_command(svc, "alice", REQUEST_WEB1)
            assert (await run_command(svc, "bob", "approve 1")).status == 0
            svc.clock.advance(599)
            assert await svc.expire_due() == []
            assert svc.live_grant("alice", "web1", "deploy") is not None
            svc.clock.advance(2)
            assert svc.live_grant("alice", "web1", "deploy") is None  # past its end already
            [ended] = await svc.expire_due()
            assert ended.id == 1 and ended.status is GrantStatus.EXPIRED
            # it ended at its own end, not when the sweep found it a second later
            assert (ended.ended_by, ended.ended_at) == ("system", ended.ends_at)
            stored = await svc.store.get_grant(1)
            assert stored.status is GrantStatus.EXPIRED and stored.ended_at == ended.ends_at
            assert await svc.expire_due() == []  # only once
            [g] = json.loads((await run_command(svc, "alice", "grants --all --json")).out)
            assert g["status"] == "expired"
            r = await run_command(svc, "alice", "revoke 1")
            assert r.status == 1 and "already expired" in r.err
    run(scenario())
    expired = [e for e in audit_events(tmp_path) if e["type"] == "access.grant.expired"]
    assert len(expired) == 1
    assert expired[0]["grant"] == 1 and expired[0]["actor"] == "system"
    assert expired[0]["ends_at"] == rfc3339(T0 + 600)
    assert_audit_ok(tmp_path)


def test_restart_reloads_and_expires_what_is_due(tmp_path, host_key):
    clock = ManualClock(T0)

    async def first():
        async with service_in(tmp_path, host_key, clock=clock) as svc:
            await run_command(svc, "alice", REQUEST_WEB1)
            await run_command(svc, "bob", "approve 1")
            await run_command(svc, "alice",
                              "request db1 --login postgres --for 30m --reason check")
            await run_command(svc, "bob", "approve 2")
            g = svc.live_grant("alice", "web1", "deploy")
            await svc.store.create_session(user="alice", target="web1", login="deploy",
                                           grant_id=g.id, kind="shell", detail=None, now=T0)

    async def second():
        async with service_in(tmp_path, host_key, clock=clock) as svc:
            # web1 (10m) ended while "down"; db1 (30m) is still live
            assert (await svc.store.get_grant(1)).status is GrantStatus.EXPIRED
            assert svc.live_grant("alice", "web1", "deploy") is None
            assert svc.live_grant("alice", "db1", "postgres").id == 2
            assert await svc.store.list_sessions(live=True) == []

    run(first())
    clock.advance(15 * 60)
    run(second())
    types = [e["type"] for e in audit_events(tmp_path)]
    assert "ssh.session.orphaned" in types and types.count("access.grant.expired") == 1
    assert_audit_ok(tmp_path)


def test_targets_whoami_ca_sessions(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            t = json.loads((await run_command(svc, "alice", "targets --json")).out)
            assert t == [
                {"name": "web1", "kind": "ssh", "logins": ["deploy", "root"],
                 "max_duration": "2h", "description": "the web server"},
                {"name": "db1", "kind": "ssh", "logins": ["postgres"], "max_duration": "30m",
                 "description": None},
            ]
            assert (await run_command(svc, "mallory", "targets")).out == "(none)\n"
            r = await run_command(svc, "mallory", "whoami")
            assert r.out == "user: mallory\ngroups: (none)\nno active grants\n"
            r = await run_command(svc, "alice", "ca --json")
            data = json.loads(r.out)
            marker, patterns, ca_key = data["known_hosts"].split(" ", 2)
            assert marker == "@cert-authority" and ca_key == svc.ca.host_ca_public
            # the client trusts the host CA for the proxy's names and the SSH targets
            assert {"jit-proxy", "web1"} <= set(patterns.split(","))
            assert data["user_ca"] == svc.ca.user_ca_public
            assert svc.ca.host_ca_public in (await run_command(svc, "alice", "ca")).out
            assert (await run_command(svc, "alice", "sessions")).out == "(none)\n"
    run(scenario())


def test_user_certificate_for_grant(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            await run_command(svc, "alice", REQUEST_WEB1)
            await run_command(svc, "bob", "approve 1")
            grant = svc.live_grant("alice", "web1", "deploy")
            key = asyncssh.generate_private_key("ssh-ed25519")
            cert1 = await svc.user_certificate(grant, key)
            cert2 = await svc.user_certificate(grant, key)
            assert cert1.principals == ["deploy"]
            rec = await svc.store.get_certificate(1)
            assert rec.key_id == "jit-proxy user=alice grant=1 request=1 serial=1"
            assert (rec.valid_after, rec.valid_before) == (int(T0) - 120, int(grant.ends_at))
            assert rec.grant_id == 1 and rec.principals == "deploy"
            assert (await svc.store.get_certificate(2)).key_id.endswith(" serial=2")
            return cert1, cert2
    cert1, cert2 = run(scenario())
    if shutil.which("ssh-keygen"):
        path = tmp_path / "c-cert.pub"
        path.write_bytes(cert1.export_certificate())
        out = subprocess.run(["ssh-keygen", "-L", "-f", str(path)], capture_output=True,
                             text=True, env={**os.environ, "TZ": "UTC"}, check=True).stdout
        assert 'Key ID: "jit-proxy user=alice grant=1 request=1 serial=1"' in out
        assert re.search(r"Serial: 1$", out, re.M)
        assert "Valid: from 2027-01-15T07:58:00 to 2027-01-15T08:10:00" in out
        assert re.search(r"Principals: \n\s+deploy\n\s+Critical", out)
        assert re.search(r"Extensions: \n\s+permit-pty\n*$", out)
    issued = [e for e in audit_events(tmp_path) if e["type"] == "ca.certificate.issued"]
    assert [e["serial"] for e in issued] == [1, 2]
    assert issued[0]["principals"] == ["deploy"] and issued[0]["grant"] == 1
    assert_audit_ok(tmp_path)


# --- regressions of bugs found by these tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command_line", ["approve 99999999999999999999",
                                          "deny 99999999999999999999 --reason x",
                                          "revoke 99999999999999999999"])
def test_huge_id_is_refused(tmp_path, host_key, command_line):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            r = await run_command(svc, "bob", command_line)
            assert r.status in (1, 2)
    run(scenario())


def test_unbounded_duration_is_refused(tmp_path, host_key):
    text = config_text().replace("max_duration: 30m", "max_duration: 999999999w")
    with pytest.raises(ConfigError, match="max_duration"):
        parse_config(text)

    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            r = await run_command(svc, "alice",
                                  "request db1 --login postgres --for 999999999w --reason x")
            assert r.status == 2 and "longer than" in r.err
    run(scenario())


def test_reason_with_two_apostrophes(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            r = await run_command(
                svc, "alice", "request web1 --login deploy --for 10m --reason it's full, isn't it")
            assert r.status == 0
            assert (await svc.store.get_request(1)).reason == "it's full, isn't it"
    run(scenario())


def test_free_text_that_could_rewrite_an_approvers_terminal_is_refused(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            forged = "x\r\x1b[2K3  pending  alice  deploy@web1  10m"
            r = await run_command(svc, "alice",
                                  f"request web1 --login deploy --for 10m --reason {forged}")
            assert r.status == 1 and "control or invisible characters" in r.err
            r = await run_command(svc, "alice", "request web1 --login deploy --for 10m "
                                                "--reason INC-1 \u202eevil")
            assert r.status == 1
            r = await run_command(svc, "alice", "request web1 --login deploy --for 10m "
                                                "--reason " + "x" * 1001)
            assert r.status == 1 and "longer than 1000" in r.err
    run(scenario())


def test_tables_show_control_characters_escaped():
    from proxy.ssh.commands import _table
    out = _table([["1", "a\x1b[2Kb"]], ["ID", "DETAIL"])
    assert "\x1b" not in out and "a\\x1b[2Kb" in out


def test_a_flood_of_requests_cannot_hide_others_from_approvers(tmp_path, host_key):
    async def scenario():
        async with service_in(tmp_path, host_key) as svc:
            r = await run_command(svc, "carol", "request web1 --login deploy --for 10m "
                                                "--reason carol's")
            assert r.status == 0, r.err
            for i in range(25):
                r = await run_command(svc, "alice", f"request web1 --login deploy --for 10m "
                                                    f"--reason flood {i}")
            assert r.status == 1 and "pending requests" in r.err  # capped per user
            r = await run_command(svc, "bob", "requests --pending --json")
            assert "carol's" in r.out
            r = await run_command(svc, "alice", "requests --json")  # alice approves nothing
            assert "flood" in r.out and "carol's" not in r.out
    run(scenario())

"""Linux-PAM logins (issue 4): keyboard-interactive and password through PAM, relayed
conversations, method chains, the account phase, lockout, and PAM on the PostgreSQL port.

Real OpenSSH clients on a pseudo-terminal (as a person types) and asyncssh as a second client
where the exact rounds of a conversation are checked; PAM is Debian's pam_wrapper with pam_matrix,
pam_echo and pam_oath (see pamstack.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import asyncssh
import pytest
from asyncssh.packet import Boolean, String

from tests.conftest import Env
from tests.integration.pamstack import PASSWORDS, WELCOME, PamStack, needs_pam_wrapper
from tests.integration.ptyrun import PtySession

pytestmark = needs_pam_wrapper


def configure(env: Env, stack: PamStack, methods: list[str], service: str = "jit-proxy",
              **auth) -> None:
    cfg = env.config()
    cfg["auth"].update({"methods": methods, "pam": stack.config(service), **auth})
    env.write_config(cfg)
    env.restart()


@pytest.fixture(scope="module")
def pam_env(tmp_path_factory, test_login):
    root = tmp_path_factory.mktemp("jitpam")
    stack = PamStack(root / "pam")
    e = Env(root, test_login)
    e.extra_env = stack.environ
    e.stack = stack
    e.start()
    yield e
    e.close()


def ssh_on_tty(env: Env, user: str, method: str, command: str = "grants",
               key: bool = False) -> list[str]:
    """argv of OpenSSH asking on a terminal (BatchMode off), only by ``method`` (and the key)."""
    methods = f"publickey,{method}" if key else method
    return ["ssh", "-F", str(env.ssh_config), "-o", "BatchMode=no",
            "-o", f"PreferredAuthentications={methods}",
            "-o", f"PubkeyAuthentication={'yes' if key else 'no'}",
            "-o", "NumberOfPasswordPrompts=1", f"{user}@jit-proxy", command]


def type_password(env: Env, user: str, method: str, password: str, prompt: bytes,
                  key: bool = False) -> tuple[int, bytes]:
    with PtySession(ssh_on_tty(env, user, method, key=key)) as s:
        s.expect(prompt)
        s.send(password.encode() + b"\r")
        status = s.wait(20)
        return status, s.read_rest()


async def asyncssh_rounds(env: Env, user: str, answers: list[str], methods=("keyboard-interactive",),
                          key: bool = False, delay: float = 0
                          ) -> tuple[bool, list[tuple[str, list]]]:
    """Log in with asyncssh answering each round from ``answers`` (each round with prompts
    after ``delay`` seconds); returns (ok, rounds seen)."""
    rounds: list[tuple[str, list]] = []
    todo = list(answers)

    class Client(asyncssh.SSHClient):
        def kbdint_auth_requested(self):
            return ""

        async def kbdint_challenge_received(self, name, instructions, lang, prompts):
            if len(todo) < len(prompts):
                return None  # out of answers: give up this method
            rounds.append((instructions, list(prompts)))
            if prompts:
                await asyncio.sleep(delay)
            return [todo.pop(0) for _ in prompts]

    try:
        conn, _ = await asyncssh.create_connection(
            Client, "127.0.0.1", env.port, username=user, known_hosts=None,
            client_keys=[str(env.keys / user)] if key else None, agent_path=None,
            preferred_auth=",".join(methods), password=answers[0] if "password" in methods else None)
    except (asyncssh.PermissionDenied, asyncssh.DisconnectError, ConnectionError):
        return False, rounds  # (ssh.max_auth_tries may close the connection)
    async with conn:
        result = await conn.run("grants", check=False)
        assert result.exit_status == 0, result.stderr
    return True, rounds


def test_password_through_pam_with_keyboard_interactive_and_with_password(pam_env):
    configure(pam_env, pam_env.stack, ["keyboard-interactive", "password"])
    status, out = type_password(pam_env, "alice", "keyboard-interactive", PASSWORDS["alice"],
                                b"Password: ")
    assert status == 0, out
    assert pam_env.wait_event("auth.success", lambda e: e["actor"] == "alice"
                              and e["method"] == "keyboard-interactive")
    status, out = type_password(pam_env, "alice", "password", PASSWORDS["alice"], b"password: ")
    assert status == 0, out
    assert pam_env.wait_event("auth.success", lambda e: e["actor"] == "alice"
                              and e["method"] == "password")


def test_wrong_password_is_refused_and_audited(pam_env):
    configure(pam_env, pam_env.stack, ["keyboard-interactive", "password"])
    for method, prompt in (("keyboard-interactive", b"Password: "), ("password", b"password: ")):
        status, out = type_password(pam_env, "alice", method, "not-her-password", prompt)
        assert status == 255 and b"Permission denied" in out, out
        event = pam_env.wait_event("auth.failure", lambda e: e["method"] == method)
        assert event["actor"] == "alice" and event["why"].startswith("PAM auth")
        assert "not-her-password" not in (pam_env.state / "audit.jsonl").read_text()
        assert "not-her-password" not in pam_env.log_path.read_text()


def test_locked_account_is_refused_by_the_account_phase(pam_env):
    configure(pam_env, pam_env.stack, ["keyboard-interactive"])
    # carol's password is right, but her account does not allow this service
    status, out = type_password(pam_env, "carol", "keyboard-interactive", PASSWORDS["carol"],
                                b"Password: ")
    assert status == 255 and b"Permission denied" in out, out
    event = pam_env.wait_event("auth.failure", lambda e: e["actor"] == "carol")
    assert event["why"].startswith("PAM account")


def test_info_password_and_totp_each_in_their_own_round(pam_env):
    stack = pam_env.stack
    # keys stay allowed for the workflow commands; the clients below use keyboard-interactive only
    configure(pam_env, stack, ["publickey", "keyboard-interactive"], service="jit-otp")
    ok, rounds = asyncio.run(asyncssh_rounds(pam_env, "alice", [PASSWORDS["alice"], stack.totp()]))
    assert ok, rounds
    # the info text is the round's instruction (shown), never a question; echo off for both
    assert rounds == [(f"{WELCOME}, alice.", [("Password: ", False)]),
                      ("", [("One-time password (OATH) for `alice': ", False)])]
    ok, rounds = asyncio.run(asyncssh_rounds(pam_env, "alice", [PASSWORDS["alice"], "000000"]))
    assert not ok and len(rounds) == 2
    assert pam_env.wait_event("auth.failure", lambda e: e["actor"] == "alice"
                              and e["why"].startswith("PAM auth"))
    # and the same with OpenSSH at a terminal, jumping to a target: the text is printed, then
    # the two prompts, and the right code opens the session
    pam_env.grant("alice")
    hop = " ".join(ssh_on_tty(pam_env, "alice", "keyboard-interactive", command="")[:-2])
    argv = ["ssh", "-F", str(pam_env.ssh_config), "-o", f"ProxyCommand={hop} -W %h:%p "
            "alice@jit-proxy", f"{pam_env.login}@web1", "echo opened-$((6*7))"]
    with PtySession(argv) as s:
        seen = s.expect(b"Password: ")
        assert f"{WELCOME}, alice.".encode() in seen
        s.send(PASSWORDS["alice"].encode() + b"\r")
        s.expect(b"One-time password (OATH) for `alice': ")
        s.send(stack.totp().encode() + b"\r")
        assert s.wait(20) == 0, s.read_rest()
        assert b"opened-42" in s.read_rest()


def test_publickey_then_keyboard_interactive_needs_both(pam_env):
    configure(pam_env, pam_env.stack, ["publickey,keyboard-interactive"])
    # the key alone (BatchMode: no prompts) is refused after a partial success
    r = pam_env.ssh("alice", "grants")
    assert r.returncode == 255 and b"Permission denied" in r.stderr
    assert pam_env.wait_event("auth.partial", lambda e: e["method"] == "publickey")
    # keyboard-interactive alone is not even offered before the key
    ok, rounds = asyncio.run(asyncssh_rounds(pam_env, "alice", [PASSWORDS["alice"]]))
    assert not ok and rounds == []
    with PtySession(ssh_on_tty(pam_env, "alice", "keyboard-interactive")) as s:
        assert s.wait(20) == 255
        assert b"Permission denied (publickey)" in s.read_rest()
    # both, in order, log in
    ok, rounds = asyncio.run(asyncssh_rounds(pam_env, "alice", [PASSWORDS["alice"]],
                                             methods=("publickey", "keyboard-interactive"),
                                             key=True))
    assert ok and len(rounds) == 1
    status, out = type_password(pam_env, "alice", "keyboard-interactive", PASSWORDS["alice"],
                                b"Password: ", key=True)
    assert status == 0, out
    assert pam_env.wait_event("auth.success", lambda e: e["actor"] == "alice" and
                              e["method"] == "publickey,keyboard-interactive")


def test_lockout_refuses_even_the_right_password(pam_env):
    configure(pam_env, pam_env.stack, ["keyboard-interactive", "password"],
              max_failures=3, lockout="1h")
    for _ in range(3):
        status, out = type_password(pam_env, "bob", "password", "wrong", b"password: ")
        assert status == 255, out
    assert pam_env.wait_event("auth.lockout", lambda e: e["subject"] == "user:bob")
    r = pam_env.run(ssh_on_tty(pam_env, "bob", "password")[:-1] + ["-o", "BatchMode=yes",
                                                                    "grants"])
    assert r.returncode == 255 and b"too many failed logins" in r.stderr  # the banner says why
    assert b"try again in 1h." in r.stderr  # and how long is left (lockout: 1h)
    status, out = type_password(pam_env, "bob", "password", PASSWORDS["bob"], b"password: ")
    assert status == 255 and b"Permission denied" in out, out
    with PtySession(ssh_on_tty(pam_env, "bob", "keyboard-interactive")) as s:
        assert s.wait(20) == 255
        assert b"too many failed logins" in s.read_rest()
    assert pam_env.wait_event("auth.locked", lambda e: e["actor"] == "bob")
    # alice, from the same address, is not locked
    status, out = type_password(pam_env, "alice", "password", PASSWORDS["alice"], b"password: ")
    assert status == 0, out
    # the operator sees the lockout and ends it
    from tests.integration.test_operations import jit
    r = jit("status", "-c", str(pam_env.config_path))
    assert r.returncode == 0 and "user:bob" in r.stdout, r.stderr
    r = jit("lockouts", "clear", "user:carol", "-c", str(pam_env.config_path))
    assert r.returncode == 1 and "'user:carol' is not locked out (locked: user:bob)" in r.stderr
    r = jit("lockouts", "clear", "bob", "-c", str(pam_env.config_path))  # without its kind
    assert r.returncode == 1
    assert "'bob': give user:NAME, keyholder:NAME or address:IP (locked: user:bob)" in r.stderr
    r = jit("lockouts", "-c", str(pam_env.config_path))  # no action: says what to type
    assert r.returncode == 2 and "say what to do: jit-proxy lockouts clear SUBJECT" in r.stderr
    r = jit("lockouts", "-c", str(pam_env.config_path), "clear", "user:bob")  # -c first
    assert r.returncode == 0, r.stderr
    assert pam_env.wait_event("auth.unlocked", lambda e: e["subject"] == "user:bob")
    status, out = type_password(pam_env, "bob", "password", PASSWORDS["bob"], b"password: ")
    assert status == 0, out


# --- PAM on the PostgreSQL port ------------------------------------------------------------------

@pytest.fixture(scope="module")
def pam_pg_env(tmp_path_factory, test_login, pg_cluster):
    root = tmp_path_factory.mktemp("jitpampg")
    stack = PamStack(root / "pam")
    e = Env(root, test_login, pg_cluster)
    cfg = e.config()
    # SSH asks for a password and a code; psql can send one password: its own service
    cfg["auth"]["pam"] = e.stack_config = stack.config("jit-otp")
    cfg["targets"]["orders"].update({"client_auth": "pam", "pam_service": "jit-proxy"})
    e.write_config(cfg)
    e.extra_env = stack.environ
    e.start()
    yield e
    e.close()


def psql_pam(env: Env, user: str, password: str, sslmode: str = "verify-full"):
    from tests.integration.test_postgres import ca_file
    conninfo = (f"host=127.0.0.1 port={env.pg_port} user={user} dbname=orders "
                f"sslmode={sslmode} sslrootcert={ca_file(env)}")
    return subprocess.run(["psql", "-X", "-At", conninfo, "-c", "SELECT current_user"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PGPASSWORD": password})


def test_psql_with_a_pam_password_over_tls(pam_pg_env):
    env = pam_pg_env
    req = env.json("alice", "request orders --role read --for 30m --reason 'pam db'")
    grant = env.json("bob", f"approve {req['id']}")
    r = psql_pam(env, "alice", PASSWORDS["alice"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{env.role_prefix}alice_g{grant['id']}"
    assert env.wait_event("auth.success", lambda e: e["method"] == "pam" and
                          e["grant"] == grant["id"])
    # db-login has no secret to give for this target, and says what to do instead
    r = env.ssh("alice", "db-login orders")
    assert r.returncode != 0 and b"takes your own password (PAM)" in r.stderr, r.stderr
    # without TLS the password is never asked for
    r = psql_pam(env, "alice", PASSWORDS["alice"], sslmode="disable")
    assert r.returncode != 0 and "requires TLS" in r.stderr, r.stderr
    # a wrong password, and a right password without a grant, fail alike (28P01)
    for user, password, why in (("alice", "wrong", "PAM auth"),
                                ("bob", PASSWORDS["bob"], "no live grant")):
        r = psql_pam(env, user, password)
        assert r.returncode != 0
        assert f'password authentication failed for user "{user}"' in r.stderr, r.stderr
        assert env.wait_event("auth.failure", lambda e: e["actor"] == user and
                              e["method"] == "pam" and e["why"].startswith(why))


def test_a_users_lockout_holds_back_passwords_not_keys(pam_env):
    """Failed passwords lock the user's password logins; the user's key, which nobody can
    guess, still gets in (as with sshd and pam_faillock)."""
    configure(pam_env, pam_env.stack, ["publickey", "password"], max_failures=3, lockout="1h",
              max_failures_per_address=1000)
    for _ in range(3):
        status, out = type_password(pam_env, "bob", "password", "wrong", b"password: ")
        assert status == 255, out
    assert pam_env.wait_event("auth.lockout", lambda e: e["subject"] == "user:bob")
    failure = pam_env.wait_event("auth.failure", lambda e: e["actor"] == "bob")
    assert failure["counts_against"] == ["user:bob", "address:127.0.0.1"]
    status, out = type_password(pam_env, "bob", "password", PASSWORDS["bob"], b"password: ")
    assert status == 255 and b"Permission denied" in out, out  # the right password: locked
    assert pam_env.wait_event("auth.locked", lambda e: e["actor"] == "bob"
                              and e.get("method") == "password")
    assert b"too many failed logins" in out  # the password method is told why (a banner)
    r = pam_env.ssh("bob", "grants")  # his key
    assert r.returncode == 0, r.stderr
    assert b"too many failed logins" not in r.stderr
    jit_clear(pam_env, "user:bob")


def test_the_password_step_after_the_key_is_not_held_back_by_others_failures(pam_env):
    """In a chain that asks for a password after the key, only ``keyholder:NAME`` holds that
    step back: others failing the user's password (here the password method alone; a
    ``client_auth: pam`` PostgreSQL port alike) lock ``user:bob`` but not bob's own chain. The
    step's failures count against both, so a stolen key buys no second round of guesses."""
    configure(pam_env, pam_env.stack, ["password", "publickey,keyboard-interactive"],
              max_failures=3, lockout="1h", max_failures_per_address=1000)
    for _ in range(3):  # someone without bob's key
        status, out = type_password(pam_env, "bob", "password", "wrong", b"password: ")
        assert status == 255, out
    assert pam_env.wait_event("auth.lockout", lambda e: e["subject"] == "user:bob")
    status, out = type_password(pam_env, "bob", "keyboard-interactive", PASSWORDS["bob"],
                                b"Password: ", key=True)
    assert status == 0, out
    assert pam_env.wait_event("auth.success", lambda e: e["actor"] == "bob" and
                              e["method"] == "publickey,keyboard-interactive")
    jit_clear(pam_env, "user:bob")
    # wrong answers after the key count against keyholder:bob and user:bob, and lock both
    before = len(pam_env.audit_events())
    for _ in range(3):
        status, out = type_password(pam_env, "bob", "keyboard-interactive", "wrong",
                                    b"Password: ", key=True)
        assert status == 255, out
    events = pam_env.audit_events()[before:]
    failures = [e["counts_against"] for e in events if e["type"] == "auth.failure"
                and e.get("method") == "keyboard-interactive"]
    assert failures == [["keyholder:bob", "user:bob", "address:127.0.0.1"]] * 3, failures
    assert {e["subject"] for e in events if e["type"] == "auth.lockout"} == {"keyholder:bob",
                                                                            "user:bob"}
    with PtySession(ssh_on_tty(pam_env, "bob", "keyboard-interactive", key=True)) as s:
        assert s.wait(20) == 255
        assert b"too many failed logins" in s.read_rest()
    locked = pam_env.wait_event("auth.locked", lambda e: e["actor"] == "bob")
    assert locked["subjects"] == ["keyholder:bob"], locked  # which lockout to clear
    status, out = type_password(pam_env, "bob", "password", PASSWORDS["bob"], b"password: ")
    assert status == 255 and b"too many failed logins" in out, out
    jit_clear(pam_env, "keyholder:bob")
    status, out = type_password(pam_env, "bob", "keyboard-interactive", PASSWORDS["bob"],
                                b"Password: ", key=True)
    assert status == 0, out
    jit_clear(pam_env, "user:bob")


def test_an_answer_after_the_pam_time_limit_reserves_no_check(pam_env):
    """An answer that comes after ``auth.pam.timeout`` gave the conversation up used to reserve
    a check that nothing released: ``max_failures`` of them and the user's PAM logins were
    refused as "too many logins in progress" until a restart, with no failure counted and no
    lockout to clear (attack review)."""
    cfg = pam_env.config()
    cfg["auth"].update({"methods": ["keyboard-interactive"], "max_failures": 3,
                        "lockout": "1h", "max_failures_per_address": 1000,
                        "pam": {**pam_env.stack.config("jit-proxy"), "timeout": "2s"}})
    cfg["ssh"]["login_grace_time"] = 60
    pam_env.write_config(cfg)
    pam_env.restart()
    before = len(pam_env.audit_events())

    async def late_ones() -> list[bool]:
        return [ok for ok, _ in await asyncio.gather(
            *[asyncssh_rounds(pam_env, "bob", ["late"], delay=3.5) for _ in range(3)])]
    assert asyncio.run(late_ones()) == [False] * 3
    assert asyncio.run(asyncssh_rounds(pam_env, "bob", [PASSWORDS["bob"]]))[0]
    events = pam_env.audit_events()[before:]
    assert not [e for e in events if e["type"] in ("auth.throttled", "auth.lockout")], events


def test_guesses_still_in_flight_count_once_the_address_is_locked(pam_env):
    """A guess that ends while only the source address is locked out is still a guess at the
    user's password. (An attacker used to start guesses, lock its own address with failed keys
    during PAM's fail delay, and have the guesses end uncounted; then again from another
    address.)"""
    configure(pam_env, pam_env.stack, ["publickey", "password"], service="jit-delay",
              max_failures=3, max_failures_per_address=5, lockout="1h", failure_window="1h")
    before = len(pam_env.audit_events())
    guesses = [f"guess-{i}" for i in range(6)] + [PASSWORDS["bob"]]

    async def guess(address: str, password: str) -> bool:
        try:
            conn = await asyncssh.connect(
                "127.0.0.1", pam_env.port, username="bob", password=password, known_hosts=None,
                client_keys=None, agent_path=None, preferred_auth="password",
                local_addr=(address, 0))
        except (asyncssh.PermissionDenied, asyncssh.DisconnectError, ConnectionError):
            return False
        conn.close()
        return True

    async def wrong_key(address: str) -> None:
        with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError,
                            ConnectionError)):
            await asyncssh.connect("127.0.0.1", pam_env.port, username="bob", known_hosts=None,
                                   agent_path=None, client_keys=[str(pam_env.keys / "alice")],
                                   preferred_auth="publickey", local_addr=(address, 0))

    async def attack() -> list[bool]:
        results = []
        for address in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            batch, guesses[:] = guesses[:3], guesses[3:]
            tasks = [asyncio.ensure_future(guess(address, p)) for p in batch]
            await asyncio.sleep(0.3)  # the wrong ones wait out the fail delay (2 s)
            for _ in range(5):  # meanwhile the address locks itself with failed keys
                await wrong_key(address)
            results += [await t for t in tasks]
        return results

    assert asyncio.run(attack()) == [False] * 7  # the right password came after the lockout
    lockouts = [e["subject"] for e in pam_env.audit_events()[before:]
                if e["type"] == "auth.lockout"]
    assert "user:bob" in lockouts
    jit_clear(pam_env, "user:bob")


def test_concurrent_guesses_cannot_outrun_the_lockout(pam_pg_env):
    env = pam_pg_env
    cfg = env.config()
    cfg["auth"].update({"pam": env.stack_config, "max_failures": 3, "lockout": "1h"})
    cfg["targets"]["orders"].update({"client_auth": "pam", "pam_service": "jit-delay"})
    env.write_config(cfg)
    env.restart()
    before = len(env.audit_events())
    from tests.integration.test_postgres import ca_file
    conninfo = (f"host=127.0.0.1 port={env.pg_port} user=bob dbname=orders "
                f"sslmode=verify-full sslrootcert={ca_file(env)}")
    procs = [subprocess.Popen(["psql", "-X", "-At", conninfo, "-c", "SELECT 1"],
                              env={**os.environ, "PGPASSWORD": f"guess-{i}"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(10)]  # under the audit rate limit (20 a minute)
    assert all(p.wait(60) != 0 for p in procs)
    time.sleep(0.5)
    events = env.audit_events()[before:]
    checked = [e for e in events if e["type"] == "auth.failure" and e["actor"] == "bob"
               and e["why"].startswith("PAM auth")]
    assert len(checked) <= 3  # at most max_failures guesses ever reach PAM
    assert [e for e in events if e["type"] == "auth.lockout" and e["subject"] == "user:bob"]
    r = psql_pam(env, "bob", PASSWORDS["bob"])  # psql is told why, as ssh is
    assert r.returncode != 0 and "too many failed logins" in r.stderr, r.stderr
    assert [e for e in events if e["type"] in ("auth.throttled", "auth.locked")]


# --- identities from the system (NSS) ------------------------------------------------------------

def _system_user(name: str, group: str | None) -> None:
    if subprocess.run(["getent", "passwd", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-p", "*", name],
                       check=True)
    if group is not None:
        if subprocess.run(["getent", "group", group], capture_output=True).returncode != 0:
            subprocess.run(["groupadd", group], check=True)
        subprocess.run(["usermod", "-a", "-G", group, name], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="creates a system user and group (needs root)")
def test_system_users_and_groups_through_nss(tmp_path, test_login):
    _system_user("jitnss-ops", "jitnss-sre")   # in the system group the policy names
    _system_user("jitnss-other", None)          # a system user outside it
    stack = PamStack(tmp_path / "pam")
    with open(stack.dir.parent / "passdb", "a") as f:
        f.write("jitnss-ops:ops-pw:jit-proxy\njitnss-other:other-pw:jit-proxy\n"
                "jitnss-ghost:ghost-pw:jit-proxy\n")
    env = Env(tmp_path, test_login)
    cfg = env.config()
    cfg["auth"].update({"identities": "system", "methods": ["publickey", "password"],
                        "pam": stack.config()})
    cfg["policies"][1]["approvers"] = ["group:jitnss-sre"]
    env.write_config(cfg)
    env.extra_env = stack.environ
    env.start()
    try:
        req = env.json("alice", f"request web1 --login {env.login} --for 10m --reason nss")

        async def as_system_user(user: str, password: str, command: str):
            async with asyncssh.connect("127.0.0.1", env.port, username=user, password=password,
                                        known_hosts=None, client_keys=None, agent_path=None,
                                        preferred_auth="password") as conn:
                return await conn.run(command, check=False)

        r = asyncio.run(as_system_user("jitnss-other", "other-pw", f"approve {req['id']}"))
        assert r.exit_status != 0, r.stdout
        r = asyncio.run(as_system_user("jitnss-ops", "ops-pw", f"approve {req['id']}"))
        assert r.exit_status == 0, r.stderr
        assert env.wait_event("access.request.approved",
                              lambda e: e["actor"] == "jitnss-ops")
        # a PAM password is not enough for a name NSS does not know (and the config lacks)
        with pytest.raises(asyncssh.PermissionDenied):
            asyncio.run(as_system_user("jitnss-ghost", "ghost-pw", "grants"))
        assert env.wait_event("auth.failure", lambda e: e["actor"] == "jitnss-ghost" and
                              e["why"] == "unknown user")
    finally:
        env.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="creates a system user and group (needs root)")
def test_a_key_users_system_groups_are_known_before_the_first_command(tmp_path, test_login):
    """With auth.identities: system, a user with a key whose policy names a system group: the
    groups were looked up after USERAUTH_SUCCESS, so a command sent at once raced the lookup
    and was refused about half the time (found by an attack review). They are now looked up
    before any method can succeed."""
    _system_user("jitnss-key", "jitnss-dev")
    env = Env(tmp_path, test_login)
    cfg = env.config()
    cfg["auth"]["identities"] = "system"
    cfg["users"]["jitnss-key"] = {"keys": [env.pub["carol"]]}
    del cfg["users"]["carol"]
    cfg["policies"][1]["requesters"] = ["group:jitnss-dev"]
    env.write_config(cfg)
    env.start()
    try:
        async def request(i: int):
            async with asyncssh.connect("127.0.0.1", env.port, username="jitnss-key",
                                        client_keys=[str(env.keys / "carol")], known_hosts=None,
                                        agent_path=None, config=None) as conn:
                return await conn.run(f"request web1 --login {env.login} --for 10m "
                                      f"--reason nss-{i} --json", check=False)

        for i in range(6):  # a fresh connection each time: the proxy was restarted meanwhile
            r = asyncio.run(request(i))
            assert r.exit_status == 0, (i, r.stderr)
            if i == 2:
                env.restart()
    finally:
        env.close()


def test_a_success_clears_the_users_failures(pam_env):
    configure(pam_env, pam_env.stack, ["password"], max_failures=3, lockout="1h")
    for _ in range(2):
        assert type_password(pam_env, "alice", "password", "wrong", b"password: ")[0] == 255
    assert type_password(pam_env, "alice", "password", PASSWORDS["alice"], b"password: ")[0] == 0
    for _ in range(2):
        assert type_password(pam_env, "alice", "password", "wrong", b"password: ")[0] == 255
    status, out = type_password(pam_env, "alice", "password", PASSWORDS["alice"], b"password: ")
    assert status == 0, out  # 4 failures in all, never 3 in a row: not locked


def test_system_failures_of_pam_are_not_held_against_the_user(pam_env):
    configure(pam_env, pam_env.stack, ["publickey", "password"], service="no-such-service",
              max_failures=1, lockout="1h")
    assert "no PAM service file 'no-such-service'" in pam_env.log_path.read_text()
    status, _ = type_password(pam_env, "alice", "password", PASSWORDS["alice"], b"password: ")
    assert status == 255
    event = pam_env.wait_event("auth.failure", lambda e: e["actor"] == "alice" and
                               "no-such-service" in e["why"])
    assert event["counted"] is False
    assert pam_env.ssh("alice", "grants").returncode == 0  # not locked out: her key still works
    # the password method on a stack that asks twice says so, and that is not her fault either
    configure(pam_env, pam_env.stack, ["publickey", "password"], service="jit-otp",
              max_failures=1, lockout="1h")
    type_password(pam_env, "alice", "password", PASSWORDS["alice"], b"password: ")
    event = pam_env.wait_event("auth.failure", lambda e: "answers one question" in e["why"])
    assert event["counted"] is False and "One-time password" in event["why"]
    assert pam_env.ssh("alice", "grants").returncode == 0


def test_an_unusable_pam_library_is_refused_before_any_login(pam_env, tmp_path):
    cfg = pam_env.config()
    cfg["auth"].update({"methods": ["publickey", "keyboard-interactive"],
                        "pam": {"library": "/nonexistent/libpam.so.0"}})
    bad = tmp_path / "bad.yaml"
    import yaml
    bad.write_text(yaml.safe_dump(cfg))
    import sys
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", "-c", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "auth.pam.library: error: cannot use '/nonexistent/libpam.so.0'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "-c", str(bad)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "auth.pam.library" in r.stderr


# --- clients that do not play fair ----------------------------------------------------------------

async def guess_without_waiting(env: Env, user: str, guesses: list[str], method: str,
                                wait: float = 0.4) -> tuple[bool, int]:
    """Send each guess and, when no answer came within ``wait`` s (pam_faildelay holds a wrong
    one), start over with a new USERAUTH_REQUEST, which cancels the proxy's pending check."""
    todo, tried, holder = list(guesses), 0, {}

    async def restart():
        nonlocal tried
        conn = holder["conn"]
        if conn._auth_complete or not todo:
            return
        if method == "keyboard-interactive":
            await conn.send_userauth_request(b"keyboard-interactive", String(""), String(""))
        else:
            tried += 1
            await conn.send_userauth_request(b"password", Boolean(False), String(todo.pop(0)))
            asyncio.get_running_loop().call_later(wait, lambda: asyncio.ensure_future(restart()))

    def next_guess():
        nonlocal tried
        if not todo:
            return None
        tried += 1
        asyncio.get_running_loop().call_later(wait, lambda: asyncio.ensure_future(restart()))
        return todo.pop(0)

    class Client(asyncssh.SSHClient):
        def connection_made(self, conn):
            holder["conn"] = conn

        def kbdint_auth_requested(self):
            return ""

        def kbdint_challenge_received(self, name, instructions, lang, prompts):
            if not prompts:
                return []
            guess = next_guess()
            return None if guess is None else [guess]

        def password_auth_requested(self):
            return next_guess()

    try:
        conn, _ = await asyncio.wait_for(asyncssh.create_connection(
            Client, "127.0.0.1", env.port, username=user, known_hosts=None, client_keys=None,
            agent_path=None, preferred_auth=method), 60)
    except (asyncssh.PermissionDenied, asyncssh.DisconnectError, asyncio.TimeoutError,
            OSError):  # OSError: our raw requests met a connection closed by max_auth_tries
        return False, tried
    async with conn:
        return (await conn.run("grants", check=False)).exit_status == 0, tried


@pytest.mark.parametrize("method", ["keyboard-interactive", "password"])
def test_starting_over_does_not_skip_the_verdict(pam_env, method):
    configure(pam_env, pam_env.stack, ["publickey", method], service="jit-delay",
              max_failures=3, lockout="1h", max_failures_per_address=1000)
    user = "alice" if method == "password" else "bob"
    guesses = [f"guess-{i}" for i in range(12)] + [PASSWORDS[user]]
    before = len(pam_env.audit_events())
    ok, tried = asyncio.run(guess_without_waiting(pam_env, user, guesses, method))
    assert not ok
    # every guess PAM checked is audited and counted: the lockout came, the right one failed
    deadline = time.monotonic() + 15
    while not [e for e in pam_env.audit_events()[before:] if e["type"] == "auth.lockout"]:
        assert time.monotonic() < deadline, pam_env.audit_events()[before:][-10:]
        time.sleep(0.1)
    failures = [e for e in pam_env.audit_events()[before:] if e["type"] == "auth.failure"
                and e["actor"] == user and e["why"].startswith("PAM auth")]
    assert len(failures) >= 3
    r = asyncio.run(guess_without_waiting(pam_env, user, [PASSWORDS[user]], method))
    assert r[0] is False
    jit_clear(pam_env, f"user:{user}")


def jit_clear(env: Env, subject: str) -> None:
    from tests.integration.test_operations import jit
    assert jit("lockouts", "clear", subject, "-c", str(env.config_path)).returncode == 0


def test_one_connection_cannot_start_conversations_without_end(pam_env):
    configure(pam_env, pam_env.stack, ["keyboard-interactive"], max_failures=1000)
    pid = pam_env.proc.pid

    def threads() -> int:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("Threads:"):
                return int(line.split()[1])
        raise AssertionError("no thread count")

    before = threads()
    starts = 0

    async def flood():
        nonlocal starts
        holder = {}

        class Client(asyncssh.SSHClient):
            def connection_made(self, conn):
                holder["conn"] = conn

            def kbdint_auth_requested(self):
                return ""

            async def kbdint_challenge_received(self, name, instructions, lang, prompts):
                nonlocal starts
                starts += 1  # never answer: ask for a new conversation instead
                await holder["conn"].send_userauth_request(b"keyboard-interactive", String(""),
                                                           String(""))
                await asyncio.sleep(3600)

        with pytest.raises((asyncssh.DisconnectError, asyncssh.PermissionDenied,
                            ConnectionError)):
            await asyncio.wait_for(asyncssh.create_connection(
                Client, "127.0.0.1", pam_env.port, username="alice", known_hosts=None,
                client_keys=None, agent_path=None, preferred_auth="keyboard-interactive"), 30)

    asyncio.run(flood())
    assert starts <= 7  # ssh.max_auth_tries (6) ends the connection
    assert pam_env.wait_event("auth.failure", lambda e: e.get("why") == "too many attempts")
    deadline = time.monotonic() + 10
    while threads() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threads() <= before  # the abandoned conversations ended with the connection


def test_a_prompt_held_open_across_a_lockout_is_refused(pam_env):
    configure(pam_env, pam_env.stack, ["publickey", "keyboard-interactive"], max_failures=3,
              lockout="1h", max_failures_per_address=1000)
    before = len(pam_env.audit_events())

    async def run():
        answer = asyncio.get_running_loop().create_future()

        class Client(asyncssh.SSHClient):
            def kbdint_auth_requested(self):
                return ""

            async def kbdint_challenge_received(self, name, instructions, lang, prompts):
                if not prompts:
                    return []
                if answer.done():
                    return None
                answer.set_result(None)
                await held.wait()  # the lockout happens while this prompt is open
                return [PASSWORDS["bob"]]

        held = asyncio.Event()
        login = asyncio.ensure_future(asyncssh.create_connection(
            Client, "127.0.0.1", pam_env.port, username="bob", known_hosts=None,
            client_keys=None, agent_path=None, preferred_auth="keyboard-interactive"))
        await asyncio.wait_for(answer, 15)
        for _ in range(3):  # three wrong passwords in other connections lock bob out
            ok, _ = await asyncssh_rounds(pam_env, "bob", ["wrong"])
            assert not ok
        held.set()
        with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError,
                            ConnectionError)):  # refused (and maybe closed: max_auth_tries)
            await asyncio.wait_for(login, 30)

    asyncio.run(run())
    assert pam_env.wait_event("auth.lockout", lambda e: e["subject"] == "user:bob")
    assert not [e for e in pam_env.audit_events()[before:] if e["type"] == "auth.success"
                and e["actor"] == "bob" and e["method"] == "keyboard-interactive"]
    jit_clear(pam_env, "user:bob")


def test_answers_with_nul_bytes_or_too_long_are_refused(pam_env):
    configure(pam_env, pam_env.stack, ["keyboard-interactive"])
    for answer in ("alice\0-pw", "ali\0ce-pw", PASSWORDS["alice"] + "x" * 2000):
        ok, _ = asyncio.run(asyncssh_rounds(pam_env, "alice", [answer]))
        assert not ok


def test_a_hanging_module_gives_its_slot_back(pam_env):
    method = "keyboard-interactive"  # the module hangs before asking: nothing was guessed
    cfg = pam_env.config()
    cfg["auth"].update({"methods": ["publickey", method], "max_failures": 1, "lockout": "1h",
                        "pam": {**pam_env.stack.config("jit-hang"), "timeout": "2s"}})
    pam_env.write_config(cfg)
    pam_env.restart()
    before = len(pam_env.audit_events())
    ok, _ = asyncio.run(asyncssh_rounds(pam_env, "alice", [PASSWORDS["alice"]],
                                        methods=(method,)))
    assert not ok
    event = pam_env.wait_event("auth.failure", lambda e: e["actor"] == "alice" and
                               e["why"] == "PAM did not answer in time")
    assert event["counted"] is False
    # with max_failures 1, a slot still held would throttle her: it does not
    ok, _ = asyncio.run(asyncssh_rounds(pam_env, "alice", [PASSWORDS["alice"]],
                                        methods=(method,)))
    assert not ok
    events = [e for e in pam_env.audit_events()[before:] if e["actor"] == "alice"]
    assert len([e for e in events if e.get("why") == "PAM did not answer in time"]) >= 2
    assert not [e for e in events if e["type"] in ("auth.throttled", "auth.locked")]


def test_a_timeout_after_an_answer_counts_like_a_wrong_answer(pam_env):
    # a wrong answer held up by a fail delay must not become a free guess by outlasting
    # auth.pam.timeout: jit-delay holds a wrong password 2 s, the timeout is 1 s
    cfg = pam_env.config()
    cfg["auth"].update({"methods": ["publickey", "keyboard-interactive", "password"],
                        "max_failures": 2, "lockout": "1h", "max_failures_per_address": 1000,
                        "pam": {**pam_env.stack.config("jit-delay"), "timeout": "1s"}})
    pam_env.write_config(cfg)
    pam_env.restart()
    before = len(pam_env.audit_events())
    for method in ("keyboard-interactive", "password"):
        ok, _ = asyncio.run(asyncssh_rounds(pam_env, "carol", ["wrong"], methods=(method,)))
        assert not ok
    events = [e for e in pam_env.audit_events()[before:] if e["actor"] == "carol"]
    timeouts = [e for e in events if e.get("why") == "PAM did not answer in time"]
    # each answered one counts (a conversation left unanswered times out uncounted)
    assert {e["method"] for e in timeouts if "counted" not in e} == {"keyboard-interactive",
                                                                     "password"}
    assert pam_env.wait_event("auth.lockout", lambda e: e["subject"] == "user:carol")


def test_prompts_held_open_do_not_keep_the_user_out(pam_env):
    configure(pam_env, pam_env.stack, ["keyboard-interactive", "password"], max_failures=3,
              lockout="1h", max_failures_per_address=1000)

    async def run():
        opened = 0

        class Holder(asyncssh.SSHClient):
            def kbdint_auth_requested(self):
                return ""

            async def kbdint_challenge_received(self, name, instructions, lang, prompts):
                nonlocal opened
                opened += 1
                await asyncio.sleep(3600)  # never answers

        holds = [asyncio.ensure_future(asyncssh.create_connection(
            Holder, "127.0.0.1", pam_env.port, username="bob", known_hosts=None,
            client_keys=None, agent_path=None, preferred_auth="keyboard-interactive"))
            for _ in range(6)]
        deadline = time.monotonic() + 15
        while opened < 6:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        ok, _ = await asyncssh_rounds(pam_env, "bob", [PASSWORDS["bob"]], methods=("password",))
        for h in holds:
            h.cancel()
        return ok

    assert asyncio.run(run())

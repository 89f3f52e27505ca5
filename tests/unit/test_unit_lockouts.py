"""AccessService's failed-login counts against a real service (SQLite store, audit log,
ManualClock): which subjects a failure counts against, and that keeping them bounded never wipes
a user's count while its failures are inside the window."""

from __future__ import annotations

from test_unit_commands import host_key, run, service_in  # noqa: F401 - host_key is a fixture

from proxy.runtime.service import FAILURE_SUBJECTS


def test_a_flood_from_many_addresses_keeps_the_users_count(tmp_path, host_key):  # noqa: F811
    """Failures from more addresses than are kept used to push the oldest counts out, a user's
    among them: a guesser could reset it between guesses."""
    async def go():
        async with service_in(tmp_path, host_key) as svc:
            peer = "192.0.2.7:40000"
            for _ in range(4):  # max_failures is 5
                svc.auth_failure("bob", peer, method="password", why="wrong password")
            assert not svc.locked_out("bob", peer)
            for i in range(FAILURE_SUBJECTS + 1):  # failed keys from many addresses
                svc.auth_failure("nobody", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:22",
                                 guessable=False, method="publickey", why="no valid key")
            assert len(svc._failures) <= FAILURE_SUBJECTS
            svc.auth_failure("bob", peer, method="password", why="wrong password")
            return svc.locked_out("bob", "198.51.100.1:1"), svc.locked_out(
                "bob", "198.51.100.1:1", guessable=False)
    assert run(go()) == (True, False)  # bob's passwords are locked out; his key is not


def test_failures_of_keys_and_one_time_secrets_count_only_against_the_address(
        tmp_path, host_key):  # noqa: F811
    async def go():
        async with service_in(tmp_path, host_key) as svc:
            for _ in range(20):  # max_failures_per_address; max_failures is 5
                svc.auth_failure("bob", "192.0.2.7:1", guessable=False, method="publickey",
                                 why="no valid key")
            return (svc.locked_out("bob", "198.51.100.1:1"),
                    svc.locked_out("bob", "192.0.2.7:1", guessable=False),
                    [subject for subject, _ in svc.lockouts()])
    assert run(go()) == (False, True, ["address:192.0.2.7"])


def test_a_password_after_the_key_has_a_count_of_its_own(tmp_path, host_key):  # noqa: F811
    """Others failing bob's password (anywhere: SSH, a PAM PostgreSQL port) lock ``user:bob``
    but not the password step of bob's own chain, which only ``keyholder:bob`` holds back.
    Failures there count against both (a stolen key buys no second round of guesses at the
    user's password), and a login clears both counts."""
    async def go():
        async with service_in(tmp_path, host_key) as svc:
            for i in range(5):  # max_failures, each from another address
                svc.auth_failure("bob", f"192.0.2.{i}:1", method="pam", why="PAM auth")
            seen = [svc.locked_out("bob", "198.51.100.1:1"),
                    svc.locked_out("bob", "198.51.100.1:1", after_key=True),
                    svc.begin_attempt("bob", "198.51.100.1:1"),
                    svc.begin_attempt("bob", "198.51.100.1:1", after_key=True)]
            svc.end_attempt("bob", "198.51.100.1:1", after_key=True)
            for i in range(4):
                svc.auth_failure("carol", f"192.0.2.{i}:1", after_key=True,
                                 method="keyboard-interactive", why="PAM auth")
            svc.auth_succeeded("carol")
            svc.auth_failure("carol", "192.0.2.9:1", after_key=True,
                             method="keyboard-interactive", why="PAM auth")
            seen.append(svc.locked_out("carol", "198.51.100.1:1", after_key=True))
            for i in range(4):  # with the one above, five since the login
                svc.auth_failure("carol", f"192.0.2.{i}:1", after_key=True,
                                 method="keyboard-interactive", why="PAM auth")
            seen += [svc.locked_subjects("carol", "198.51.100.1:1", after_key=True),
                     svc.locked_subjects("carol", "198.51.100.1:1"), svc._in_flight]
            return seen, [subject for subject, _ in svc.lockouts()]
    seen, lockouts = run(go())
    assert seen == [True, False, ("locked out", ["user:bob"]), None, False,
                    ["keyholder:carol"], ["user:carol"], {}]
    assert sorted(lockouts) == ["keyholder:carol", "user:bob", "user:carol"]


def test_the_refusal_says_how_long_the_lockout_has_left(tmp_path, host_key):  # noqa: F811
    async def go():
        async with service_in(tmp_path, host_key) as svc:  # lockout: 15m
            seen = [svc.lockout_text(["user:bob"])]
            for _ in range(5):
                svc.auth_failure("bob", "192.0.2.7:1", method="password", why="PAM auth")
            locked = svc.locked_subjects("bob", "192.0.2.7:1")
            seen.append(svc.lockout_text(locked))
            svc.clock.advance(14 * 60 + 1)
            seen.append(svc.lockout_text(locked))
            svc.clock.advance(60)
            seen.append(svc.lockout_text(locked))
            return locked, seen
    locked, seen = run(go())
    assert locked == ["user:bob"]
    assert seen == ["jit-proxy: too many failed logins; try again later.",
                    "jit-proxy: too many failed logins; try again in 15m.",
                    "jit-proxy: too many failed logins; try again in 1m.",
                    "jit-proxy: too many failed logins; try again later."]

"""The PAM binding (proxy.auth.pam) against real PAM modules through pam_wrapper, and the method
chains (proxy.auth.methods) on their own."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.auth.methods import is_complete, next_methods
from proxy.auth.pam import (Outcome, PamError, PamTransaction, Prompt, authenticate_password,
                            load_library)
from tests.integration.pamstack import ECHO, PASSWORDS, WELCOME, WRAPPER, PamStack, \
    needs_pam_wrapper

# --- method chains -------------------------------------------------------------------------------

CHAINS = ["publickey,keyboard-interactive", "password"]


def test_chains_offer_the_next_method_in_order():
    assert next_methods(CHAINS, []) == {"publickey", "password"}
    assert next_methods(CHAINS, ["publickey"]) == {"keyboard-interactive"}
    assert next_methods(CHAINS, ["publickey", "keyboard-interactive"]) == set()
    assert is_complete(CHAINS, ["publickey", "keyboard-interactive"])
    assert is_complete(CHAINS, ["password"])
    assert not is_complete(CHAINS, ["publickey"])
    assert not is_complete(CHAINS, ["keyboard-interactive"])
    assert next_methods(CHAINS, ["keyboard-interactive"]) == set()  # out of order: nothing


METHODS = st.sampled_from(["publickey", "keyboard-interactive", "password"])


@given(st.lists(st.lists(METHODS, min_size=1, max_size=3, unique=True), min_size=1, max_size=4),
       st.lists(METHODS, max_size=4))
def test_only_whole_chains_in_order_complete(chains, steps):
    configured = [",".join(c) for c in chains]
    completed: list[str] = []
    for step in steps:
        if step not in next_methods(configured, completed):
            break  # the server does not offer it, so it cannot complete
        completed.append(step)
    assert is_complete(configured, completed) == (completed in chains)
    if completed in chains and not any(len(c) > len(completed) and c[:len(completed)] == completed
                                       for c in chains):
        assert next_methods(configured, completed) == set()


# --- the PAM binding -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One service directory for the module: pam_wrapper reads it once, when first used."""
    s = PamStack(tmp_path_factory.mktemp("pam"))
    pam_exec = ECHO.replace("pam_echo.so", "pam_exec.so")
    (s.dir / "slow").write_text(f"auth required {pam_exec} /bin/sleep 3\n"
                                f"account required {pam_exec.replace('exec', 'permit')}\n")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s.environ.items():
            mp.setenv(k, v)
        yield s


async def converse(service: str, user: str, answers: list[str]) -> tuple[list[Prompt], Outcome]:
    tx = PamTransaction(WRAPPER, service, user, "127.0.0.1", answer_timeout=10)
    await tx.start()
    prompts = []
    while True:
        event = await tx.next_event()
        if isinstance(event, Outcome):
            return prompts, event
        prompts.append(event)
        tx.answer(answers.pop(0))


@needs_pam_wrapper
def test_a_conversation_is_relayed_round_by_round(stack):
    prompts, outcome = asyncio.run(converse("jit-otp", "alice", [PASSWORDS["alice"], stack.totp()]))
    assert outcome.ok and outcome.stage == "account", outcome
    assert [(p.prompt, p.echo, [t.text for t in p.texts]) for p in prompts] == [
        ("Password: ", False, [f"{WELCOME}, alice."]),
        ("One-time password (OATH) for `alice': ", False, [])]


@needs_pam_wrapper
def test_wrong_answers_and_locked_accounts_fail_at_their_stage(stack):
    _, outcome = asyncio.run(converse("jit-proxy", "alice", ["nope"]))
    assert not outcome.ok and outcome.stage == "auth" and outcome.reason
    _, outcome = asyncio.run(converse("jit-proxy", "carol", [PASSWORDS["carol"]]))
    assert not outcome.ok and outcome.stage == "account"
    _, outcome = asyncio.run(converse("jit-proxy", "nobody-here", ["x"]))
    assert not outcome.ok


@needs_pam_wrapper
def test_the_password_method_answers_one_prompt_only(stack):
    ok = asyncio.run(authenticate_password(WRAPPER, "jit-proxy", "alice", PASSWORDS["alice"], None))
    assert ok.ok
    # a stack that asks twice (password, then a code) cannot pass with a password alone
    two = asyncio.run(authenticate_password(WRAPPER, "jit-otp", "alice", PASSWORDS["alice"], None))
    assert not two.ok and two.stage == "auth"
    assert [t.text for t in two.texts] == [f"{WELCOME}, alice."]


@needs_pam_wrapper
def test_abort_ends_a_waiting_conversation(stack):
    async def run():
        tx = PamTransaction(WRAPPER, "jit-proxy", "alice", None, answer_timeout=30)
        await tx.start()
        assert isinstance(await tx.next_event(), Prompt)
        tx.abort()
        outcome = await asyncio.wait_for(tx.next_event(), 5)
        await asyncio.to_thread(tx.thread.join, 5)
        return outcome, tx.thread.is_alive()
    outcome, alive = asyncio.run(run())
    assert isinstance(outcome, Outcome) and not outcome.ok and not alive


@needs_pam_wrapper
def test_an_unanswered_prompt_times_out(stack):
    async def run():
        tx = PamTransaction(WRAPPER, "jit-proxy", "alice", None, answer_timeout=0.3)
        await tx.start()
        await tx.next_event()
        return await asyncio.wait_for(tx.next_event(), 5)
    outcome = asyncio.run(run())
    assert not outcome.ok


@needs_pam_wrapper
def test_a_slow_module_delays_only_its_own_login(stack):
    async def run():
        slow = asyncio.create_task(authenticate_password(WRAPPER, "slow", "alice", "x", None))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        ticks = 0
        fast = asyncio.create_task(
            authenticate_password(WRAPPER, "jit-proxy", "alice", PASSWORDS["alice"], None))
        while not fast.done():  # the event loop keeps turning meanwhile
            await asyncio.sleep(0.01)
            ticks += 1
        fast_done = time.monotonic() - started
        assert not slow.done()  # the slow one is still in its module
        return (await fast).ok, fast_done, ticks, await slow
    fast_ok, fast_done, ticks, slow_outcome = asyncio.run(run())
    assert fast_ok and fast_done < 2.5 and ticks > 0
    assert slow_outcome.ok  # it got there, 3 s later


def test_a_library_without_pam_is_refused_clearly():
    with pytest.raises(PamError, match="cannot use"):
        load_library("libc.so.6")
    with pytest.raises(PamError, match="cannot use"):
        load_library(os.devnull)


def test_address_of_a_peer_keeps_an_ipv6_hosts_colons():
    from proxy.auth import address_of
    assert address_of("192.0.2.7:51234") == "192.0.2.7"
    assert address_of("::1:51234") == "::1"
    assert address_of("2001:db8::5:22") == "2001:db8::5"
    assert address_of("unknown") == "unknown"

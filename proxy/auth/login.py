"""PAM logins for the proxy's SSH server and PostgreSQL port: password checks and the
keyboard-interactive conversation, with lockout, user checks and audit.

What it is for: one place that runs a PAM transaction for a login attempt (``auth.pam``), refuses it
while the user or address is locked out, requires the user to be known (in the config, or on the
system with ``auth.identities: system``), and reports every failure to the service (``auth.failure``,
counted towards the lockout). ``KbdIntLogin`` turns PAM's conversation into keyboard-interactive
rounds (RFC 4256): each prompt its own round with PAM's echo flag, PAM's info and error texts as the
round's instruction (shown, never asked), texts after the last prompt in a round without prompts.

What it must not do: log or keep passwords or codes, tell a client which part of a login was wrong
(unknown user, wrong password and locked account fail alike), or block the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from proxy.auth import address_of
from proxy.auth.pam import (PAM_CONV_ERR, Outcome, PamError, PamTransaction, Prompt, Text,
                            authenticate_password, load_library)

log = logging.getLogger("jit_proxy.auth")

KbdIntChallenge = Any  # asyncssh's: (name, instruction, lang, [(prompt, echo)]) or a bool

PAM_METHODS = frozenset({"keyboard-interactive", "password"})  # SSH methods that go through PAM


async def known_user(service: Any, user: str) -> bool:
    """Whether ``user`` may log in at all: named in ``users``, or (``auth.identities: system``) a
    user NSS knows; the latter also refreshes the groups its ``group:`` policies see."""
    if service.config.auth.identities == "system":
        on_system = await service.identities.resolve(user)
        return on_system or user in service.config.users
    return user in service.config.users


def _texts(texts: tuple[Text, ...]) -> str:
    return "\n".join(t.text for t in texts)


async def _finish(service: Any, user: str, peer: str, method: str, outcome: Outcome, *,
                  after_key: bool = False, **fields: Any) -> bool:
    """Record the end of a PAM transaction; True when the login may go on. Failures of the
    system (a PAM module or service missing, a conversation cut short before an answer) are
    audited and logged but not held against the user's lockout count. A success is refused when
    the user or address got locked out meanwhile, or PAM ended with another user name.
    ``after_key``: the PAM step of a chain, after the user's key (see
    ``AccessService._lockout_keys``)."""
    why, count = None, True
    if not outcome.ok:
        why, count = f"PAM {outcome.stage}: {outcome.reason}"[:300], outcome.users_fault
        if not count and outcome.code != PAM_CONV_ERR:
            log.error("PAM failed for %s (%s), not the user's fault: %s", user[:64], method, why)
    elif locked := service.locked_subjects(user, peer, after_key=after_key):
        service.audit_unauthenticated("auth.locked", user, peer, method=method, subjects=locked,
                                      **fields)
        return False
    elif outcome.user is not None and outcome.user != user:
        why = f"PAM ended as user {outcome.user[:64]!r}"
    elif not await known_user(service, user):
        why = "unknown user"
    if why is not None:
        service.auth_failure(user, peer, method=method, why=why, count=count,
                             after_key=after_key, **fields)
        return False
    return True


TIMED_OUT = "PAM did not answer in time"


def _unusable(service: Any, user: str, peer: str, method: str, why: str, count: bool = False,
              after_key: bool = False, **fields: Any) -> bool:
    """PAM could not give a verdict (library or thread unusable, ``auth.pam.timeout``): logged
    for the operator and audited as a failure, counted only when ``count``. Returns False."""
    log.error("PAM unusable for %s (%s): %s", user[:64], method, why)
    service.auth_failure(user, peer, method=method, why=why[:300], count=count,
                         after_key=after_key, **fields)
    return False


def _pam_time_limit(service: Any) -> float:
    """Seconds one PAM transaction may take in all before it is given up (``auth.pam.timeout``:
    a module hanging on a directory that does not answer). Its thread cannot be stopped, but
    its slot (``begin_attempt``) is given back."""
    return float(service.config.auth.pam.timeout)


def _refused(service: Any, user: str, peer: str, method: str, after_key: bool = False,
             **fields: Any) -> bool:
    """Reserve a PAM check (``begin_attempt``); True, audited, when it may not run now."""
    refused = service.begin_attempt(user, peer, after_key)
    if refused is None:
        return False
    why, subjects = refused
    event = "auth.locked" if why == "locked out" else "auth.throttled"
    service.audit_unauthenticated(event, user, peer, method=method, why=why, subjects=subjects,
                                  **fields)
    return True


def pam_needed(config: Any) -> bool:
    """Whether ``config`` uses PAM: a PAM method in ``auth.methods`` or a ``client_auth: pam``
    target."""
    return (any(PAM_METHODS.intersection(chain.split(",")) for chain in config.auth.methods)
            or any(getattr(t, "client_auth", None) == "pam" for t in config.targets.values()))


def pam_problems(config: Any) -> list[tuple[str, str]]:
    """``(key, problem)`` for PAM settings that cannot work on this machine: the library does
    not load, or a service has no file where Linux-PAM (or pam_wrapper) would look for it."""
    if not pam_needed(config):
        return []
    try:
        load_library(config.auth.pam.library)
    except PamError as exc:
        return [("auth.pam.library", str(exc))]
    dirs = [Path("/etc/pam.d"), Path("/usr/lib/pam.d"), Path("/usr/share/pam.d")]
    if os.environ.get("PAM_WRAPPER") == "1" and os.environ.get("PAM_WRAPPER_SERVICE_DIR"):
        dirs = [Path(os.environ["PAM_WRAPPER_SERVICE_DIR"])]
    services = {("auth.pam.service", config.auth.pam.service)}
    services |= {(f"targets.{name}.pam_service", t.pam_service)
                 for name, t in config.targets.items() if getattr(t, "pam_service", None)}
    return [(key, f"no PAM service file {name!r} in {', '.join(map(str, dirs))} (Linux-PAM "
                  f"would use its 'other' service)")
            for key, name in sorted(services) if not any((d / name).is_file() for d in dirs)]


async def password_login(service: Any, user: str, password: str, peer: str, method: str,
                         pam_service: str | None = None, after_key: bool = False,
                         **fields: Any) -> bool:
    """Check ``password`` for ``user`` through PAM (authentication and account phases), with
    ``pam_service`` or else ``auth.pam.service``. ``method`` names the method in the audit
    (``password``, ``pam`` on the PostgreSQL port). Refused while locked out; every refusal is
    audited. The check runs to its verdict (audit, lockout count) even if the caller is
    cancelled, e.g. by a client that sends its next request without waiting. ``after_key``:
    the password step of a chain, after the user's key; it has a lockout count of its own
    (``keyholder:NAME``, see ``AccessService._lockout_keys``)."""
    if _refused(service, user, peer, method, after_key, **fields):
        return False
    pam = service.config.auth.pam

    async def check() -> bool:
        try:
            outcome = await asyncio.wait_for(
                authenticate_password(pam.library, pam_service or pam.service, user, password,
                                      address_of(peer)), _pam_time_limit(service))
            return await _finish(service, user, peer, method, outcome, after_key=after_key,
                                 **fields)
        except PamError as exc:
            return _unusable(service, user, peer, method, str(exc), after_key=after_key,
                             **fields)
        except asyncio.TimeoutError:  # counted: a fail delay may be holding up a wrong one
            return _unusable(service, user, peer, method, TIMED_OUT, count=True,
                             after_key=after_key, **fields)
        finally:
            service.end_attempt(user, peer, after_key)

    return await asyncio.shield(service.spawn(check(), drain=False))


class KbdIntLogin:
    """One keyboard-interactive login through PAM, for ``get_kbdint_challenge`` and
    ``validate_kbdint_response`` of an asyncssh server. A conversation that is only open holds
    nothing; the first answer reserves a check (``begin_attempt``), and from then on the
    verdict (audit, lockout count) is reached in a task of its own, so a client that walks away
    or starts over mid-conversation cannot skip it. ``close()`` ends a transaction in progress.
    ``after_key``: the conversation is the PAM step of a chain, after the user's key (its own
    lockout count, see ``AccessService._lockout_keys``)."""

    METHOD = "keyboard-interactive"

    def __init__(self, service: Any, user: str, peer: str, answer_timeout: float,
                 after_key: bool = False):
        self.service, self.user, self.peer = service, user, peer
        self.after_key = after_key
        self.answer_timeout = answer_timeout
        self.tx: PamTransaction | None = None
        self.verdict: asyncio.Task | None = None
        self.answered = False  # an answer reached PAM: the check is reserved and will count
        self._result: bool | None = None  # known once PAM ended, shown after a last text round

    async def challenge(self) -> KbdIntChallenge:
        """The first round (or False when the login cannot start)."""
        self.close()
        self._result = None
        if locked := self.service.locked_subjects(self.user, self.peer,
                                                  after_key=self.after_key):
            self.service.audit_unauthenticated("auth.locked", self.user, self.peer,
                                               method=self.METHOD, subjects=locked)
            self._result = False
            return ("", self.service.lockout_text(locked), "", [])
        pam = self.service.config.auth.pam
        tx = PamTransaction(pam.library, pam.service, self.user, address_of(self.peer),
                            answer_timeout=self.answer_timeout)
        try:
            await tx.start()
        except PamError as exc:
            return _unusable(self.service, self.user, self.peer, self.METHOD, str(exc),
                             after_key=self.after_key)
        self.tx, self.answered = tx, False
        self.verdict = self.service.spawn(self._decide(tx), drain=False)
        return await self._next()

    async def _decide(self, tx: PamTransaction) -> bool:
        """The verdict: audited and counted once PAM ends (or ``auth.pam.timeout`` passed; a
        timeout after an answer counts like a wrong answer, since a wrong one may be what a
        fail delay is holding up)."""
        try:
            assert tx.outcome is not None
            try:
                outcome = await asyncio.wait_for(asyncio.shield(tx.outcome),
                                                 _pam_time_limit(self.service))
            except asyncio.TimeoutError:
                tx.abort()
                return _unusable(self.service, self.user, self.peer, self.METHOD, TIMED_OUT,
                                 count=self.answered, after_key=self.after_key)
            return await _finish(self.service, self.user, self.peer, self.METHOD, outcome,
                                 after_key=self.after_key)
        finally:
            if self.answered:
                self.service.end_attempt(self.user, self.peer, self.after_key)

    async def respond(self, responses: list[str]) -> KbdIntChallenge:
        """The next round after the client's answers to the last one, or True/False at the end."""
        if self.tx is None:  # after a round that only showed text: PAM had already ended
            result, self._result = bool(self._result), None
            return result
        if self.verdict is not None and self.verdict.done():  # given up (auth.pam.timeout)
            self.close()  # before this answer came: it reserves no check (nothing would end it)
            return await asyncio.shield(self.verdict)
        if len(responses) != 1:  # each round asks one question
            self.tx.abort()
        elif not self.answered and _refused(self.service, self.user, self.peer, self.METHOD,
                                            self.after_key):
            self.tx.abort()  # locked out, or as many checks running as failures remain
        elif self.service.locked_out(self.user, self.peer, after_key=self.after_key):
            self.tx.abort()  # locked out since the last round
        else:
            self.answered = True
            self.tx.answer(responses[0])
        return await self._next()

    async def _next(self) -> KbdIntChallenge:
        assert self.tx is not None and self.verdict is not None
        get = asyncio.ensure_future(self.tx.next_event())
        try:
            await asyncio.wait({get, self.verdict}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not get.done():
                get.cancel()
        if not get.done() or get.cancelled():  # given up (auth.pam.timeout) before PAM ended
            self.close()
            return await asyncio.shield(self.verdict)
        event = get.result()
        if isinstance(event, Prompt):
            return ("", _texts(event.texts), "", [(event.prompt, event.echo)])
        self.tx = None
        ok = await asyncio.shield(self.verdict)
        if event.texts:  # show what PAM said last, in a round without questions
            self._result = ok
            return ("", _texts(event.texts), "", [])
        return ok

    def close(self) -> None:
        """End the conversation in progress, if any (its verdict task still runs to its end)."""
        if self.tx is not None:
            self.tx.abort()
            self.tx = None

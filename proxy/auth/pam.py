"""Linux-PAM through a small ctypes binding of libpam's conversation API, relayed to asyncio.

What it is for: running one PAM transaction (``pam_start``, ``pam_authenticate``, ``pam_acct_mgmt``,
``pam_end``) per login attempt in a thread of its own, and handing each conversation message to the
event loop as it comes: text (``PAM_TEXT_INFO``, ``PAM_ERROR_MSG``) to show, and each prompt
(``PAM_PROMPT_ECHO_OFF``/``ON``) as its own round that waits for the user's answer. A slow PAM module
or a user slow to type holds only that thread, never the event loop or another login. The library
path is configurable (tests load pam_wrapper's ``libpam_wrapper.so`` as the PAM library, since
calling ``libpam.so.0`` through ctypes would bypass an ``LD_PRELOAD``-ed wrapper).

Why not python-pam: it answers every prompt with the one password it was given and cannot relay a
multi-round conversation (a password, then a one-time code), which is what keyboard-interactive
needs.

Spec: the Linux-PAM Application Developers' Guide, pam_start(3), pam_conv(3), pam_authenticate(3),
pam_acct_mgmt(3), pam_get_item(3).

What it must not do: log or keep answers (passwords, codes) beyond handing them to PAM, block the
event loop, or leave a PAM thread waiting forever (every wait is bounded; ``abort`` ends it).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import queue
import threading
from dataclasses import dataclass, field

# <security/_pam_types.h>
PAM_SUCCESS = 0
PAM_PERM_DENIED = 6
PAM_AUTH_ERR = 7
PAM_CRED_INSUFFICIENT = 8
PAM_USER_UNKNOWN = 10
PAM_MAXTRIES = 11
PAM_NEW_AUTHTOK_REQD = 12
PAM_ACCT_EXPIRED = 13
PAM_CONV_ERR = 19
PAM_BUF_ERR = 5
# what a user got wrong (counted towards the lockout); any other failure is the system's
USER_ERRORS = frozenset({PAM_PERM_DENIED, PAM_AUTH_ERR, PAM_CRED_INSUFFICIENT, PAM_USER_UNKNOWN,
                         PAM_MAXTRIES, PAM_NEW_AUTHTOK_REQD, PAM_ACCT_EXPIRED})
PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON, PAM_ERROR_MSG, PAM_TEXT_INFO = 1, 2, 3, 4
PAM_USER, PAM_RHOST, PAM_RUSER = 2, 4, 8
PAM_SILENT = 0x8000
PAM_DISALLOW_NULL_AUTHTOK = 0x0001

MAX_MESSAGES = 32          # messages in one conversation call (Linux-PAM's PAM_MAX_NUM_MSG)
MAX_TEXT = 4096            # bytes of one message shown to the user (longer ones are cut)
MAX_ANSWER = 1024          # bytes of one answer handed to PAM


class PamMessage(ctypes.Structure):
    """``struct pam_message`` (<security/_pam_types.h>, pam_conv(3))."""
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class PamResponse(ctypes.Structure):
    """``struct pam_response``: ``resp`` is malloc(3)ed by us and freed by PAM."""
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]


CONV_FUNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int,
                             ctypes.POINTER(ctypes.POINTER(PamMessage)),
                             ctypes.POINTER(ctypes.POINTER(PamResponse)), ctypes.c_void_p)


class PamConv(ctypes.Structure):
    """``struct pam_conv``: the conversation function handed to pam_start(3)."""
    _fields_ = [("conv", CONV_FUNC), ("appdata_ptr", ctypes.c_void_p)]


class PamError(Exception):
    """The PAM library could not be loaded or lacks the conversation API."""


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.calloc.restype = ctypes.c_void_p
_libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_libc.strdup.restype = ctypes.c_void_p
_libc.strdup.argtypes = [ctypes.c_char_p]
_libc.free.argtypes = [ctypes.c_void_p]

_libraries: dict[str, ctypes.CDLL] = {}
_load_lock = threading.Lock()


def load_library(path: str) -> ctypes.CDLL:
    """The PAM library at ``path`` (a file name such as ``libpam.so.0`` or an absolute path),
    loaded once. Raises ``PamError`` when it cannot be loaded or lacks a PAM function."""
    with _load_lock:
        lib = _libraries.get(path)
        if lib is not None:
            return lib
        try:
            lib = ctypes.CDLL(path)
            for name in ("pam_start", "pam_authenticate", "pam_acct_mgmt", "pam_end",
                         "pam_set_item", "pam_get_item", "pam_strerror"):
                getattr(lib, name)
        except (OSError, AttributeError) as exc:
            raise PamError(f"cannot use {path!r} as the PAM library: {exc}") from None
        lib.pam_start.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(PamConv),
                                  ctypes.POINTER(ctypes.c_void_p)]
        lib.pam_start.restype = ctypes.c_int
        lib.pam_get_item.argtypes = [ctypes.c_void_p, ctypes.c_int,
                                     ctypes.POINTER(ctypes.c_void_p)]
        lib.pam_get_item.restype = ctypes.c_int
        for name in ("pam_authenticate", "pam_acct_mgmt"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int]
            getattr(lib, name).restype = ctypes.c_int
        lib.pam_end.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.pam_end.restype = ctypes.c_int
        lib.pam_set_item.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        lib.pam_set_item.restype = ctypes.c_int
        lib.pam_strerror.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.pam_strerror.restype = ctypes.c_char_p
        _libraries[path] = lib
        return lib


@dataclass(frozen=True)
class Text:
    """A message PAM wants shown, never answered: ``error`` for PAM_ERROR_MSG."""
    text: str
    error: bool = False


@dataclass(frozen=True)
class Prompt:
    """One question, with the texts PAM sent before it in the same transaction; ``echo`` is
    False for PAM_PROMPT_ECHO_OFF (a password) and True for PAM_PROMPT_ECHO_ON."""
    prompt: str
    echo: bool
    texts: tuple[Text, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """The end of the transaction. ``ok`` only when both authentication and account management
    returned PAM_SUCCESS; ``stage`` is ``auth`` or ``account`` (where it stopped); ``texts`` are
    messages PAM sent after its last prompt."""
    ok: bool
    stage: str
    code: int
    reason: str
    texts: tuple[Text, ...] = field(default=())
    user: str | None = None  # PAM_USER at the end: a module may have mapped the name

    @property
    def users_fault(self) -> bool:
        """Whether the failure is the user's (wrong password or code, locked or expired account)
        rather than the system's (no such service, a module missing, a conversation we could
        not hold)."""
        return not self.ok and self.code in USER_ERRORS


def _decode(raw: bytes | None) -> str:
    return (raw or b"")[:MAX_TEXT].decode("utf-8", "replace")


class PamTransaction:
    """One PAM login attempt for ``user`` of ``service``, run in its own daemon thread.

    Use from the event loop: ``await start()``, then ``await next_event()`` repeatedly; answer each
    ``Prompt`` with ``answer(text)`` (or ``abort()``); the last event is an ``Outcome``. ``abort()``
    may be called at any time (e.g. the connection went away): the PAM thread's pending and future
    prompts get PAM_CONV_ERR and the transaction ends. ``answer_timeout`` (seconds) bounds each
    wait for an answer. Raises ``PamError`` from ``start`` when the library cannot be loaded.
    """

    def __init__(self, library: str, service: str, user: str, rhost: str | None,
                 answer_timeout: float = 300.0, account: bool = True):
        self.library, self.service, self.user, self.rhost = library, service, user, rhost
        self.answer_timeout, self.account = answer_timeout, account
        self._events: asyncio.Queue[Prompt | Outcome] = asyncio.Queue()
        self.outcome: asyncio.Future[Outcome] | None = None  # set once PAM has ended
        self._answers: queue.Queue[str | None] = queue.Queue(maxsize=1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aborted = threading.Event()
        self._texts: list[Text] = []
        self.thread: threading.Thread | None = None

    async def start(self) -> None:
        """Load the library and start the PAM thread (pam_start, pam_authenticate,
        pam_acct_mgmt, pam_end). Raises ``PamError`` (library unusable, no thread to be had)."""
        lib = load_library(self.library)
        self._loop = asyncio.get_running_loop()
        self.outcome = self._loop.create_future()
        self.thread = threading.Thread(target=self._run, args=(lib,), daemon=True,
                                       name=f"pam:{self.user[:32]}")
        try:
            self.thread.start()
        except RuntimeError as exc:  # no thread to be had (a thread limit): a system failure
            raise PamError(f"cannot start a PAM thread: {exc}") from None

    async def next_event(self) -> Prompt | Outcome:
        """The next ``Prompt`` to answer, or the ``Outcome`` (always the last event)."""
        return await self._events.get()

    def answer(self, text: str) -> None:
        """Hand the user's answer to the waiting prompt. An answer longer than ``MAX_ANSWER``
        bytes or holding a NUL byte ends the conversation instead (cut short, PAM would check
        something else than what was sent)."""
        if "\0" in text or len(text.encode("utf-8", "replace")) > MAX_ANSWER:
            self.abort()
            return
        try:
            self._answers.put_nowait(text)
        except queue.Full:
            pass

    def abort(self) -> None:
        """End the conversation: every waiting or later prompt fails with PAM_CONV_ERR."""
        self._aborted.set()
        try:
            self._answers.put_nowait(None)
        except queue.Full:
            pass

    # --- the PAM thread --------------------------------------------------------------------------

    def _deliver(self, event: Prompt | Outcome) -> None:  # on the event loop
        self._events.put_nowait(event)
        if isinstance(event, Outcome) and self.outcome is not None and not self.outcome.done():
            self.outcome.set_result(event)

    def _post(self, event: Prompt | Outcome) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._aborted.set()

    def _ask(self, prompt: Prompt) -> str | None:
        if self._aborted.is_set():
            return None
        self._post(prompt)
        try:
            got = self._answers.get(timeout=self.answer_timeout)
        except queue.Empty:
            self._aborted.set()
            return None
        return None if self._aborted.is_set() else got

    def _converse(self, num_msg: int, msgs, resp_out, _appdata) -> int:
        try:
            if num_msg <= 0 or num_msg > MAX_MESSAGES:
                return PAM_CONV_ERR
            answers: list[str | None] = []
            for i in range(num_msg):
                msg = msgs[i].contents
                style, text = msg.msg_style, _decode(msg.msg)
                if style in (PAM_TEXT_INFO, PAM_ERROR_MSG):
                    self._texts.append(Text(text, error=style == PAM_ERROR_MSG))
                    answers.append(None)
                elif style in (PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON):
                    texts, self._texts = tuple(self._texts), []
                    got = self._ask(Prompt(text, style == PAM_PROMPT_ECHO_ON, texts))
                    if got is None:
                        return PAM_CONV_ERR
                    answers.append(got)
                else:  # binary prompts and anything unknown: not something we can relay
                    return PAM_CONV_ERR
            array = _libc.calloc(num_msg, ctypes.sizeof(PamResponse))
            if not array:
                return PAM_BUF_ERR
            responses = ctypes.cast(array, ctypes.POINTER(PamResponse))
            for i, got in enumerate(answers):
                if got is not None:
                    raw = got.encode("utf-8", "replace")[:MAX_ANSWER]
                    responses[i].resp = _libc.strdup(raw)
            resp_out[0] = responses
            return PAM_SUCCESS
        except Exception:  # never let an exception cross the C boundary
            return PAM_CONV_ERR

    def _run(self, lib: ctypes.CDLL) -> None:
        handle = ctypes.c_void_p()
        conv_func = CONV_FUNC(self._converse)  # referenced until pam_end below
        conv = PamConv(conv_func, None)
        code = lib.pam_start(self.service.encode(), self.user.encode("utf-8"),
                             ctypes.byref(conv), ctypes.byref(handle))
        stage = "start"
        try:
            if code == PAM_SUCCESS and self.rhost:
                lib.pam_set_item(handle, PAM_RHOST,
                                 ctypes.cast(ctypes.c_char_p(self.rhost.encode()), ctypes.c_void_p))
            if code == PAM_SUCCESS:
                stage = "auth"
                code = lib.pam_authenticate(handle, PAM_DISALLOW_NULL_AUTHTOK)
            if code == PAM_SUCCESS and self.account:
                stage = "account"
                code = lib.pam_acct_mgmt(handle, PAM_DISALLOW_NULL_AUTHTOK)
            pam_user = None
            if code == PAM_SUCCESS:
                item = ctypes.c_void_p()
                if lib.pam_get_item(handle, PAM_USER, ctypes.byref(item)) == PAM_SUCCESS \
                        and item.value:
                    pam_user = _decode(ctypes.string_at(item.value))
            reason = "" if code == PAM_SUCCESS else _decode(lib.pam_strerror(handle, code))
            if stage == "start":
                reason = f"cannot start PAM service {self.service!r}: {reason}"
            if code == PAM_NEW_AUTHTOK_REQD:
                reason = "password expired (change it where the account is managed)"
        finally:
            if handle:
                lib.pam_end(handle, code)
        texts, self._texts = tuple(self._texts), []
        self._post(Outcome(code == PAM_SUCCESS, stage, code, reason, texts, pam_user))


async def authenticate_password(library: str, service: str, user: str, password: str,
                                rhost: str | None) -> Outcome:
    """One PAM transaction that answers PAM's first echo-off prompt with ``password`` and fails
    any further prompt (as sshd's password method does). Texts PAM sends are returned, not shown.
    Raises ``PamError`` when the library cannot be loaded."""
    tx = PamTransaction(library, service, user, rhost, answer_timeout=60.0)
    await tx.start()
    used = False
    asked_more = None
    texts: list[Text] = []
    while True:
        event = await tx.next_event()
        if isinstance(event, Outcome):
            reason = event.reason
            if asked_more is not None and not event.ok:
                reason = (f"service {service!r} asked {asked_more!r} after the password; a "
                          f"password login answers one question only (use keyboard-interactive "
                          f"or a password-only PAM service)")
            return Outcome(event.ok, event.stage, event.code, reason, tuple(texts) + event.texts,
                           event.user)
        texts.extend(event.texts)
        if event.echo or used:
            asked_more = event.prompt[:80]
            tx.abort()
        else:
            used = True
            tx.answer(password)


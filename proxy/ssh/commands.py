"""The command shell answered by the proxy's SSH server: ``ssh jit-proxy COMMAND [ARGS]``.

What it is for: parsing a command line (shell words, then argparse), running it against the
``AccessService`` as the authenticated user, and rendering the answer as text or ``--json``.
What it must not do: exit the process (argparse errors become exit status 2 with usage text), or
decide anything itself: every rule lives in ``proxy.access``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
from dataclasses import asdict, dataclass
from typing import Any

from proxy.access import policy
from proxy.access.duration import format_duration, parse_duration
from proxy.clock import rfc3339
from proxy.access.model import AccessRequest, first_use_window
from proxy.runtime.service import AccessError, AccessService, ApprovalProgress

MAX_COMMAND_LINE = 16384  # characters

HELP = """\
jit-proxy: just-in-time access. Commands (each takes --json):
  request TARGET --login LOGIN --for DURATION --reason TEXT   ask for SSH access (--for 30m)
  request TARGET --role ROLE --for DURATION --reason TEXT     ask for database access
  requests [--pending] [--watch]     requests you made or may decide (--watch: then new ones)
  approve ID [--comment TEXT]        approve a request (approvers)
  deny ID --reason TEXT              deny a request (approvers)
  cancel ID                          withdraw your own pending request
  grants [--all]                     active grants (--all: ended ones too)
  revoke GRANT_ID                    end a grant now (its user or an approver)
  extend GRANT_ID --for DURATION [--reason TEXT]
                                     more time on your grant (approved like a request,
                                     unless the policy allows self-extension)
  sessions                           live sessions through the proxy
  targets                            what you may request
  whoami                             who the proxy thinks you are
  recordings list|play ID|export ID  recorded sessions of the policies you approve for
                                     (list: --user U --target T --since 2h; play: --speed 4;
                                     pauses longer than 2 s are shortened)
  db-login TARGET [--role ROLE] [--uri]
                                     a one-time secret (single use; a newer one replaces it)
                                     and the psql command for a database grant
  ca [--pg]                          lines that make clients and targets trust the proxy's CA
                                     (--pg: the CA certificate for psql's sslrootcert)
  help                               this text
Then connect with:  ssh -J jit-proxy LOGIN@TARGET
"""


@dataclass
class Result:
    status: int
    out: str = ""
    err: str = ""
    stream: list[tuple[float, str]] | None = None  # (delay seconds, text) to play after ``out``
    follow: Any = None  # an async iterator of text to send until the client goes away


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any):
        # no abbreviations: --fo would be --for, and pass the check for options given twice
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str):  # never exit the daemon
        raise _UsageError(f"{self.prog}: {message}\n{self.format_usage()}")

    def exit(self, status: int = 0, message: str | None = None):
        raise _UsageError(message or "")


def _id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"no such id: {text}")
    return value


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.1 <= value <= 1000:
        raise argparse.ArgumentTypeError("--speed takes a factor from 0.1 to 1000")
    return value


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> _Parser:
    p = _Parser(prog="ssh jit-proxy", add_help=False)  # (how users type it)
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def cmd(name: str, **kw: Any) -> _Parser:
        c = sub.add_parser(name, add_help=False, **kw)
        c.add_argument("--json", action="store_true")
        return c

    c = cmd("request")
    c.add_argument("target")
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument("--login", help="account on an SSH target")
    who.add_argument("--role", dest="login", metavar="ROLE",
                     help="role name on a PostgreSQL target")
    c.add_argument("--for", dest="duration", required=True, type=_duration)
    c.add_argument("--reason", required=True)
    c = cmd("requests")
    c.add_argument("--pending", action="store_true")
    c.add_argument("--watch", action="store_true",
                   help="then keep printing new pending requests you may decide")
    c = cmd("approve")
    c.add_argument("id", type=_id)
    c.add_argument("--comment")
    c = cmd("deny")
    c.add_argument("id", type=_id)
    c.add_argument("--reason", required=True)
    cmd("cancel").add_argument("id", type=_id)
    cmd("grants").add_argument("--all", action="store_true")
    cmd("revoke").add_argument("grant_id", type=_id)
    c = cmd("extend")
    c.add_argument("grant_id", type=_id)
    c.add_argument("--for", dest="duration", required=True, type=_duration)
    c.add_argument("--reason", default="extension")
    c = cmd("db-login")
    c.add_argument("target")
    c.add_argument("--role", help="which of your grants on TARGET, when you hold several")
    c.add_argument("--uri", action="store_true", help="print only the libpq URI")
    cmd("ca").add_argument("--pg", action="store_true",
                           help="print the CA certificate for PostgreSQL clients (sslrootcert)")
    c = cmd("recordings")
    c.add_argument("action", choices=["list", "play", "export"])
    c.add_argument("id", nargs="?", type=_id, help="session id (play, export)")
    c.add_argument("--user")
    c.add_argument("--target")
    c.add_argument("--since", help="a duration (2h) or a time (2026-11-29T08:00:00Z)")
    c.add_argument("--speed", type=_speed, default=1.0)
    for name in ("sessions", "targets", "whoami", "help"):
        cmd(name)
    return p


PARSER = _parser()


def _status(cfg: Any, g: Any) -> str:
    """A grant's status as listed: ``disallowed`` for an active grant the configuration no
    longer allows (it opens no new session since a reload)."""
    if g.status.value == "active" and not policy.grant_allowed(cfg, g):
        return "disallowed"
    return g.status.value


def _t(ts: float | None) -> str | None:
    return rfc3339(ts) if ts is not None else None


def _request_dict(r: Any) -> dict[str, Any]:
    d = asdict(r)
    d["status"] = r.status.value
    d["created_at"], d["decided_at"] = _t(r.created_at), _t(r.decided_at)
    return d


def _grant_dict(g: Any) -> dict[str, Any]:
    d = asdict(g)
    d["status"] = g.status.value
    for k in ("starts_at", "ends_at", "ended_at"):
        d[k] = _t(d[k])
    return d


def _until(g: Any) -> str:
    """How long ``g`` gives access: "until T", or for a first-use grant not started yet, its
    window and the deadline to start it (its ends_at until then)."""
    if g.awaiting_first_use:
        return f"for {first_use_window(g.duration or 0, rfc3339(g.ends_at))}"
    return f"until {rfc3339(g.ends_at)}"


def printable(text: object) -> str:
    """``text`` with every control or invisible character shown as ``\\xNN``/``\\uNNNN``, so
    that nothing a user typed (a command line, an old reason) can move an approver's cursor."""
    import unicodedata
    out = []
    for c in str(text):
        if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


def _table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return "(none)\n"
    rows = [[printable(x) for x in row] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines) + "\n"


_FREE_TEXT = re.compile(r"(?:^|\s)(--reason|--comment)(?:\s+|=)(.*?)(?=\s--[a-z][a-z-]*(?:\s|=|$)|$)",
                        re.S)


def split_command_line(line: str) -> list[str]:
    """Split a command line as ssh delivers it (the client's words joined by spaces, quotes lost
    unless doubled). ``--reason``/``--comment`` take the raw text up to the next option, without
    one level of surrounding quotes, so apostrophes and quotes inside them survive; the rest is
    split with shell rules (plain whitespace when the quoting is unbalanced)."""
    texts: list[tuple[str, str]] = []

    def hold(m: re.Match) -> str:
        value = m.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        texts.append((m.group(1), value))
        return f" {m.group(1)} \0{len(texts) - 1}\0"

    rest = _FREE_TEXT.sub(hold, line)
    try:
        words = shlex.split(rest)
    except ValueError:  # unbalanced quotes outside free text
        words = rest.split()
    out = []
    for w in words:
        m = re.fullmatch(r"\0(\d+)\0", w)
        out.append(texts[int(m.group(1))][1] if m else w)
    return out


async def run_command(service: AccessService, actor: str, command_line: str) -> Result:
    """Run one command line for ``actor``; never raises for user mistakes.

    Returns:
        ``Result(status, out, err)``: 0 on success, 1 when refused, 2 on a usage error.
    """
    if "\0" in command_line or len(command_line) > MAX_COMMAND_LINE:
        return Result(2, err=f"jit-proxy: command lines are text of at most {MAX_COMMAND_LINE} "
                             f"characters\n")
    argv = split_command_line(command_line)
    if not argv:
        return Result(0, out=HELP)
    if argv[0] in ("-h", "--help"):
        argv = ["help"]
    try:
        options = [w.split("=", 1)[0] for w in argv[1:] if w.startswith("--")]
        twice = next((o for i, o in enumerate(options) if o in options[:i]), None)
        if twice is not None:  # e.g. --reason "fix --for 4h": ssh joined the words, so the
            # reason ended at --for and the later --for would silently win
            raise _UsageError(f"jit-proxy {argv[0]}: {twice} is given twice (ssh joins the "
                              f"words of a command; a --reason or --comment ends where an "
                              f"option starts, so its text cannot hold one)")
        args = PARSER.parse_args(argv)
    except _UsageError as exc:
        service.audit.emit("command.refused", actor, command=argv[0], why="usage error")
        return Result(2, err=f"{exc}\nTry 'ssh jit-proxy help'.\n")
    if args.command is None:
        return Result(2, err=HELP)
    try:
        data, text = await _dispatch(service, actor, args)
    except AccessError as exc:
        if args.json:
            return Result(1, out=json.dumps({"error": str(exc)}) + "\n")
        return Result(1, err=f"jit-proxy: {exc}\n")
    if args.json:
        return Result(0, out=json.dumps(data, indent=2) + "\n")
    if isinstance(text, list):  # a recording to play
        return Result(0, stream=text)
    if getattr(args, "watch", False):
        return Result(0, out=text, follow=_watch(service, actor))
    return Result(0, out=text)


async def _dispatch(service: AccessService, actor: str, args: argparse.Namespace
                    ) -> tuple[Any, str]:
    cfg = service.config
    if args.command == "help":
        return {"help": HELP}, HELP
    if args.command == "request":
        r = await service.request(actor, args.target, args.login, args.duration, args.reason)
        if r.status.value == "approved":
            return _request_dict(r), (
                f"request {r.id} approved by policy {r.policy}: {r.login}@{r.target} for "
                f"{format_duration(r.duration)}; connect now\n")
        return _request_dict(r), (
            f"request {r.id} created: {r.login}@{r.target} for {format_duration(r.duration)} "
            f"(policy {r.policy}); waiting for approval.\n")
    if args.command == "requests":
        reqs = await service.list_requests(actor, args.pending)
        rows = [[str(r.id), r.status.value, r.requester, f"{r.login}@{r.target}",
                 format_duration(r.duration), rfc3339(r.created_at),
                 (f"[extends grant {r.extends_grant}] " if r.extends_grant else "") + r.reason
                 + (f" [{r.status.value} by {r.decided_by}: {r.decision_comment}]"
                    if r.decision_comment and r.decided_by else "")]
                for r in reqs]
        return [_request_dict(r) for r in reqs], _table(
            rows, ["ID", "STATUS", "REQUESTER", "ACCESS", "FOR", "CREATED", "REASON"])
    if args.command == "approve":
        g = await service.approve(actor, args.id, args.comment)
        if isinstance(g, ApprovalProgress):
            return ({"request": g.request_id, "approvals": g.approvals, "needed": g.needed},
                    f"request {g.request_id}: approval {g.approvals} of {g.needed} recorded; "
                    f"it needs another approver\n")
        return _grant_dict(g), (f"request {args.id} approved: grant {g.id} gives {g.user} "
                                f"{g.login}@{g.target} {_until(g)}\n")
    if args.command == "deny":
        r = await service.deny(actor, args.id, args.reason)
        return _request_dict(r), f"request {r.id} denied\n"
    if args.command == "cancel":
        r = await service.cancel(actor, args.id)
        return _request_dict(r), f"request {r.id} cancelled\n"
    if args.command == "grants":
        grants = await service.list_grants(actor, not args.all)
        rows = [[str(g.id), _status(cfg, g), g.user, f"{g.login}@{g.target}",
                 rfc3339(g.ended_at) if g.ended_at is not None else
                 first_use_window(g.duration or 0, rfc3339(g.ends_at)) if g.awaiting_first_use
                 else rfc3339(g.ends_at),
                 str(g.request_id)] for g in grants]
        return [_grant_dict(g) for g in grants], _table(
            rows, ["ID", "STATUS", "USER", "ACCESS", "ENDS/ENDED", "REQUEST"])
    if args.command == "extend":
        x = await service.extend(actor, args.grant_id, args.duration, args.reason)
        if isinstance(x, AccessRequest):
            return _request_dict(x), (f"request {x.id} to extend grant {args.grant_id} by "
                                      f"{format_duration(x.duration)} waits for approval\n")
        return _grant_dict(x), (f"grant {x.id} extended: {x.login}@{x.target} {_until(x)}\n")
    if args.command == "revoke":
        g = await service.revoke(actor, args.grant_id)
        return _grant_dict(g), f"grant {g.id} revoked; its sessions are closed\n"
    if args.command == "sessions":
        sessions = await service.list_live_sessions(actor)
        data = [{**asdict(s), "started_at": rfc3339(s.started_at)} for s in sessions]
        rows = [[str(s.id), s.user, f"{s.login}@{s.target}", s.kind, s.detail or "",
                 rfc3339(s.started_at), str(s.grant_id)] for s in sessions]
        return data, _table(rows, ["ID", "USER", "ACCESS", "KIND", "DETAIL", "STARTED", "GRANT"])
    if args.command == "targets":
        out = []
        for name, target in cfg.targets.items():
            policies = [p for p in cfg.policies
                        if name in p.targets and cfg.matches(actor, p.requesters)]
            if not policies:
                continue
            logins = sorted({login for p in policies
                             for login in policy.access_names(cfg, p, name)})
            out.append({"name": name, "kind": target.kind, "logins": logins,
                        "max_duration": format_duration(max(p.max_duration for p in policies)),
                        "description": target.description})
        rows = [[t["name"], t["kind"], ",".join(t["logins"]), t["max_duration"],
                 t["description"] or ""] for t in out]
        return out, _table(rows, ["TARGET", "KIND", "LOGINS/ROLES", "MAX", "DESCRIPTION"])
    if args.command == "whoami":
        mine = [g for g in service.active.values() if g.user == actor]
        grants = [_grant_dict(g) for g in mine]
        data = {"user": actor, "groups": sorted(cfg.groups_of(actor)), "active_grants": grants}
        text = f"user: {actor}\ngroups: {', '.join(data['groups']) or '(none)'}\n"
        text += "".join(f"grant {g.id}: {g.login}@{g.target} {_until(g)}"
                        + ("" if _status(cfg, g) == "active" else
                           f" (no longer allowed: {policy.grant_allowed(cfg, g).reason})") + "\n"
                        for g in mine) or "no active grants\n"
        return data, text
    if args.command == "recordings":
        return await _recordings(service, actor, args)
    if args.command == "db-login":
        return await _db_login(service, actor, args)
    if args.command == "ca":
        return ca_answer(service, args.pg)
    raise AssertionError(f"unhandled command {args.command}")


def ca_answer(service: AccessService, pg: bool) -> tuple[dict[str, str], str]:
    """What ``ca`` prints (the user shell's, and ``jit-proxy ca`` on the proxy host for a first
    contact that has nothing to check the proxy against yet): the ``@cert-authority`` line and
    the user CA key, or with ``pg`` the PostgreSQL CA certificate; as (JSON data, text).

    Raises:
        AccessError: ``pg`` on a proxy without a PostgreSQL port."""
    if pg:
        if service.postgres is None:
            raise AccessError("this proxy has no PostgreSQL port (no 'postgres' section)")
        pem = service.postgres.x509.certificate_pem.decode()
        return {"pg_ca_pem": pem}, pem
    data = {"known_hosts": service.known_hosts_line(), "user_ca": service.ca.user_ca_public}
    text = ("# Clients: add this line to ~/.ssh/known_hosts to trust the proxy and every "
            "target behind it:\n" + data["known_hosts"] + "\n"
            "# Targets: put this line in the file named by sshd's TrustedUserCAKeys:\n"
            + data["user_ca"] + "\n")
    return data, text


async def _db_login(service: AccessService, actor: str, args: argparse.Namespace
                    ) -> tuple[Any, str]:
    """Mint a one-time secret for the actor's live grant on a PostgreSQL target."""
    door = service.postgres
    target = service.config.targets.get(args.target)
    if door is None or target is None or target.kind != "postgres":
        raise AccessError(f"{args.target!r} is not a PostgreSQL target; 'targets' lists them")
    if target.client_auth == "pam":
        cfg = service.config.postgres
        raise AccessError(f"{args.target} takes your own password (PAM), not a one-time secret:\n"
                          f"  psql \"host={cfg.host_names[0]} port={door.port} user={actor} "
                          f"dbname={args.target} sslmode=verify-full sslrootcert=jit-ca.pem\"\n"
                          f"(CA certificate: ssh jit-proxy ca --pg > jit-ca.pem)")
    live = service.live_grants_on(actor, args.target)
    grants = [g for g in live if args.role is None or g.login == args.role]
    if not grants:
        service.audit.emit("db.login.refused", actor, target=args.target, why="no active grant",
                           role=args.role)
        if live:  # a grant there, for another role
            held = sorted({g.login for g in live})
            raise AccessError(f"{actor} holds {', '.join(held)} on {args.target}, not "
                              f"{args.role}: 'db-login {args.target} --role {held[0]}', or "
                              f"request {args.role} with: ssh jit-proxy request {args.target} "
                              f"--role {args.role} --for 30m --reason \"...\"")
        raise AccessError(f"{actor} has no active grant for {args.target}. Request one with: "
                          f"ssh jit-proxy request {args.target} --role ROLE --for 30m "
                          f"--reason \"...\"")
    grant = max(grants, key=lambda g: g.ends_at)
    secret = door.mint_secret(grant)
    cfg = service.config.postgres
    host, port = cfg.host_names[0], door.port
    expires = rfc3339(min(service.clock.now() + cfg.secret_ttl, grant.ends_at))
    service.audit.emit("db.login.issued", actor, target=args.target, grant=grant.id,
                       role=grant.login, expires_at=expires)
    uri = (f"postgresql://{actor}:{secret}@{host}:{port}/{args.target}"
           f"?sslmode=verify-full&sslrootcert=jit-ca.pem")
    data = {"target": args.target, "grant": grant.id, "role": grant.login, "host": host,
            "port": port, "user": actor, "password": secret, "uri": uri, "expires_at": expires}
    text = (f"One-time secret for {args.target} (grant {grant.id}, role {grant.login}), single "
            f"use, valid until {expires}.\n"
            f"Save the CA certificate once:  ssh jit-proxy ca --pg > jit-ca.pem\n"
            f"Then:\n  psql \"{uri}\"\n"
            f"or:\n  PGPASSWORD='{secret}' psql \"host={host} port={port} user={actor} "
            f"dbname={args.target} sslmode=verify-full sslrootcert=jit-ca.pem\"\n")
    return data, (uri + "\n" if args.uri else text)


async def _watch(service: AccessService, actor: str):
    """New pending requests ``actor`` may decide, one line each, as they are made."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=1000)
    service.request_listeners.add(queue)
    try:
        while True:
            r = await queue.get()
            if actor != r.requester and r.policy in service.visibility(actor)[1]:
                what = (f"{format_duration(r.duration)} more on grant {r.extends_grant}"
                        if r.extends_grant else format_duration(r.duration))
                yield printable(f"new request {r.id}: {r.requester} asks for {r.login}@{r.target}"
                                f" for {what}: {r.reason}") + "\n"
    finally:
        service.request_listeners.discard(queue)


async def _recordings(service: AccessService, actor: str, args: argparse.Namespace
                      ) -> tuple[Any, Any]:
    """Approvers see the recordings of the sessions under the policies they approve for."""
    from proxy.runtime import recordings
    _, policies = service.visibility(actor)
    if not policies:
        service.audit.emit("recording.refused", actor, why="not an approver")
        raise AccessError("recordings are for approvers of the sessions' policies")
    visible = ("", policies)
    if args.action == "list":
        rows = await recordings.list_recordings(
            service, {"user": args.user, "target": args.target, "since": args.since}, visible)
        return rows, recordings.summary_table(rows)
    if args.id is None:
        raise AccessError(f"recordings {args.action} needs a session id")
    bundle = await recordings.get_recording(service, actor, args.id, visible,
                                            play=args.action == "play" and not args.json)
    if args.action == "export":
        return bundle, json.dumps(bundle, indent=2) + "\n"
    try:
        stream = list(recordings.frames(bundle["cast"], args.speed))
    except ValueError as exc:
        raise AccessError(str(exc)) from None
    return {"session": args.id, "frames": len(stream)}, stream

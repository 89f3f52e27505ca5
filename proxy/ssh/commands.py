"""The command shell answered by the proxy's SSH server: ``ssh jit-proxy COMMAND [ARGS]``.

What it is for: parsing a command line (shell words, then argparse), running it against the
``AccessService`` as the authenticated user, and rendering the answer as text or ``--json``.
What it must not do: exit the process (argparse errors become exit status 2 with usage text), or
decide anything itself: every rule lives in ``proxy.access``.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict, dataclass
from typing import Any

from proxy.access import policy
from proxy.access.duration import format_duration, parse_duration
from proxy.clock import rfc3339
from proxy.runtime.service import AccessError, AccessService

HELP = """\
jit-proxy: just-in-time access. Commands (each takes --json):
  request TARGET --login LOGIN --for DURATION --reason TEXT   ask for SSH access (--for 30m)
  request TARGET --role ROLE --for DURATION --reason TEXT     ask for database access
  requests [--pending]               requests you made or may decide
  approve ID [--comment TEXT]        approve a request (approvers)
  deny ID --reason TEXT              deny a request (approvers)
  grants [--all]                     active grants (--all: ended ones too)
  revoke GRANT_ID                    end a grant now (its user or an approver)
  sessions                           live sessions through the proxy
  targets                            what you may request
  whoami                             who the proxy thinks you are
  ca                                 lines that make clients and targets trust the proxy's CA
  help                               this text
Then connect with:  ssh -J jit-proxy LOGIN@TARGET
"""


@dataclass
class Result:
    status: int
    out: str = ""
    err: str = ""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # never exit the daemon
        raise _UsageError(f"{self.prog}: {message}\n{self.format_usage()}")

    def exit(self, status: int = 0, message: str | None = None):
        raise _UsageError(message or "")


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> _Parser:
    p = _Parser(prog="jit-proxy", add_help=False)
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def cmd(name: str, **kw: Any) -> _Parser:
        c = sub.add_parser(name, add_help=False, **kw)
        c.add_argument("--json", action="store_true")
        return c

    c = cmd("request")
    c.add_argument("target")
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument("--login", help="account on an SSH target")
    who.add_argument("--role", dest="login", help="role name on a PostgreSQL target")
    c.add_argument("--for", dest="duration", required=True, type=_duration)
    c.add_argument("--reason", required=True, nargs="+")
    cmd("requests").add_argument("--pending", action="store_true")
    c = cmd("approve")
    c.add_argument("id", type=int)
    c.add_argument("--comment", nargs="+")
    c = cmd("deny")
    c.add_argument("id", type=int)
    c.add_argument("--reason", required=True, nargs="+")
    cmd("grants").add_argument("--all", action="store_true")
    cmd("revoke").add_argument("grant_id", type=int)
    for name in ("sessions", "targets", "whoami", "ca", "help"):
        cmd(name)
    return p


PARSER = _parser()


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


def _table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return "(none)\n"
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines) + "\n"


async def run_command(service: AccessService, actor: str, command_line: str) -> Result:
    """Run one command line for ``actor``; never raises for user mistakes.

    Returns:
        ``Result(status, out, err)``: 0 on success, 1 when refused, 2 on a usage error.
    """
    try:
        argv = shlex.split(command_line)
    except ValueError:  # e.g. an apostrophe in a reason that ssh passed unquoted
        argv = command_line.split()
    if not argv:
        return Result(0, out=HELP)
    if argv[0] in ("-h", "--help"):
        argv = ["help"]
    try:
        args = PARSER.parse_args(argv)
    except _UsageError as exc:
        service.audit.emit("command.refused", actor, command=argv[0], why="usage error")
        return Result(2, err=f"{exc}\nTry 'ssh jit-proxy help'.\n")
    if args.command is None:
        return Result(2, err=HELP)
    for name in ("reason", "comment"):  # ssh joins words: --reason may arrive as several
        if isinstance(getattr(args, name, None), list):
            setattr(args, name, " ".join(getattr(args, name)))
    try:
        data, text = await _dispatch(service, actor, args)
    except AccessError as exc:
        if args.json:
            return Result(1, out=json.dumps({"error": str(exc)}) + "\n")
        return Result(1, err=f"jit-proxy: {exc}\n")
    if args.json:
        return Result(0, out=json.dumps(data, indent=2) + "\n")
    return Result(0, out=text)


async def _dispatch(service: AccessService, actor: str, args: argparse.Namespace
                    ) -> tuple[Any, str]:
    cfg = service.config
    if args.command == "help":
        return {"help": HELP}, HELP
    if args.command == "request":
        r = await service.request(actor, args.target, args.login, args.duration, args.reason)
        return _request_dict(r), (
            f"request {r.id} created: {r.login}@{r.target} for {format_duration(r.duration)} "
            f"(policy {r.policy}); waiting for approval.\n")
    if args.command == "requests":
        reqs = await service.list_requests(actor, args.pending)
        rows = [[str(r.id), r.status.value, r.requester, f"{r.login}@{r.target}",
                 format_duration(r.duration), rfc3339(r.created_at), r.reason] for r in reqs]
        return [_request_dict(r) for r in reqs], _table(
            rows, ["ID", "STATUS", "REQUESTER", "ACCESS", "FOR", "CREATED", "REASON"])
    if args.command == "approve":
        g = await service.approve(actor, args.id, args.comment)
        return _grant_dict(g), (f"request {args.id} approved: grant {g.id} gives {g.user} "
                                f"{g.login}@{g.target} until {rfc3339(g.ends_at)}\n")
    if args.command == "deny":
        r = await service.deny(actor, args.id, args.reason)
        return _request_dict(r), f"request {r.id} denied\n"
    if args.command == "grants":
        grants = await service.list_grants(actor, not args.all)
        rows = [[str(g.id), g.status.value, g.user, f"{g.login}@{g.target}",
                 rfc3339(g.ended_at if g.ended_at is not None else g.ends_at), str(g.request_id)]
                for g in grants]
        return [_grant_dict(g) for g in grants], _table(
            rows, ["ID", "STATUS", "USER", "ACCESS", "ENDS/ENDED", "REQUEST"])
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
        grants = [_grant_dict(g) for g in service.active.values() if g.user == actor]
        data = {"user": actor, "groups": sorted(cfg.groups_of(actor)), "active_grants": grants}
        text = f"user: {actor}\ngroups: {', '.join(data['groups']) or '(none)'}\n"
        text += "".join(f"grant {g['id']}: {g['login']}@{g['target']} until {g['ends_at']}\n"
                        for g in grants) or "no active grants\n"
        return data, text
    if args.command == "ca":
        data = {"known_hosts": service.known_hosts_line(),
                "user_ca": service.ca.user_ca_public}
        text = ("# Clients: add this line to ~/.ssh/known_hosts to trust the proxy and every "
                "target behind it:\n" + data["known_hosts"] + "\n"
                "# Targets: put this line in the file named by sshd's TrustedUserCAKeys:\n"
                + data["user_ca"] + "\n")
        return data, text
    raise AssertionError(f"unhandled command {args.command}")

"""The ``jit-proxy`` command line: serve, check-config, audit verify, sandbox.

What it is for: turning argv into one runtime action and an exit status (0 ok, 1 failed check or
refused start, 2 usage).
What it must not do: print secrets, or show a traceback for a user's mistake (config errors,
unreadable files and too-open keys are one clear message each).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from proxy import __version__

DEFAULT_CONFIG = "/etc/jit-proxy/jit-proxy.yaml"


class LogfmtFormatter(logging.Formatter):
    """One line per event, ``key=value`` pairs (logfmt), for journald and log shippers:
    ``ts=2026-11-29T08:00:00.000Z level=info logger=jit_proxy.daemon msg="..."``."""

    def format(self, record: logging.LogRecord) -> str:
        from proxy.clock import rfc3339
        msg = record.getMessage()
        if record.exc_info:
            msg += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        quoted = '"' + msg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        return (f"ts={rfc3339(record.created)} level={record.levelname.lower()} "
                f"logger={record.name} msg={quoted}")


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


def _load(given: str | None):
    """The configuration at ``given`` (-c), or else at DEFAULT_CONFIG; None, said why, when
    it does not load."""
    from proxy.config import ConfigError, load_config
    path = given or DEFAULT_CONFIG
    try:
        return load_config(path)
    except ConfigError as exc:
        for message in exc.messages:
            print(message, file=sys.stderr)
        if given is None and not os.path.exists(path):
            print("jit-proxy: give the configuration with -c FILE (a sandbox's is "
                  "DIR/jit-proxy.yaml; 'jit-proxy sandbox' prints it)", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.file is not None:
        if args.config is not None and os.path.realpath(args.config) != \
                os.path.realpath(args.file):
            print("jit-proxy: check-config takes one file: FILE or -c FILE", file=sys.stderr)
            return 2
        args.config = args.file
    config = _load(args.config)
    args.config = args.config or DEFAULT_CONFIG  # (named in what follows)
    if config is None:
        return 1
    from proxy.auth.login import pam_problems
    from proxy.config import config_warnings
    for line in config_warnings(args.config, config):
        print(line, file=sys.stderr)
    broken = False
    for key, problem in pam_problems(config):
        broken = broken or key == "auth.pam.library"
        kind = "error" if key == "auth.pam.library" else "warning"
        print(f"{args.config}: {key}: {kind}: {problem}", file=sys.stderr)
    if broken:
        return 1
    print(f"{args.config}: ok ({len(config.users)} users, {len(config.targets)} targets, "
          f"{len(config.policies)} policies)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ca import CAKeyError
    from proxy.runtime.daemon import run, serve
    _setup_logging(args.log_level)
    config = _load(args.config)
    if config is None:
        return 1
    try:
        return run(serve(config, Path(args.config or DEFAULT_CONFIG)))
    except CAKeyError as exc:
        print(f"jit-proxy: refusing to start: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"jit-proxy: cannot start: {exc}", file=sys.stderr)
        return 1


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from proxy.audit.log import verify_log
    path = args.file
    if path is None:
        config = _load(args.config)
        if config is None:
            return 1
        path = config.audit_log_path
    try:
        result = verify_log(Path(path))
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
        return 1
    if result.ok:
        print(f"{path}: ok, {result.lines} events, hash chain intact; last hash "
              f"{result.last_hash}")
        print("(keep the last hash elsewhere: it proves later that no line was cut off the end)")
        return 0
    print(f"{path}:{result.bad_line}: {result.problem}", file=sys.stderr)
    return 1


def _admin(args: argparse.Namespace, command: str, **fields) -> dict | None:
    from proxy.runtime.admin import AdminError, request
    path = Path(args.socket) if args.socket else None
    if path is None:
        config = _load(args.config)
        if config is None:  # (e.g. a member of admin_group, who may not read it)
            print("jit-proxy: or name the admin socket: --socket PATH (daemon.admin_socket; "
                  "the unit's is /run/jit-proxy/admin.sock)", file=sys.stderr)
            return None
        path = config.admin_socket_path
    try:
        return request(path, command, **fields)
    except AdminError as exc:
        print(f"jit-proxy: {exc}", file=sys.stderr)
        return None


def _print(args: argparse.Namespace, answer: dict, text: str) -> None:
    import json
    print(json.dumps(answer, indent=2) if args.json else text, end="" if not args.json else "\n")


def cmd_status(args: argparse.Namespace) -> int:
    from proxy.ssh.commands import _table
    answer = _admin(args, "status")
    if answer is None:
        return 1
    from proxy.access.model import first_use_window
    text = "listeners: " + ", ".join(f"{k} {v}" for k, v in answer["listeners"].items()) + "\n"
    text += f"\nlive sessions ({len(answer['live_sessions'])}):\n" + _table(
        [[str(s["id"]), s["user"], f"{s['login']}@{s['target']}", s["kind"], s["started_at"]]
         for s in answer["live_sessions"]], ["ID", "USER", "ACCESS", "KIND", "STARTED"])
    text += f"\nactive grants ({len(answer['active_grants'])}):\n" + _table(
        [[str(g["id"]), g["user"], f"{g['login']}@{g['target']}",
          first_use_window(g["duration"] or 0, g["ends_at"]) if g.get("awaiting_first_use")
          else g["ends_at"]] for g in answer["active_grants"]], ["ID", "USER", "ACCESS", "ENDS"])
    text += f"\npending requests ({len(answer['pending_requests'])}):\n" + _table(
        [[str(r["id"]), r["requester"], f"{r['login']}@{r['target']}", r["reason"]]
         for r in answer["pending_requests"]], ["ID", "REQUESTER", "ACCESS", "REASON"])
    text += f"\nlockouts ({len(answer.get('lockouts', []))}):\n" + _table(
        [[lock["subject"], lock["until"]] for lock in answer.get("lockouts", [])],
        ["SUBJECT", "UNTIL"])
    _print(args, answer, text)
    return 0


def _admin_action(args: argparse.Namespace, command: str, describe, **fields) -> int:
    """Send one admin ``command``; print ``describe(answer)`` (or the JSON). 1 on refusal."""
    answer = _admin(args, command, **fields)
    if answer is None:
        return 1
    _print(args, answer, describe(answer))
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    answer = _admin(args, "ca", pg=args.pg)
    if answer is None:
        return 1
    text = answer.pop("text")
    _print(args, answer, text)
    return 0


def cmd_lockouts_clear(args: argparse.Namespace) -> int:
    return _admin_action(args, "lockouts.clear", lambda a: f"{a['unlocked']}: lockout ended, "
                                                           f"failures forgotten\n",
                         subject=args.subject)


def cmd_roles_forget(args: argparse.Namespace) -> int:
    return _admin_action(args, "roles.forget", lambda a: f"{a['forgotten']}: no longer tracked "
                                                         f"(nor reported at start)\n",
                         role=args.role)


def cmd_sessions_kill(args: argparse.Namespace) -> int:
    return _admin_action(args, "sessions.kill", lambda a: (
        f"session {a['killed']['id']} of {a['killed']['user']} ({a['killed']['login']}@"
        f"{a['killed']['target']}) ended\n"), id=args.id)


def cmd_grants_revoke(args: argparse.Namespace) -> int:
    return _admin_action(args, "grants.revoke", lambda a: f"grant {a['revoked']} revoked; its "
                                                          f"sessions are closed\n", id=args.id)


def cmd_recordings(args: argparse.Namespace) -> int:
    import json
    import time
    from proxy.runtime import recordings
    if args.action == "list":
        answer = _admin(args, "recordings.list", user=args.user, target=args.target,
                        since=args.since)
        if answer is None:
            return 1
        _print(args, answer, recordings.summary_table(answer["recordings"]))
        return 0
    if args.id is None:
        print(f"jit-proxy: recordings {args.action} needs a session id", file=sys.stderr)
        return 2
    out = Path(args.out or ".")
    if args.action == "export":  # (before asking: the export is audited when it is handed out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"jit-proxy: cannot write to {out}: {exc.strerror}", file=sys.stderr)
            return 1
        if not os.access(out, os.W_OK | os.X_OK):
            print(f"jit-proxy: cannot write to {out}: Permission denied", file=sys.stderr)
            return 1
    answer = _admin(args, "recordings.get", id=args.id, play=args.action == "play")
    if answer is None:
        return 1
    if not answer["intact"]:
        print(f"jit-proxy: warning: {answer['recording_path']} no longer matches the SHA-256 in "
              f"the audit log", file=sys.stderr)
    if args.action == "play":
        recordings.play(answer["cast"], args.speed,
                        lambda text: (sys.stdout.write(text), sys.stdout.flush()), time.sleep)
        return 0 if answer["intact"] else 1
    cast = out / f"session-{args.id}.cast"
    events = out / f"session-{args.id}.audit.jsonl"
    from ca.keys import write_secret_file  # recordings are 0600 where they live; so are copies
    for path in (cast, events):
        path.unlink(missing_ok=True)
    write_secret_file(cast, answer["cast"].encode())
    write_secret_file(events, "".join(json.dumps(e, sort_keys=True, separators=(",", ":"),
                                                 ensure_ascii=False) + "\n"
                                      for e in answer["audit_events"]).encode())
    print(f"{cast}\n{events}")
    return 0 if answer["intact"] else 1


def cmd_sandbox(args: argparse.Namespace) -> int:
    from proxy.runtime.sandbox import main as sandbox_main
    _setup_logging(args.log_level)
    return sandbox_main(Path(args.dir))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jit-proxy", description="Just-In-Time access proxy")
    p.add_argument("--version", action="version", version=f"jit-proxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("serve", help="run the proxy daemon")
    c.add_argument("-c", "--config", help=f"the configuration (default: {DEFAULT_CONFIG})")
    c.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    c.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a configuration file")
    c.add_argument("file", nargs="?", help="the file (the same as -c FILE)")
    c.add_argument("-c", "--config", help=f"the configuration (default: {DEFAULT_CONFIG})")
    c.set_defaults(func=cmd_check_config)

    c = sub.add_parser("audit", help="audit log tools")
    asub = c.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="verify the audit log's hash chain")
    v.add_argument("file", nargs="?", help="the log (default: the configured one)")
    v.add_argument("-c", "--config", help=f"the configuration naming the log (default: "
                                          f"{DEFAULT_CONFIG})")
    v.set_defaults(func=cmd_audit_verify)

    def admin_options(c: argparse.ArgumentParser, given_only: bool = False) -> None:
        """-c, --socket and --json; ``given_only`` for an action under a group that has them
        too, so ``lockouts -c FILE clear X`` and ``lockouts clear X -c FILE`` both work (an
        action's own default would overwrite what was given before it)."""
        default = (lambda value: argparse.SUPPRESS) if given_only else (lambda value: value)
        c.add_argument("-c", "--config", default=default(None),
                       help=f"the configuration (default: {DEFAULT_CONFIG})")
        c.add_argument("--socket", default=default(None),
                       help="the admin socket (default: from the configuration)")
        c.add_argument("--json", action="store_true", default=default(False))

    def admin_parser(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        admin_options(c)
        return c

    c = admin_parser("status", "listeners, live sessions, active grants, pending requests, "
                               "lockouts")
    c.set_defaults(func=cmd_status)
    def admin_action(group: str, help: str, action: str, action_help: str, func,
                     arg: str = "id", arg_type: type = int,
                     listed: str = "listed by 'jit-proxy status'") -> None:
        c = admin_parser(group, help)
        actions = c.add_subparsers(dest=f"{group}_command", metavar=action, title="action")
        c.set_defaults(func=lambda _: c.error(
            f"say what to do: jit-proxy {group} {action} {arg.upper()} (the {group} are "
            f"{listed})"))
        a = actions.add_parser(action, help=action_help)
        a.add_argument(arg, type=arg_type)
        admin_options(a, given_only=True)
        a.set_defaults(func=func)

    c = admin_parser("ca", "the @cert-authority line for clients and the user CA key for "
                           "targets, as 'ssh jit-proxy ca' prints them (for a first contact)")
    c.add_argument("--pg", action="store_true",
                   help="the CA certificate for PostgreSQL clients (sslrootcert)")
    c.set_defaults(func=cmd_ca)
    admin_action("sessions", "live sessions (listed by status)", "kill",
                 "end one live session now (its grant stays)", cmd_sessions_kill)
    admin_action("grants", "grants (listed by status)", "revoke",
                 "end a grant and its sessions now", cmd_grants_revoke)
    admin_action("lockouts", "logins locked out after failures (listed by status)", "clear",
                 "end a lockout now: SUBJECT is user:NAME, keyholder:NAME or address:IP",
                 cmd_lockouts_clear, arg="subject", arg_type=str)
    admin_action("roles", "ephemeral PostgreSQL roles", "forget",
                 "stop tracking a role of a target no longer configured (db.role.orphaned), "
                 "once it is dropped by hand", cmd_roles_forget, arg="role", arg_type=str,
                 listed="named by db.role.orphaned events in the audit log")
    c = admin_parser("recordings", "find, play and export session recordings")
    c.add_argument("action", choices=["list", "play", "export"])
    c.add_argument("id", nargs="?", type=int, help="session id (play, export)")
    c.add_argument("--user")
    c.add_argument("--target")
    c.add_argument("--since", help="a duration (2h) or a time (2026-11-29T08:00:00Z)")
    from proxy.ssh.commands import _speed
    c.add_argument("--speed", type=_speed, default=1.0,
                   help="play faster (2, 10, ...); pauses over 2 s are shortened")
    c.add_argument("--out", help="export: directory for the .cast and its audit events")
    c.set_defaults(func=cmd_recordings)

    c = sub.add_parser("sandbox", help="a complete local playground (proxy, an sshd target, a "
                                       "PostgreSQL target when installed, two users)")
    c.add_argument("--dir", default="./jit-sandbox",
                   help="where it keeps its state between runs (default: ./jit-sandbox)")
    c.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"])
    c.set_defaults(func=cmd_sandbox)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

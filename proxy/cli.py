"""The ``jit-proxy`` command line: serve, check-config, audit verify, sandbox.

What it is for: turning argv into one runtime action and an exit status (0 ok, 1 failed check or
refused start, 2 usage).
What it must not do: print secrets, or show a traceback for a user's mistake (config errors,
unreadable files and too-open keys are one clear message each).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from proxy import __version__

DEFAULT_CONFIG = "/etc/jit-proxy/jit-proxy.yaml"


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


def _load(path: str):
    from proxy.config import ConfigError, load_config
    try:
        return load_config(path)
    except ConfigError as exc:
        for message in exc.messages:
            print(message, file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
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
        return run(serve(config, Path(args.config)))
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


def cmd_sandbox(args: argparse.Namespace) -> int:
    from proxy.runtime.sandbox import main as sandbox_main
    _setup_logging(args.log_level)
    return sandbox_main(Path(args.dir))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jit-proxy", description="Just-In-Time access proxy")
    p.add_argument("--version", action="version", version=f"jit-proxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("serve", help="run the proxy daemon")
    c.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    c.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    c.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a configuration file")
    c.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    c.set_defaults(func=cmd_check_config)

    c = sub.add_parser("audit", help="audit log tools")
    asub = c.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="verify the audit log's hash chain")
    v.add_argument("file", nargs="?", help="the log (default: the configured one)")
    v.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    v.set_defaults(func=cmd_audit_verify)

    c = sub.add_parser("sandbox", help="a complete local playground (proxy, sshd, two users)")
    c.add_argument("--dir", default="./jit-sandbox")
    c.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"])
    c.set_defaults(func=cmd_sandbox)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""jit-proxy against OpenSSH, pgbouncer and direct connections, in one run on this machine.

What it is for: one command, ``python -m bench``, that starts its own peers on 127.0.0.1 (bench/env.py:
a target sshd, an OpenSSH jump host, a PostgreSQL cluster, pgbouncer, jit-proxy with recording on),
runs the parts asked for with ``--only`` (default: all) and writes medians and ratios jit-proxy/peer
to bench/results/RESULTS.json and RESULTS.md (machine, versions, date). Parts:

- ``ssh``: connection setup, bulk up and down (bench/ssh.py)
- ``latency``: one-byte echo through a pty, p50/p99 (bench/ssh.py)
- ``pg``: pgbench -S and -S -C vs pgbouncer vs direct (bench/pg.py)
- ``control``: approve → usable session, certificates per second, expiry storm (bench/control.py)
- ``scale``: idle SSH sessions and PostgreSQL connections, RSS per session (bench/scale.py)

What it must not do: run as a test (it measures; it asserts nothing), leave a process behind, or
reach anything but 127.0.0.1. As root it may install missing Debian packages (openssh, postgresql,
pgbench, pgbouncer) and creates the login account ``jitbench``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PARTS = ["ssh", "latency", "pg", "control", "scale"]
# the arguments each part uses (the results list only those of the parts that ran)
ARGS_OF = {"ssh": ["rounds", "size_mib"], "latency": ["rounds", "echo_samples"],
           "pg": ["rounds", "pg_seconds", "pg_scale"],
           "control": ["control_samples", "certs", "storm_grants", "storm_db_grants"],
           "scale": ["scale_sessions", "rounds", "echo_samples", "pg_scale"]}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated parts to run (default: all of {','.join(PARTS)})")
    p.add_argument("--rounds", type=int, default=5, help="rounds of each alternated measurement")
    p.add_argument("--size-mib", type=int, default=1024, help="bulk transfer size (MiB)")
    p.add_argument("--echo-samples", type=int, default=200, help="echoes per latency round")
    p.add_argument("--pg-seconds", type=int, default=10, help="length of each pgbench run")
    p.add_argument("--pg-scale", type=int, default=10, help="pgbench -i scale factor")
    p.add_argument("--control-samples", type=int, default=20,
                   help="approve-to-usable samples per kind")
    p.add_argument("--certs", type=int, default=2000, help="certificates to issue per rate")
    p.add_argument("--storm-grants", type=int, default=1000,
                   help="grants ending together in the expiry storm")
    p.add_argument("--storm-db-grants", type=int, default=200,
                   help="of those, grants with a PostgreSQL connection and role")
    p.add_argument("--scale-sessions", type=int, default=500,
                   help="idle SSH sessions, and as many idle PostgreSQL connections")
    p.add_argument("--out", default=str(ROOT / "results"),
                   help="directory for RESULTS*.json and .md (default: bench/results)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--profile", metavar="FILE",
                   help="record the proxy process with py-spy (collapsed stacks to FILE; "
                        "py-spy must be installed: pip install py-spy; it is no dependency)")
    args = p.parse_args()
    parts = {x.strip() for x in args.only.split(",") if x.strip()}
    if parts - set(PARTS):
        p.error(f"unknown parts: {', '.join(sorted(parts - set(PARTS)))} (known: {PARTS})")

    from bench.env import BenchEnv, require_tools
    from bench.stats import Results
    from proxy.runtime.sandbox import ensure_login
    need_pg = bool(parts & {"pg", "control", "scale"})
    try:
        require_tools(need_pg)
    except Exception as exc:  # noqa: BLE001 - said clearly, then stop
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    d = Path(tempfile.mkdtemp(prefix="jit-bench-"))
    os.chmod(d, 0o711)
    storm = args.storm_grants if "control" in parts else 0
    env = BenchEnv(d, ensure_login("jitbench"), pg=need_pg, storm_users=storm,
                   pg_scale=args.pg_scale,
                   pg_max_connections=max(200, storm + args.scale_sessions + 200))
    results = Results()
    env.profile = args.profile
    try:
        env.start()
        if parts & {"ssh", "latency"}:
            from bench import ssh
            ssh.run(env, results, args.rounds, args.size_mib << 20, args.echo_samples, parts)
        if "pg" in parts:
            from bench import pg
            pg.run(env, results, args.rounds, args.pg_seconds)
        if "control" in parts:
            from bench import control
            control.run(env, results, args.control_samples, args.certs, storm,
                        args.storm_db_grants)
        if "scale" in parts:
            from bench import scale
            scale.run(env, results, args.scale_sessions, args.scale_sessions,
                      max(1, args.rounds), max(50, args.echo_samples // 2))
    finally:
        env.close()
        if args.keep:
            print(f"bench: kept {d}", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)
    used = {"only", "profile"} | {a for part in parts for a in ARGS_OF[part]}
    data = results.to_data({k: v for k, v in vars(args).items() if k in used})
    md = Results.markdown(data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if parts == set(PARTS) else "-" + "-".join(sorted(parts))
    (out / f"RESULTS{suffix}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"RESULTS{suffix}.md").write_text(md)
    print(md)
    print(f"bench: results in {out / f'RESULTS{suffix}.md'} and .json", file=sys.stderr)
    for f in env.profiles:
        print(f"bench: profile of a proxy process in {f} (python -m bench.topstacks {f})",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench.proxyd serve -c FILE``: the jit-proxy daemon as the bench runs it.

What it is for: running the real ``jit-proxy serve`` (same code, same event loop choice) with one
bench-only difference: a one-time secret from ``db-login`` stays usable until it expires instead of
being used up by the first login. pgbench opens 8 connections (and with ``-C`` one per transaction)
with one password, which a single-use secret cannot serve. The SCRAM verification each login does is
unchanged, so connection costs are measured as they are.

What it must not do: change anything else in the proxy, or ever be used outside the bench.
"""

from __future__ import annotations

import sys

from proxy.cli import main
from proxy.postgres.secrets import OneTimeSecrets


def _reusable_consume(self, user, target, verifier) -> bool:  # bench only: see the docstring
    return self._by_key.get((user, target)) is verifier


if __name__ == "__main__":
    OneTimeSecrets.consume = _reusable_consume  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))

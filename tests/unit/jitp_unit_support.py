"""Shared helpers for the unit tests: real ed25519 keys and a valid configuration text.

Not a conftest (tests/conftest.py belongs to the integration suite); imported by the unit test
modules, which pytest's default import mode finds next to them.
"""

from __future__ import annotations

import functools

import asyncssh

FILENAME = "/etc/jit-proxy/test.yaml"


@functools.lru_cache(maxsize=None)
def public_key(name: str) -> str:
    """A real ed25519 public key line (cached per name so tests stay fast)."""
    return asyncssh.generate_private_key("ssh-ed25519", comment=name).export_public_key() \
        .decode().strip()


def config_text() -> str:
    """A valid configuration exercising every section.

    Users: alice, carol (group dev, requesters of web-deploy), bob (group sre, approver), carol is
    also a named approver of web-deploy, mallory (in no group, named nowhere).
    """
    return f"""\
state_dir: /tmp/jit-state
ssh:
  listen_address: 127.0.0.1
  listen_port: 0
  login_grace_time: 30s
ca:
  clock_skew: 2m
audit:
  log: /tmp/jit-state/audit.jsonl
users:
  alice:
    keys:
      - {public_key("alice")}
    full_name: Alice Example
  bob:
    keys:
      - {public_key("bob")}
  carol:
    keys:
      - {public_key("carol")}
  mallory:
    keys: [{public_key("mallory")}]
groups:
  sre:
    members: [bob]
  dev:
    members:
      - alice
      - carol
targets:
  web1:
    address: 127.0.0.1
    port: 2022
    host_key: {public_key("web1-host")}
    description: the web server
  db1:
    address: db1.internal
    host_ca: {public_key("host-ca")}
policies:
  - name: web-deploy
    targets: [web1]
    logins: [deploy, root]
    requesters: [group:dev]
    approvers: [group:sre, user:carol]
    max_duration: 2h
  - name: db-admin
    targets:
      - db1
    logins: [postgres]
    requesters: [alice]
    approvers: [bob]
    max_duration: 30m
    allow:
      port_forwarding: true
"""


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based number of the line holding the ``occurrence``-th ``needle``."""
    seen = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return number
    raise AssertionError(f"{needle!r} (occurrence {occurrence}) not in the text")


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)

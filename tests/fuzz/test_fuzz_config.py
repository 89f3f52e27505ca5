"""Fuzzing proxy.config.parse_config: whatever the text, the result is a Config or a ConfigError
whose every message reads ``FILE:LINE: ...`` — never any other exception.

These tests found the loader crashing on unknown tags, unconstructible scalars (``=``, impossible
dates, ``0x_``), merge keys, recursive aliases and deep nesting; tests/unit/test_unit_config.py
keeps those cases as regression tests.
"""

from __future__ import annotations

import functools
import re

import asyncssh
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy.config import Config, ConfigError, parse_config

FILENAME = "fuzz/jit-proxy.yaml"
MESSAGE = re.compile(rf"^{re.escape(FILENAME)}:\d+: ")



@functools.lru_cache(maxsize=None)
def _key(name: str) -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def _valid_config() -> str:
    return f"""\
ssh:
  listen_port: 2222
  login_grace_time: 30s
users:
  alice:
    keys:
      - {_key("alice")}
  bob:
    keys: [{_key("bob")}]
groups:
  sre:
    members: [bob]
targets:
  web1:
    address: 10.0.0.1
    host_key: {_key("web1")}
policies:
  - name: web
    targets: [web1]
    logins: [deploy]
    requesters: [alice, group:sre]
    approvers: [user:bob]
    max_duration: 1h30m
"""


def _check(text: str) -> None:
    try:
        result = parse_config(text, FILENAME)
    except ConfigError as exc:
        assert exc.messages
        for m in exc.messages:
            assert MESSAGE.match(m), m
        return
    assert isinstance(result, Config)


def test_valid_config_is_valid():
    cfg = parse_config(_valid_config(), FILENAME)
    assert cfg.policies[0].max_duration == 5400


YAMLISH = st.lists(st.sampled_from(list(
    "abcdefghijklmnopqrstuvwxyz_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    " \t\n\r-:[]{},.#?|>'\"%@`~+/=\\\x00\x85\u2028\ufeff!&*<") + [
    "ssh", "users", "groups", "targets", "policies", "keys", "members", "name", "approvers",
    "requesters", "logins", "max_duration", "listen_port", "host_key", "host_ca", "address",
    "group:", "user:", "null", "true", "1h", "0s", "\n  ", "\n    - ", ": ", "<<: ", "&a ",
    "*a", "!!str ", "!!binary ", "!!set ", "!!null ", "!x ", "2001-13-01", "0x_", "=", "? "]),
    max_size=120).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text(text):
    _check(text)


@settings(max_examples=300, deadline=None)
@given(YAMLISH)
def test_yaml_like_text(text):
    _check(text)


_EDIT = st.tuples(
    st.sampled_from(["delete", "insert", "replace"]),
    st.floats(min_value=0, max_value=1, exclude_max=True),
    st.sampled_from(list("aZ09_ -:[]{},.#'\"\n\t/+=!&*<|>?")
                    + ["\u00e9", "\x7f", "\u2028", "\x00", "&a ", "*a", "<<: "]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_EDIT, min_size=1, max_size=6))
def test_mutated_valid_config(edits):
    text = _valid_config()
    for op, where, char in edits:
        i = int(where * len(text))
        if op == "delete":
            text = text[:i] + text[i + 1:]
        elif op == "insert":
            text = text[:i] + char + text[i:]
        else:
            text = text[:i] + char + text[i + 1:]
    _check(text)


def test_every_prefix_of_valid_config():
    text = _valid_config()
    for cut in range(len(text) + 1):
        _check(text[:cut])


_LINES = _valid_config().splitlines(keepends=True)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(_LINES) - 1), max_size=8),
       st.permutations(range(len(_LINES))))
def test_lines_dropped_or_shuffled(dropped, order):
    kept = [_LINES[i] for i in range(len(_LINES)) if i not in set(dropped)]
    _check("".join(kept))
    _check("".join(_LINES[i] for i in order))

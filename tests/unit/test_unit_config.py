"""proxy.config.parse_config: a valid file loads; every kind of mistake is a ConfigError whose
message names the file, the 1-based line of the offending key and its dotted path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jitp_unit_support import FILENAME, config_text, line_of, public_key, replace_once
from proxy.config import Config, ConfigError, load_config, parse_config


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, FILENAME)
    messages = info.value.messages
    assert messages, "a ConfigError must carry at least one message"
    assert str(info.value) == "\n".join(messages)
    for m in messages:
        assert re.match(rf"^{re.escape(FILENAME)}:\d+: ", m), m
    return messages


def single_error(text: str) -> str:
    messages = errors_of(text)
    assert len(messages) == 1, messages
    return messages[0]


def test_valid_config_loads():
    cfg = parse_config(config_text(), FILENAME)
    assert isinstance(cfg, Config)
    assert set(cfg.users) == {"alice", "bob", "carol", "mallory"}
    assert cfg.users["alice"].keys == [public_key("alice")]
    assert cfg.users["alice"].full_name == "Alice Example"
    assert cfg.groups["dev"].members == ["alice", "carol"]
    assert cfg.ssh.listen_address == "127.0.0.1" and cfg.ssh.listen_port == 0
    assert cfg.ssh.login_grace_time == 30
    assert cfg.ca.clock_skew == 120
    assert cfg.ca.host_certificate_validity == 86400  # default
    assert cfg.targets["web1"].port == 2022 and cfg.targets["db1"].port == 22
    assert cfg.targets["web1"].host_key == public_key("web1-host")
    assert cfg.targets["db1"].host_ca == public_key("host-ca")
    assert [p.name for p in cfg.policies] == ["web-deploy", "db-admin"]
    assert cfg.policies[0].max_duration == 7200 and cfg.policies[1].max_duration == 1800
    assert cfg.policies[1].allow.port_forwarding is True
    assert cfg.policies[0].allow.port_forwarding is False
    assert cfg.audit_log_path == Path("/tmp/jit-state/audit.jsonl")
    assert cfg.recording_dir == Path("/tmp/jit-state/recordings")


def test_config_is_frozen():
    cfg = parse_config(config_text(), FILENAME)
    with pytest.raises(Exception):
        cfg.state_dir = Path("/elsewhere")  # type: ignore[misc]
    with pytest.raises(Exception):
        cfg.policies[0].max_duration = 1  # type: ignore[misc]


def test_empty_file_is_all_defaults():
    cfg = parse_config("", FILENAME)
    assert cfg.users == {} and cfg.policies == []
    assert cfg.ssh.listen_port == 2222


def test_load_config_reads_file(tmp_path):
    path = tmp_path / "jit.yaml"
    path.write_text(config_text(), encoding="utf-8")
    assert load_config(path).policies[0].name == "web-deploy"


def test_load_config_missing_file_names_it(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "cannot read" in str(info.value)


def test_load_config_errors_name_the_real_path(tmp_path):
    path = tmp_path / "jit.yaml"
    path.write_text("ssh:\n  colour: blue\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.messages == [f"{path}:2: ssh.colour: unknown key"]


def test_unknown_key():
    text = replace_once(config_text(), "  listen_port: 0\n", "  listen_port: 0\n  colour: blue\n")
    assert single_error(text) == f"{FILENAME}:{line_of(text, 'colour')}: ssh.colour: unknown key"


def test_unknown_key_deep_in_a_list():
    text = replace_once(config_text(), "    max_duration: 30m\n",
                        "    max_duration: 30m\n    maximum: 1h\n")
    assert single_error(text) == \
        f"{FILENAME}:{line_of(text, 'maximum')}: policies[1].maximum: unknown key"


def test_a_near_miss_of_a_key_says_which_key_was_meant():
    text = replace_once(config_text(), "    max_duration: 30m\n", "    max_duraton: 30m\n")
    assert single_error(text) == (f"{FILENAME}:{line_of(text, 'max_duraton')}: "
                                  f"policies[1].max_duraton: unknown key (did you mean "
                                  f"'max_duration'?)")
    text = replace_once(config_text(), "  listen_port: 0\n", "  listen_port: 0\n  ciphrs: []\n")
    assert single_error(text).endswith("ssh.ciphrs: unknown key (did you mean 'ciphers'?)")
    text = config_text() + "polices: []\n"  # top level; and no guess for what is far off
    assert single_error(text).endswith("polices: unknown key (did you mean 'policies'?)")


def test_near_misses_in_targets_follow_the_targets_kind_not_its_name():
    # a target named like a PostgreSQL setting (admin, tls) is still a name, not that setting
    text = replace_once(config_text(), "  web1:\n    address: 127.0.0.1\n",
                        "  tls:\n    adress: 127.0.0.1\n    address: 127.0.0.1\n")
    text = text.replace("targets: [web1]", "targets: [tls]")
    assert single_error(text).endswith("targets.tls.adress: unknown key (did you mean "
                                       "'address'?)")
    # an SSH target is not offered a PostgreSQL key; a forgotten kind: postgres is named
    text = replace_once(config_text(), "    description: the web server\n",
                        "    description: the web server\n    databse: x\n")
    assert single_error(text).endswith("targets.web1.databse: unknown key")
    text = replace_once(config_text(), "    description: the web server\n",
                        "    description: the web server\n    database: x\n")
    assert single_error(text).endswith("targets.web1.database: unknown key (a key of postgres "
                                       "targets: is 'kind: postgres' missing?)")


def test_unknown_top_level_key():
    text = config_text() + "extra_section: {}\n"
    assert single_error(text) == \
        f"{FILENAME}:{line_of(text, 'extra_section')}: extra_section: unknown key"


def test_wrong_type():
    text = replace_once(config_text(), "listen_port: 0", "listen_port: abc")
    m = single_error(text)
    assert m.startswith(f"{FILENAME}:{line_of(text, 'listen_port')}: ssh.listen_port: ")
    assert "integer" in m


def test_wrong_type_bool_for_list():
    text = replace_once(config_text(), "logins: [postgres]", "logins: true")
    m = single_error(text)
    assert m.startswith(f"{FILENAME}:{line_of(text, 'logins: true')}: policies[1].logins: ")


def test_out_of_range_port():
    text = replace_once(config_text(), "port: 2022", "port: 70000")
    m = single_error(text)
    assert m.startswith(f"{FILENAME}:{line_of(text, 'port: 70000')}: targets.web1.port: ")
    assert "65535" in m


def test_bad_duration():
    text = replace_once(config_text(), "max_duration: 2h", "max_duration: 2x")
    m = single_error(text)
    assert m.startswith(f"{FILENAME}:{line_of(text, 'max_duration: 2x')}: "
                        f"policies[0].max_duration: invalid duration '2x'")
    assert "15m" in m


@pytest.mark.parametrize("value", ["0", "-5", "0s"])
def test_non_positive_duration(value):
    text = replace_once(config_text(), "clock_skew: 2m", f"clock_skew: {value}")
    m = single_error(text)
    assert m.startswith(f"{FILENAME}:{line_of(text, 'clock_skew')}: ca.clock_skew: ")
    assert "0s" in m


def test_bool_is_not_a_duration():
    text = replace_once(config_text(), "clock_skew: 2m", "clock_skew: true")
    m = single_error(text)
    assert m.startswith(f"{FILENAME}:{line_of(text, 'clock_skew')}: ca.clock_skew: ")


def test_policy_names_unknown_target():
    text = replace_once(config_text(), "targets: [web1]", "targets: [web9]")
    assert single_error(text) == (
        f"{FILENAME}:{line_of(text, 'targets: [web9]')}: policies[0].targets[0]: "
        f"unknown target 'web9' (known: db1, web1)")


def test_policy_names_unknown_target_block_list():
    text = replace_once(config_text(), "      - db1\n", "      - db1\n      - db2\n")
    assert single_error(text) == (
        f"{FILENAME}:{line_of(text, '- db2')}: policies[1].targets[1]: "
        f"unknown target 'db2' (known: db1, web1)")


def test_policy_names_unknown_group():
    text = replace_once(config_text(), "approvers: [group:sre, user:carol]",
                        "approvers: [user:carol, group:ops]")
    assert single_error(text) == (
        f"{FILENAME}:{line_of(text, 'group:ops')}: policies[0].approvers[1]: "
        f"unknown group 'ops' (known: dev, sre)")


def test_policy_names_unknown_user():
    text = replace_once(config_text(), "requesters: [alice]", "requesters: [alicia]")
    assert single_error(text) == (
        f"{FILENAME}:{line_of(text, 'alicia')}: policies[1].requesters[0]: "
        f"unknown user 'alicia' (known: alice, bob, carol, mallory)")


def test_policy_names_unknown_prefixed_user():
    text = replace_once(config_text(), "approvers: [bob]", "approvers: [user:robert]")
    assert single_error(text) == (
        f"{FILENAME}:{line_of(text, 'user:robert')}: policies[1].approvers[0]: "
        f"unknown user 'robert' (known: alice, bob, carol, mallory)")


def test_policy_reference_of_unknown_kind():
    text = replace_once(config_text(), "requesters: [alice]", "requesters: [role:admin]")
    m = single_error(text)
    assert m.startswith(f"{FILENAME}:{line_of(text, 'role:admin')}: policies[1].requesters[0]: ")
    assert "'role:admin'" in m


def test_one_key_under_two_users_is_refused():
    """With the same key, the requester alice could log in as the approver bob and approve
    her own request; the comment after the key does not make it another key."""
    alice_key = public_key("alice")
    text = replace_once(config_text(), f"      - {public_key('bob')}",
                        f"      - {alice_key.split()[0]} {alice_key.split()[1]} bob@laptop")
    assert single_error(text) == (
        f"{FILENAME}:{line_of(text, 'bob@laptop')}: users.bob.keys[0]: the same key as user "
        f"'alice': one key is one person (under two names, one person could approve their "
        f"own requests)")


def test_group_names_unknown_user():
    text = replace_once(config_text(), "members: [bob]", "members: [bobby]")
    assert single_error(text) == (
        f"{FILENAME}:{line_of(text, 'bobby')}: groups.sre.members[0]: "
        f"unknown user 'bobby' (known: alice, bob, carol, mallory)")


def test_duplicate_policy_name():
    text = replace_once(config_text(), "- name: db-admin", "- name: web-deploy")
    assert single_error(text) == (
        f"{FILENAME}:{line_of(text, 'name: web-deploy', 2)}: policies[1].name: "
        f"duplicate policy name 'web-deploy'")


def test_duplicate_key():
    text = replace_once(config_text(), "  listen_port: 0\n", "  listen_port: 0\n  listen_port: 3\n")
    first, second = line_of(text, "listen_port: 0"), line_of(text, "listen_port: 3")
    assert single_error(text) == \
        f"{FILENAME}:{second}: ssh.listen_port: duplicate key (first at line {first})"


def test_duplicate_user():
    text = replace_once(config_text(), "groups:\n", "  alice:\n    keys: [x]\ngroups:\n")
    first, second = line_of(text, "  alice:"), line_of(text, "  alice:", 2)
    assert single_error(text) == \
        f"{FILENAME}:{second}: users.alice: duplicate key (first at line {first})"


def test_invalid_yaml_tab():
    text = replace_once(config_text(), "  sre:\n", "\tsre:\n")
    m = single_error(text)
    assert m.startswith(f"{FILENAME}:{line_of(text, chr(9) + 'sre')}: not valid YAML: ")


def test_invalid_yaml_unclosed_flow_sequence():
    text = replace_once(config_text(), "members: [bob]", "members: [bob")
    m = single_error(text)
    line = int(m.split(":")[1])
    # PyYAML notices the problem where the next token appears: the line after the bracket.
    assert line in (line_of(text, "members: [bob"), line_of(text, "members: [bob") + 1)
    assert "not valid YAML" in m


def test_top_level_not_a_mapping():
    assert single_error("- a\n- b\n") == \
        f"{FILENAME}:1: (top level): expected a mapping of settings"


def test_non_string_key():
    text = "ssh:\n  [a, b]: 1\n"
    assert single_error(text) == f"{FILENAME}:2: ssh: keys must be plain strings"


def test_bad_public_key():
    text = replace_once(config_text(), f"      - {public_key('bob')}\n",
                        "      - ssh-ed25519 AAAAnotakey\n")
    m = single_error(text)
    assert m.startswith(f"{FILENAME}:{line_of(text, 'AAAAnotakey')}: users.bob.keys[0]: "
                        f"not an OpenSSH public key")


def test_user_without_keys():
    text = replace_once(config_text(), f"    keys: [{public_key('mallory')}]\n",
                        "    full_name: M\n")
    m = single_error(text)
    assert m.startswith(f"{FILENAME}:{line_of(text, '  mallory:')}: users.mallory.keys: ")
    assert "every auth.methods chain needs publickey" in m


def test_user_without_keys_is_fine_when_a_chain_needs_no_key():
    text = replace_once(config_text(), f"    keys: [{public_key('mallory')}]\n",
                        "    full_name: M\n")
    text = "auth:\n  methods: [publickey, keyboard-interactive]\n" + text
    config = parse_config(text, FILENAME)
    assert config.users["mallory"].keys == []


@pytest.mark.parametrize("chain, problem", [
    ("publickey,otp", "unknown method 'otp'"),
    ("password,password", "appears twice"),
    ("", "unknown method ''"),
])
def test_bad_auth_methods_name_the_key_and_line(chain, problem):
    text = f"auth:\n  methods: [publickey, {chain!r}]\n" + config_text()
    m = single_error(text)
    assert m.startswith(f"{FILENAME}:2: auth.methods[1]: "), m
    assert problem in m


def test_target_needs_exactly_one_trust_anchor():
    text = replace_once(config_text(), f"    host_ca: {public_key('host-ca')}\n", "")
    m = single_error(text)
    assert m.startswith(f"{FILENAME}:{line_of(text, '  db1:')}: targets.db1: ")
    assert "host_key" in m and "host_ca" in m


def test_bad_user_name():
    text = replace_once(config_text(), "  bob:\n", "  Bob:\n")
    m = single_error(text)
    assert m.startswith(f"{FILENAME}:{line_of(text, '  Bob:')}: users.Bob")


def test_every_problem_is_reported():
    text = (config_text().replace("listen_port: 0", "listen_port: 70000")
            .replace("max_duration: 2h", "max_duration: 0")
            .replace("  login_grace_time: 30s\n", "  login_grace_time: 30s\n  colour: red\n"))
    messages = errors_of(text)
    assert len(messages) == 3, messages
    joined = "\n".join(messages)
    assert f"{FILENAME}:{line_of(text, 'listen_port')}: ssh.listen_port:" in joined
    assert f"{FILENAME}:{line_of(text, 'max_duration: 0')}: policies[0].max_duration:" in joined
    assert f"{FILENAME}:{line_of(text, 'colour')}: ssh.colour: unknown key" in joined


def test_every_reference_problem_is_reported():
    text = (config_text().replace("targets: [web1]", "targets: [web9]")
            .replace("members: [bob]", "members: [bobby]"))
    messages = errors_of(text)
    assert len(messages) == 2, messages


def test_default_filename():
    with pytest.raises(ConfigError) as info:
        parse_config("ssh: {colour: 1}\n")
    assert info.value.messages == ["<config>:1: ssh.colour: unknown key"]


# --- Config.matches / groups_of ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg() -> Config:
    return parse_config(config_text(), FILENAME)


@pytest.mark.parametrize("user, refs, expected", [
    ("alice", ["alice"], True),
    ("alice", ["user:alice"], True),
    ("alice", ["group:dev"], True),
    ("bob", ["group:sre"], True),
    ("alice", ["group:sre"], False),
    ("alice", ["bob", "user:carol"], False),
    ("alice", ["bob", "group:dev"], True),
    ("alice", ["group:alice"], False),     # a user name is not a group
    ("sre", ["group:sre"], False),         # nor is a group name a user
    ("alice", ["role:alice"], False),      # unknown kinds never match
    ("alice", [], False),
    ("mallory", ["group:dev", "group:sre"], False),
    ("carol", ["group:sre", "user:carol"], True),
])
def test_matches(cfg, user, refs, expected):
    assert cfg.matches(user, refs) is expected


def test_groups_of(cfg):
    assert cfg.groups_of("alice") == {"dev"}
    assert cfg.groups_of("bob") == {"sre"}
    assert cfg.groups_of("mallory") == set()


# --- YAML that PyYAML composes but cannot turn into values ----------------------------------------
# (These once escaped parse_config as ConstructorError / ValueError / RecursionError; found by the
# fuzz tests, fixed in proxy/config.py. Each must be a ConfigError naming file, line and key.)

@pytest.mark.parametrize("text, line, path, words", [
    ("state_dir: !foo bar\n", 1, "state_dir", "'!foo'"),
    ("state_dir: !!python/object:os.system x\n", 1, "state_dir", "python/object"),
    ("ssh:\n  listen_address: !!binary AAAA\n  listen_port: !local 5\n", 3, "ssh.listen_port",
     "'!local'"),
    ("state_dir: 2001-13-01\n", 1, "state_dir", "month"),
    ("users:\n  alice:\n    full_name: 2001-02-30\n", 3, "users.alice.full_name", "day"),
    ("ssh:\n  listen_port: 0x_\n", 2, "ssh.listen_port", "int"),
    ("ssh:\n  listen_port: !!int abc\n", 2, "ssh.listen_port", "'abc'"),
    ("ssh:\n  listen_port: !!float abc\n", 2, "ssh.listen_port", "'abc'"),
    ("users:\n  alice:\n    full_name: =\n", 3, "users.alice.full_name", "value"),
    ("=\n", 1, "(top level)", "value"),
])
def test_unreadable_scalar_is_a_config_error(text, line, path, words):
    messages = errors_of(text)
    assert any(m.startswith(f"{FILENAME}:{line}: {path}: ") and words in m for m in messages), \
        messages


def test_tagged_key_is_a_config_error():
    messages = errors_of("ssh:\n  !foo listen_port: 5\n")
    assert all(m.startswith(f"{FILENAME}:2: ssh") for m in messages), messages


def test_merge_key_loads():
    text = config_text()
    text = replace_once(text, "  web1:\n    address: 127.0.0.1\n",
                        "  web1: &web\n    address: 127.0.0.1\n")
    text = replace_once(text, "  db1:\n    address: db1.internal\n",
                        "  web2:\n    <<: *web\n    port: 2023\n"
                        "  db1:\n    address: db1.internal\n")
    cfg = parse_config(text, FILENAME)
    web1, web2 = cfg.targets["web1"], cfg.targets["web2"]
    assert (web2.address, web2.host_key, web2.description) == \
        (web1.address, web1.host_key, web1.description)
    assert (web1.port, web2.port) == (2022, 2023)  # own keys override merged ones


def test_bad_merge_key():
    m = single_error("ssh:\n  listen_port: 1\n  <<: 5\n")
    assert m.startswith(f"{FILENAME}:2: ssh: bad merge key")


def test_alias_reuses_a_value():
    text = replace_once(config_text(), "members: [bob]", "members: &ops [bob]")
    text = replace_once(text, "    members:\n      - alice\n      - carol\n",
                        "    members: *ops\n")
    cfg = parse_config(text, FILENAME)
    assert cfg.groups["dev"].members == ["bob"]


def test_recursive_alias():
    assert single_error("ssh: &x [*x]\n") == f"{FILENAME}:1: ssh[0]: recursive alias"


@pytest.mark.parametrize("depth", [40, 600])
def test_deep_nesting(depth):
    m = single_error("ssh: " + "[" * depth + "]" * depth + "\n")
    assert m.startswith(f"{FILENAME}:1: ")
    assert "nested" in m


def test_load_config_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "jit.yaml"
    path.write_bytes(b"ssh:\n  listen_address: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.messages == [f"{path}:2: not UTF-8 text"]


def test_load_config_refuses_huge_file(tmp_path):
    path = tmp_path / "jit.yaml"
    with open(path, "wb") as f:
        f.write(b"# " + b"x" * (5 * 1024 * 1024) + b"\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "larger than" in str(info.value)


@pytest.mark.parametrize("text", [
    "ssh:\n  listen_port: !!int\n",
    "ssh:\n  listen_port: !!float ''\n",
    "recording:\n  terminal: !!bool maybe\n",
    "state_dir: !!timestamp soon\n",
    "!!int\n",
])
def test_bug_explicit_core_tag_on_unreadable_value(text):
    messages = errors_of(text)
    assert all("cannot read this value" in m for m in messages), messages



def test_nested_aliases_are_built_once_not_expanded_exponentially():
    # "billion laughs": each level refers to the previous one nine times
    lines = ["a0: &a0 [x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i-1}"] * 9) + "]")
    text = "\n".join(lines) + "\n"
    import time as _time
    t0 = _time.monotonic()
    with pytest.raises(ConfigError) as info:
        parse_config(text, "laughs.yaml")
    assert _time.monotonic() - t0 < 5  # 9**8 values if expanded; shared when built once
    assert "laughs.yaml:1: a0: unknown key" in str(info.value)


def test_committed_json_schema_matches_the_models():
    import json
    from pathlib import Path

    from proxy.config import Config
    path = Path(__file__).resolve().parents[2] / "config" / "jit-proxy.schema.json"
    assert json.loads(path.read_text()) == Config.model_json_schema(), (
        "config/jit-proxy.schema.json is stale: regenerate it from proxy.config.Config")


def test_a_ca_passphrase_file_others_may_read_is_refused(tmp_path):
    passphrase = tmp_path / "ca.passphrase"
    passphrase.write_text("correct horse\n")
    passphrase.chmod(0o640)
    text = replace_once(config_text(), "  clock_skew: 2m\n",
                        f"  clock_skew: 2m\n  passphrase_file: {passphrase}\n")
    assert single_error(text) == (
        f"{FILENAME}:{line_of(text, 'passphrase_file')}: ca.passphrase_file: {passphrase} is "
        f"accessible by group or others (mode 0640); run 'chmod 600 {passphrase}'")
    passphrase.chmod(0o600)
    assert parse_config(text, FILENAME).ca.passphrase_file == passphrase


def test_an_unknown_or_weak_cipher_is_refused_before_the_daemon_starts():
    """check-config said ok to any name; serve then died with a traceback (an unknown name) or
    offered CBC alone (a weak one)."""
    for name in ("foo-cipher", "aes128-cbc", "3des-cbc"):
        text = replace_once(config_text(), "  login_grace_time: 30s\n",
                            f"  login_grace_time: 30s\n"
                            f"  ciphers: [aes128-gcm@openssh.com, {name}]\n")
        m = single_error(text)
        assert m.startswith(f"{FILENAME}:{line_of(text, 'ciphers')}: ssh.ciphers: unknown or weak "
                            f"cipher {name!r} (choose from: "), m
        assert "aes128-gcm@openssh.com" in m and "aes128-ctr" in m
    text = replace_once(config_text(), "  login_grace_time: 30s\n",
                        "  login_grace_time: 30s\n  ciphers: [chacha20-poly1305@openssh.com]\n")
    assert parse_config(text, FILENAME).ssh.ciphers == ["chacha20-poly1305@openssh.com"]


def test_the_warning_about_too_few_approvers_names_those_besides_the_requester():
    from proxy.config import warnings
    text = replace_once(config_text(), "    approvers: [group:sre, user:carol]\n",
                        "    approvers: [group:sre, user:carol]\n    approvals: 2\n")
    # alice has bob and carol; carol, who may approve too, only bob
    assert warnings(parse_config(text, FILENAME)) == [
        (("policies", 0, "approvers"), "requests of carol need 2 approver(s) other than the "
                                       "requester, but only bob may approve")]


@pytest.mark.parametrize("old,new,where,says", [
    ("state_dir: /tmp/jit-state\n", "state_dir: jit-state\n", ("state_dir",),
     "jit-state is relative"),
    ("  login_grace_time: 30s\n", "  login_grace_time: 30s\n  host_names: [jit-proxy, localhost]\n",
     ("ssh", "host_names", 1), "localhost: the proxy's host certificate would vouch for every "
                               "host"),
    ("  sre:\n    members: [bob]\n", "  sre:\n    members: [bob]\n  empty:\n    members: []\n",
     None, None),  # (a group nobody requests through: nothing to say)
    ("    requesters: [alice]\n", "    requesters: [group:empty]\n", ("policies", 1, "requesters", 0),
     "group empty has no members: nobody may request through it"),
    ("    max_duration: 2h\n", "    max_duration: 2h\n    auto_approve: {requesters: [bob]}\n",
     ("policies", 0, "auto_approve", "requesters"), "none of these may request under this policy"),
    ("state_dir: /tmp/jit-state\n", "state_dir: /tmp/jit-state\ndaemon:\n  metrics_listen: "
                                    "0.0.0.0:9187\n", ("daemon", "metrics_listen"),
     "0.0.0.0 is not a loopback address"),
    ("state_dir: /tmp/jit-state\n", "state_dir: /tmp/jit-state\nnotifications:\n  webhook_url: "
                                    "http://hooks.example/x\n", ("notifications", "webhook_url"),
     "http: who asks for what, and why, crosses the network unencrypted"),
], ids=["relative-state-dir", "localhost-host-name", "unused-empty-group", "empty-requester-group",
        "dead-auto-approve", "metrics-on-all", "http-webhook"])
def test_risky_or_ineffective_settings_are_warned_about(old, new, where, says):
    """Found by a newcomer run-through: each of these passed check-config without a word."""
    from proxy.config import warnings
    text = config_text()
    if "group:empty" in new:
        text = replace_once(text, "  sre:\n    members: [bob]\n",
                            "  sre:\n    members: [bob]\n  empty:\n    members: []\n")
    got = warnings(parse_config(replace_once(text, old, new), FILENAME))
    if where is None:
        assert got == []
    else:
        assert [w for w in got if w[0] == where and says in w[1]], got


def test_nothing_to_serve_and_unverified_postgres_tls_are_warned_about():
    from proxy.config import warnings
    got = warnings(parse_config("state_dir: /tmp/x\n", FILENAME))
    assert got == [(("users",), "no users and no targets and no policies: the proxy would let "
                                "nobody reach anything")]
    for mode, says in (("disable", "cross the network unencrypted; use verify-full"),
                       ("require", "to a server nobody checked"), ("verify-full", None)):
        text = replace_once(config_text(), "\ntargets:\n", f"""\ntargets:
  orders:
    kind: postgres
    address: 127.0.0.1
    database: orders
    admin: {{user: jit_admin, password_file: /nonexistent}}
    roles: {{read: [orders_reader]}}
    owner: orders_owner
    tls: {{mode: {mode}}}
""")
        got = [w for w in warnings(parse_config(text, FILENAME))
               if w[0] == ("targets", "orders", "tls", "mode")]
        assert [says in w[1] for w in got] == ([True] if says else []), got
    text = replace_once(config_text(), "\ntargets:\n", """\ntargets:
  orders:
    kind: postgres
    address: 127.0.0.1
    database: orders
    admin: {user: jit_admin, password_file: /nonexistent}
    roles: {all: [postgres], admin: [jit_admin], read: [orders_reader]}
    owner: orders_owner
""")
    got = [w for w in warnings(parse_config(text, FILENAME)) if w[0][:3] == ("targets", "orders",
                                                                             "roles")]
    assert [w[0] for w in got] == [("targets", "orders", "roles", "all", 0),
                                   ("targets", "orders", "roles", "admin", 0)], got
    assert "a member may SET ROLE postgres" in got[0][1]

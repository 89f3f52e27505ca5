"""The configuration file: pydantic models of the YAML and a loader whose errors name key and line.

What it is for: turning one YAML file into a frozen, fully validated ``Config`` (types, durations,
public keys, and references between sections such as a policy naming a target or a group), or into a
``ConfigError`` whose every message reads ``FILE:LINE: key.path: what is wrong``.

What it must not do: touch anything outside the file it reads (no key generation, no directories);
hold secrets (passphrases and passwords are referenced by file path, never inlined).
"""

from __future__ import annotations

import difflib
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import asyncssh
import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag,
                      PrivateAttr, ValidationError,
                      field_validator, model_validator)

from proxy.access.duration import MAX_DURATION, parse_duration

NAME_PATTERN = r"^[a-z_][a-z0-9_.-]{0,63}$"


def _duration(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 15m, 2h")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a duration must be longer than 0s")
        if value > MAX_DURATION:
            raise ValueError(f"a duration must be at most {MAX_DURATION}s (366 days)")
        return value
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError("expected a duration like 30s, 15m, 2h")


Duration = Annotated[int, BeforeValidator(_duration)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


def _public_key(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected an OpenSSH public key line")
    try:
        asyncssh.import_public_key(value)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ValueError(f"not an OpenSSH public key: {exc}") from None
    return value.strip()


PublicKey = Annotated[str, BeforeValidator(_public_key)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SSHListener(_Model):
    listen_address: str = "0.0.0.0"
    listen_port: int = Field(2222, ge=0, le=65535)
    # the host certificate's principals: the names clients use for the proxy (no "localhost":
    # the proxy's host CA would vouch for every host a client reaches by that name)
    host_names: list[str] = Field(default_factory=lambda: ["jit-proxy"], min_length=1)
    login_grace_time: Duration = 30
    max_sessions_per_connection: int = Field(10, ge=1, le=1000)
    # like sshd's MaxAuthTries: failed attempts (keys offered, PAM logins) before the
    # connection is closed
    max_auth_tries: int = Field(6, ge=1, le=100)
    # like sshd's MaxStartups: connections that have not authenticated yet, in all and per address
    max_unauthenticated: int = Field(256, ge=1, le=100_000)
    max_unauthenticated_per_address: int = Field(32, ge=1, le=100_000)
    # ciphers offered to clients; the client's order decides among them, so offering only
    # AES-GCM keeps OpenSSH (chacha20 first) on a cipher that runs in OpenSSL. Add
    # "chacha20-poly1305@openssh.com" or "aes128-ctr" for clients without AES-GCM.
    ciphers: list[str] = Field(default_factory=lambda: ["aes128-gcm@openssh.com",
                                                        "aes256-gcm@openssh.com"], min_length=1)

    @field_validator("ciphers")
    @classmethod
    def _known_ciphers(cls, value: list[str]) -> list[str]:
        """Only what asyncssh enables by default (AEAD and CTR): CBC, 3DES, Blowfish, CAST
        and RC4 are refused, as OpenSSH no longer offers them either."""
        from asyncssh.encryption import get_default_encryption_algs
        known = [a.decode() for a in get_default_encryption_algs()]
        for name in value:
            if name not in known:
                raise ValueError(f"unknown or weak cipher {name!r} (choose from: "
                                 f"{', '.join(known)})")
        return value


class DaemonSettings(_Model):
    # after SIGTERM: stop accepting, let live sessions finish this long, then close them
    drain_time: Duration = 30
    # the local admin socket of `jit-proxy status`, `sessions kill`, `grants revoke` and
    # `recordings` (default STATE_DIR/admin.sock); root and members of admin_group may use it
    admin_socket: Path | None = None
    admin_group: str | None = None
    # Prometheus text endpoint, "ADDRESS:PORT" (off when unset); keep it on a local address
    metrics_listen: str | None = Field(None, pattern=r"^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")


AUTH_METHODS = ("publickey", "keyboard-interactive", "password")


def _auth_chain(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected methods joined by commas, e.g. publickey,keyboard-interactive")
    methods = [m.strip() for m in value.split(",")]
    for m in methods:
        if m not in AUTH_METHODS:
            raise ValueError(f"unknown method {m!r} (known: {', '.join(AUTH_METHODS)})")
    if len(set(methods)) != len(methods):
        raise ValueError("a method appears twice in one chain")
    return ",".join(methods)


AuthChain = Annotated[str, BeforeValidator(_auth_chain)]


class PamSettings(_Model):
    # the PAM service (a file in /etc/pam.d; config/pam.d/jit-proxy is an example)
    service: str = Field("jit-proxy", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # the PAM library; tests load pam_wrapper's libpam_wrapper.so here
    library: str = Field("libpam.so.0", min_length=1)
    # longest one PAM login may take in all (a module waiting on a directory that does not
    # answer): then it fails as the system's fault, not counted against the user
    timeout: Duration = 90


class AuthSettings(_Model):
    # like sshd's AuthenticationMethods: a login must complete one of these chains, each a list
    # of methods joined by commas, in order (e.g. "publickey,keyboard-interactive")
    methods: list[AuthChain] = Field(default_factory=lambda: ["publickey"], min_length=1)
    pam: PamSettings = PamSettings()
    # where users and groups come from: this file only, or also the system (NSS: passwd/group),
    # so policies can name system users and groups such as group:sre
    identities: Literal["config", "system"] = "config"
    # repeated failed logins within failure_window lock further attempts out for lockout, even
    # with the right credentials: a user's failed passwords (PAM) lock that user's password
    # logins; failures of any kind from one address (keys and one-time secrets count only here,
    # since nobody can guess them) lock every login from that address
    max_failures: int = Field(5, ge=1, le=1000)
    # an address is shared by many people behind NAT: it gets a larger allowance
    max_failures_per_address: int = Field(20, ge=1, le=100_000)
    failure_window: Duration = 600
    lockout: Duration = 900


class Notifications(_Model):
    # a JSON POST for every new pending request (retried with backoff; never blocks the request)
    webhook_url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")] | None = None
    webhook_attempts: int = Field(6, ge=1, le=20)
    webhook_timeout: Duration = 10


class CASettings(_Model):
    passphrase_file: Path | None = None
    clock_skew: Duration = 120
    host_certificate_validity: Duration = 86400


class AuditSettings(_Model):
    log: Path | None = None  # default: STATE_DIR/audit.jsonl


class RecordingSettings(_Model):
    dir: Path | None = None  # default: STATE_DIR/recordings
    terminal: bool = True


class User(_Model):
    keys: list[PublicKey] = Field(default_factory=list)  # none: PAM methods only
    full_name: str | None = None


class Group(_Model):
    members: list[Name] = Field(default_factory=list)
    description: str | None = None


def _address(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError("expected a host name or IP address")
    return value


Address = Annotated[str, BeforeValidator(_address)]


class SSHTarget(_Model):
    kind: Literal["ssh"] = "ssh"
    address: Address
    port: int = Field(22, ge=1, le=65535)
    host_key: PublicKey | None = None
    host_ca: PublicKey | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _trust(self) -> "SSHTarget":
        if (self.host_key is None) == (self.host_ca is None):
            raise ValueError("give exactly one of host_key (a pinned key) or host_ca "
                             "(a CA whose host certificates are trusted)")
        return self


class PostgresAdmin(_Model):
    """How the proxy logs in to create and drop ephemeral roles (needs CREATEROLE, and the
    right to terminate backends and reassign objects: a superuser or pg_signal_backend)."""

    user: str = Field(min_length=1, max_length=63)
    password_file: Path
    database: str = "postgres"


class PostgresTLS(_Model):
    """TLS from the proxy to the target. ``verify-full`` checks the chain and the host name."""

    mode: Literal["verify-full", "verify-ca", "require", "disable"] = "verify-full"
    ca_file: Path | None = None   # default: the system's trust store
    server_name: str | None = None  # default: the target's address


class PostgresTarget(_Model):
    kind: Literal["postgres"]
    address: Address
    port: int = Field(5432, ge=1, le=65535)
    database: str = Field(min_length=1, max_length=63)
    admin: PostgresAdmin
    # what a grant may be given: name -> existing roles the ephemeral role becomes a member of
    roles: dict[Name, list[Annotated[str, Field(min_length=1, max_length=63)]]] = \
        Field(min_length=1)
    # who gets what an ephemeral role created: as a member of the grant's leftovers role (the
    # ephemeral role's name and "-left", no privileges of its own), which owns the objects
    owner: str = Field(min_length=1, max_length=63)
    tls: PostgresTLS = PostgresTLS()
    # how users log in to the proxy's port for this target: the grant's one-time secret from
    # db-login (SCRAM), or their password checked by PAM (auth.pam; cleartext inside TLS only)
    client_auth: Literal["secret", "pam"] = "secret"
    # with client_auth: pam, the PAM service for this target (default: auth.pam.service); psql
    # sends one password, so this service must ask one question only (no one-time code)
    pam_service: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None


def _target_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("kind", "ssh")
    return getattr(value, "kind", None)


TARGET_KINDS = ("ssh", "postgres")
Target = Annotated[Union[Annotated[SSHTarget, Tag("ssh")], Annotated[PostgresTarget, Tag("postgres")]],
                   Discriminator(_target_kind)]


class PostgresListener(_Model):
    """The proxy's PostgreSQL port: psql connects here with dbname = a target's name."""

    listen_address: str = "0.0.0.0"
    listen_port: int = Field(6432, ge=0, le=65535)
    # names clients use for the proxy: the TLS certificate's subject alternative names
    host_names: list[str] = Field(default_factory=lambda: ["jit-proxy", "localhost"],
                                  min_length=1)
    role_prefix: str = Field("jit_", pattern=r"^[a-z_][a-z0-9_]{0,15}$")
    # how long the one-time secret printed by `db-login` stays usable
    secret_ttl: Duration = 600
    max_message_length: int = Field(64 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024 - 1)


class Permissions(_Model):
    agent_forwarding: bool = False
    port_forwarding: bool = False
    x11_forwarding: bool = False


class AutoApprove(_Model):
    """Requests matching every list given here are approved by the policy itself (audited as an
    approval by ``policy:NAME``): e.g. the on-call group, or targets marked low-risk."""

    requesters: list[str] = Field(default_factory=list)
    targets: list[Name] = Field(default_factory=list)

    def covers(self, config: "Config", requester: str, target: str) -> bool:
        """Whether this rule approves ``requester``'s requests for ``target`` by itself."""
        if self.requesters and not config.matches(requester, self.requesters):
            return False
        return not self.targets or target in self.targets

    @model_validator(mode="after")
    def _something(self) -> "AutoApprove":
        if not self.requesters and not self.targets:
            raise ValueError("give requesters, targets or both (an empty rule would approve "
                             "every request)")
        return self


def _regex(value: Any) -> Any:
    if value is not None:
        import re
        try:
            re.compile(value)
        except (re.error, TypeError) as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
    return value


class Policy(_Model):
    name: Name
    targets: list[Name] = Field(min_length=1)
    # SSH targets: the accounts that may be requested (the certificate's only principal)
    logins: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")]] = \
        Field(default_factory=list)
    # PostgreSQL targets: the names under the target's ``roles`` that may be requested
    roles: list[Name] = Field(default_factory=list)
    requesters: list[str] = Field(min_length=1)
    approvers: list[str] = Field(min_length=1)
    max_duration: Duration = 3600
    allow: Permissions = Permissions()
    # distinct approvers needed before a grant exists
    approvals: int = Field(1, ge=1, le=10)
    # a pending request expires this long after it was made (independent of max_duration)
    request_ttl: Duration = 86400
    # the reason must match this regular expression (e.g. a ticket id: "INC-[0-9]+")
    reason_pattern: Annotated[str | None, BeforeValidator(_regex)] = None
    auto_approve: AutoApprove | None = None
    # when the granted time starts: at approval, or at the first session (an unused grant then
    # lapses request_ttl after approval)
    window_starts: Literal["approval", "first_use"] = "approval"
    # `extend GRANT --for D` takes effect at once (no approval) when true
    self_extend: bool = False


class Config(_Model):
    _system_groups: Any = PrivateAttr(default=None)
    state_dir: Path = Path("/var/lib/jit-proxy")
    daemon: DaemonSettings = DaemonSettings()
    notifications: Notifications | None = None
    auth: AuthSettings = AuthSettings()
    ssh: SSHListener = SSHListener()
    ca: CASettings = CASettings()
    audit: AuditSettings = AuditSettings()
    recording: RecordingSettings = RecordingSettings()
    users: dict[Name, User] = Field(default_factory=dict)
    groups: dict[Name, Group] = Field(default_factory=dict)
    postgres: PostgresListener | None = None  # no PostgreSQL port unless configured
    targets: dict[Name, Target] = Field(default_factory=dict)
    policies: list[Policy] = Field(default_factory=list)

    @property
    def audit_log_path(self) -> Path:
        return self.audit.log or self.state_dir / "audit.jsonl"

    @property
    def admin_socket_path(self) -> Path:
        return self.daemon.admin_socket or self.state_dir / "admin.sock"

    @property
    def recording_dir(self) -> Path:
        return self.recording.dir or self.state_dir / "recordings"

    def groups_of(self, user: str) -> set[str]:
        """The user's groups in this file, plus (``auth.identities: system``) the system groups
        the proxy resolved when the user last logged in (see ``bind_system_groups``)."""
        groups = {g for g, group in self.groups.items() if user in group.members}
        if self.auth.identities == "system" and self._system_groups is not None:
            groups |= self._system_groups(user)
        return groups

    def bind_system_groups(self, lookup: Any) -> None:
        """Use ``lookup(user) -> set[str]`` (no I/O: a cache filled at login) for system groups."""
        self._system_groups = lookup

    def matches(self, user: str, refs: list[str]) -> bool:
        """Whether ``user`` is named by ``refs`` (``alice``, ``user:alice`` or ``group:sre``)."""
        groups = self.groups_of(user)
        for ref in refs:
            kind, _, name = ref.rpartition(":")
            if kind == "group" and name in groups:
                return True
            if kind in ("", "user") and name == user:
                return True
        return False


class ConfigError(Exception):
    """The file is not a valid configuration; ``messages`` are ``FILE:LINE: key: problem`` lines."""

    def __init__(self, messages: list[str]):
        super().__init__("\n".join(messages))
        self.messages = messages


# --- YAML with line numbers ------------------------------------------------------------------

Path_ = tuple[Any, ...]


MAX_DEPTH = 32
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_NODES = 200_000
_MAP_TAG, _SEQ_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Builder:
    """Builds plain Python data from a composed YAML node tree, remembering each key's line and
    collecting every problem (unknown tags, unreadable scalars, duplicate keys, recursive aliases,
    excessive nesting) as ``(path, line, message)`` instead of raising."""

    def __init__(self) -> None:
        self.loader = yaml.SafeLoader("")
        self.lines: dict[Path_, int] = {}
        self.errors: list[tuple[Path_, int, str]] = []
        self._active: set[int] = set()
        self._built: dict[int, Any] = {}
        self._count = 0

    def _error(self, path: Path_, node: yaml.Node, message: str) -> None:
        self.errors.append((path, node.start_mark.line + 1, message))

    def _scalar(self, node: yaml.Node, path: Path_) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except Exception as exc:  # PyYAML's constructors raise many kinds on odd scalars
            problem = getattr(exc, "problem", None) or str(exc) or type(exc).__name__
            self._error(path, node, f"cannot read this value: {problem}")
            return None

    def build(self, node: yaml.Node, path: Path_ = ()) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        self._count += 1
        if self._count > MAX_NODES:
            if self._count == MAX_NODES + 1:
                self._error(path, node, f"more than {MAX_NODES} values (aliases expanded)")
            return None
        if id(node) in self._built:  # an alias of a node already built: share the value
            return self._built[id(node)]
        if len(path) > MAX_DEPTH:
            self._error(path, node, f"nested deeper than {MAX_DEPTH} levels")
            return None
        if id(node) in self._active:
            self._error(path, node, "recursive alias")
            return None
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if node.tag not in (_MAP_TAG, _SEQ_TAG):
            self._error(path, node, f"unsupported YAML tag {node.tag!r}")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                value: Any = [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
            else:
                value = self._mapping(node, path)
        finally:
            self._active.discard(id(node))
        self._built[id(node)] = value
        return value

    def _key(self, key_node: yaml.Node, path: Path_) -> str | None:
        if isinstance(key_node, yaml.ScalarNode):
            key = self._scalar(key_node, path)
            if isinstance(key, (str, int)) and not isinstance(key, bool):
                return str(key)
        self._error(path, key_node, "keys must be plain strings")
        return None

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict[str, Any]:
        own = [(k, v) for k, v in node.value if k.tag != _MERGE_TAG]
        try:
            self.loader.flatten_mapping(node)  # resolves "<<: *anchor" merge keys
        except yaml.YAMLError as exc:
            self._error(path, node, f"bad merge key: {getattr(exc, 'problem', exc)}")
            return {}
        merged = node.value[:len(node.value) - len(own)]
        out: dict[str, Any] = {}
        for key_node, value_node in merged:  # merged keys: later ones win, own keys override
            key = self._key(key_node, path)
            if key is not None:
                out[key] = self.build(value_node, path + (key,))
        seen: dict[str, int] = {}
        for key_node, value_node in own:
            key = self._key(key_node, path)
            if key is None:
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                self.errors.append((path + (key,), line, f"duplicate key (first at line "
                                                         f"{seen[key]})"))
                continue
            seen[key] = line
            self.lines[path + (key,)] = line
            out[key] = self.build(value_node, path + (key,))
            self.lines[path + (key,)] = line
        return out


def format_path(path: Path_) -> str:
    """``('policies', 0, 'targets', 1)`` as ``policies[0].targets[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _line_for(path: Path_, lines: dict[Path_, int]) -> int:
    for i in range(len(path), -1, -1):
        if path[:i] in lines:
            return lines[path[:i]]
    return 1


def load_config(path: Path | str) -> Config:
    """Read and validate the YAML configuration at ``path``.

    Returns:
        the frozen ``Config``.
    Raises:
        ConfigError: every problem found, each as ``FILE:LINE: key.path: message``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a configuration"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text"]) from None
    return parse_config(text, str(path))


def parse_config(text: str, filename: str = "<config>") -> Config:
    """Validate YAML ``text``; ``filename`` is only used in messages. Raises ``ConfigError``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{filename}:{line}: not valid YAML: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"{filename}:1: not valid YAML: nested too deeply"]) from None
    builder = _Builder()
    data = {} if root is None else builder.build(root)
    lines = builder.lines
    messages = [f"{filename}:{line}: {format_path(p)}: {msg}" for p, line, msg in builder.errors]
    if messages:
        raise ConfigError(messages)
    if not isinstance(data, dict):
        raise ConfigError([f"{filename}:1: (top level): expected a mapping of settings"])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = given = tuple(err["loc"])
            if loc[:1] == ("targets",) and len(loc) > 2 and loc[2] in TARGET_KINDS:
                loc = loc[:2] + loc[3:]  # pydantic puts the union's tag in the path
            msg = err["msg"].removeprefix("Value error, ")
            if loc and loc[-1] == "[key]":  # a mapping key (a user, group or target name)
                loc = loc[:-1]
            if err["type"] == "string_pattern_mismatch" and \
                    err.get("ctx", {}).get("pattern") == NAME_PATTERN:
                msg = (f"invalid name {err['input']!r}: use lowercase letters, digits, '_', '.' "
                       f"and '-', starting with a letter or '_' (at most 64)")
            elif err["type"] == "extra_forbidden":
                msg = "unknown key" + _did_you_mean(given)
            elif err["type"] == "union_tag_invalid":
                loc = loc + ("kind",)
                msg = (f"unknown kind {err['ctx']['tag']!r} (known: "
                       f"{', '.join(TARGET_KINDS)})")
            messages.append(f"{filename}:{_line_for(loc, lines)}: {format_path(loc)}: {msg}")
        raise ConfigError(messages) from None
    for loc, msg in _reference_problems(config) + _secret_file_problems(config):
        messages.append(f"{filename}:{_line_for(loc, lines)}: {format_path(loc)}: {msg}")
    if messages:
        raise ConfigError(messages)
    return config


def _step(annotation: Any, part: Any) -> list[Any]:
    """The types one step of a pydantic error location leads to from ``annotation``: a field of
    a model, the value of a mapping (``part`` is its key), an item of a list (an index), or the
    arm of a tagged union (``part`` is the tag, as pydantic puts it in the location)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _step(args[0], part)
    if origin is Union:
        tagged = [a for a in args if get_origin(a) is Annotated
                  and any(isinstance(m, Tag) and m.tag == part for m in get_args(a)[1:])]
        if tagged:
            return [get_args(tagged[0])[0]]
        return [t for a in args for t in _step(a, part)]
    if origin is dict:
        return [args[1]]
    if origin in (list, tuple, set, frozenset):
        return [args[0]]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
            and isinstance(part, str) and part in annotation.model_fields:
        return [annotation.model_fields[part].annotation]
    return []


def _models_in(annotation: Any) -> set[type[BaseModel]]:
    """The models an annotation holds (``Model``, ``A | None``, ``Annotated[...]``), one level."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation}
    if get_origin(annotation) in (Annotated, Union):
        return set().union(*map(_models_in, get_args(annotation)))
    return set()


def _did_you_mean(loc: tuple) -> str:
    """`` (did you mean 'KEY'?)`` for an unknown key at pydantic's error location ``loc`` that
    is a near miss of a key valid at that place (``max_duraton``); for a target, a key of the
    other kind says so (``kind: postgres`` forgotten); else ``""``."""
    types: list[Any] = [Config]
    for part in loc[:-1]:
        types = [t for a in types for t in _step(a, part)]
    key = str(loc[-1])
    known = {name for t in types for m in _models_in(t) for name in m.model_fields} - {key}
    near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    if near:
        return f" (did you mean {near[0]!r}?)"
    if loc[:1] == ("targets",) and len(loc) == 4 and loc[2] in TARGET_KINDS:
        other = [k for k in TARGET_KINDS if k != loc[2] and key in _step(Target, k)[0].model_fields]
        if other:
            return f" (a key of {other[0]} targets: is 'kind: {other[0]}' missing?)"
    return ""


BROAD_ROLES = {"pg_read_all_data", "pg_write_all_data", "pg_read_server_files",
               "pg_write_server_files", "pg_execute_server_program", "pg_monitor",
               "pg_read_all_settings", "pg_read_all_stats", "pg_signal_backend"}


def _file_problem(path: Path) -> str | None:
    """Why ``path`` is no readable, non-empty regular file for the account checking (None: it
    is one). Never opens anything but a regular file (a FIFO would block)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "cannot read: Permission denied"
    if st.st_size == 0:
        return "empty"
    return None


LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "::1"}


def warnings(config: Config) -> list[tuple[Path_, str]]:
    """Valid but risky or ineffective settings: roles that reach beyond the target's database,
    forwarding the proxy never relays, requesters whose requests no set of approvers can
    approve (nobody may approve their own request), requester groups with no members, an
    auto_approve rule no requester meets, nothing to serve, a relative state_dir, loopback names
    among the SSH host names, metrics or a webhook readable by the network, and PostgreSQL TLS
    that does not verify the server."""
    out = []
    for p, policy in enumerate(config.policies):
        if config.auth.identities != "system":  # (NSS could add approvers the file cannot show)
            approvers = {u for u in config.users if config.matches(u, policy.approvers)}
            rule = policy.auto_approve
            stuck = [u for u in config.users if config.matches(u, policy.requesters)
                     and len(approvers - {u}) < policy.approvals
                     and not (rule and all(rule.covers(config, u, t) for t in policy.targets))]
            by_others: dict[frozenset[str], list[str]] = {}  # (nobody approves their own)
            for u in stuck:
                by_others.setdefault(frozenset(approvers - {u}), []).append(u)
            for others, users in by_others.items():
                may = (f"only {', '.join(sorted(others))} may approve" if others
                       else "nobody may approve")
                out.append((("policies", p, "approvers"),
                            f"requests of {', '.join(users)} need {policy.approvals} "
                            f"approver(s) other than the requester, but {may}"))
        for what in ("agent_forwarding", "x11_forwarding"):
            if getattr(policy.allow, what):
                out.append((("policies", p, "allow", what),
                            f"the certificate will permit it, but the proxy never relays "
                            f"{what.replace('_', ' ')}"))
        if config.auth.identities != "system":
            for i, ref in enumerate(policy.requesters):
                name = ref.removeprefix("group:")
                if ref.startswith("group:") and name in config.groups \
                        and not config.groups[name].members:
                    out.append((("policies", p, "requesters", i),
                                f"group {name} has no members: nobody may request through it"))
        rule = policy.auto_approve
        if rule is not None and rule.requesters and config.auth.identities != "system" and not [
                u for u in config.users if config.matches(u, rule.requesters)
                and config.matches(u, policy.requesters)]:
            out.append((("policies", p, "auto_approve", "requesters"),
                        "none of these may request under this policy (requesters), so the rule "
                        "never approves anything"))
    if not config.users or not config.targets or not config.policies:
        missing = [k for k in ("users", "targets", "policies") if not getattr(config, k)]
        out.append(((missing[0],), f"no {' and no '.join(missing)}: the proxy would let nobody "
                                   f"reach anything"))
    if not config.state_dir.is_absolute():
        out.append((("state_dir",), f"{config.state_dir} is relative: it depends on the "
                                    f"directory the proxy starts in; give an absolute path"))
    for i, name in enumerate(config.ssh.host_names):
        if name.lower() in LOOPBACK_NAMES or name.startswith("127."):
            out.append((("ssh", "host_names", i),
                        f"{name}: the proxy's host certificate would vouch for every host "
                        f"clients reach by this name; keep it out unless they reach the "
                        f"proxy so"))
    metrics = config.daemon.metrics_listen
    if metrics is not None:
        host = metrics.rsplit(":", 1)[0].strip("[]")
        if host.lower() not in LOOPBACK_NAMES and not host.startswith("127."):
            out.append((("daemon", "metrics_listen"),
                        f"{host} is not a loopback address: the metrics (users, targets, "
                        f"sessions) are served to anyone who reaches it, without "
                        f"authentication"))
    url = config.notifications.webhook_url if config.notifications else None
    if url is not None and url.lower().startswith("http://"):
        out.append((("notifications", "webhook_url"),
                    "http: who asks for what, and why, crosses the network unencrypted; use "
                    "https"))
    group = config.daemon.admin_group
    if group is not None:
        import grp
        try:
            grp.getgrnam(group)
        except KeyError:
            out.append((("daemon", "admin_group"),
                        f"no group {group!r} on this host: only root could use the admin "
                        f"socket (check it on the proxy's host)"))
    for name, target in config.targets.items():
        if isinstance(target, PostgresTarget):
            problem = _file_problem(target.admin.password_file)
            if problem:
                out.append((("targets", name, "admin", "password_file"),
                            f"{target.admin.password_file}: {problem} (the proxy could not "
                            f"create roles on {name}; check it as the proxy's account)"))
            if target.tls.mode in ("disable", "require"):
                out.append((("targets", name, "tls", "mode"),
                            "the admin's password and every statement cross the network "
                            + ("unencrypted" if target.tls.mode == "disable" else
                               "to a server nobody checked (anyone in between can pose as "
                               "it)") + "; use verify-full"))
            for key, members in target.roles.items():
                for i, role in enumerate(members):
                    if role in BROAD_ROLES:
                        out.append((("targets", name, "roles", key, i),
                                    f"{role} reaches every database of the cluster, not just "
                                    f"{target.database!r}; prefer a role granted on it alone"))
                    elif role in (target.admin.user, "postgres"):
                        out.append((("targets", name, "roles", key, i),
                                    f"{role} is the proxy's admin or, usually, the cluster's "
                                    f"superuser: a member may SET ROLE {role} and do all it "
                                    f"may"))
    return out


def config_warnings(path: Path | str, config: Config) -> list[str]:
    """``FILE:LINE: key.path: warning`` lines for ``warnings(config)``."""
    text = Path(path).read_text(encoding="utf-8")
    builder = _Builder()
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        builder.build(root)
    return [f"{path}:{_line_for(loc, builder.lines)}: {format_path(loc)}: warning: {msg}"
            for loc, msg in warnings(config)]


def _secret_file_problems(config: Config) -> list[tuple[Path_, str]]:
    """Secret files that group or others may read or write: ``ca.passphrase_file`` and each
    PostgreSQL target's ``admin.password_file`` must be 0600 or stricter, as sshd wants of a
    private key and libpq of a password file. (A missing or unreadable one is only warned
    about, see ``warnings``: check-config may run as another account or on another host.)"""
    files: list[tuple[Path_, Path]] = []
    if config.ca.passphrase_file is not None:
        files.append((("ca", "passphrase_file"), config.ca.passphrase_file))
    for name, target in config.targets.items():
        if isinstance(target, PostgresTarget):
            files.append((("targets", name, "admin", "password_file"),
                          target.admin.password_file))
    problems: list[tuple[Path_, str]] = []
    for loc, path in files:
        try:
            st = os.stat(path)
        except OSError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISREG(st.st_mode) and mode & 0o077:
            problems.append((loc, f"{path} is accessible by group or others (mode {mode:04o}); "
                                  f"run 'chmod 600 {path}'"))
    return problems


def _reference_problems(config: Config) -> list[tuple[Path_, str]]:
    """Problems that need the whole file: names that point at nothing."""
    problems: list[tuple[Path_, str]] = []
    users, groups, targets = set(config.users), set(config.groups), set(config.targets)

    def known(names: set[str]) -> str:
        return ", ".join(sorted(names)) or "none defined"

    system = config.auth.identities == "system"  # other names may come from NSS
    if all("publickey" in chain.split(",") for chain in config.auth.methods):
        for uname, user in config.users.items():
            if not user.keys:
                problems.append((("users", uname, "keys"),
                                 "no keys, but every auth.methods chain needs publickey"))
    holder: dict[bytes, str] = {}  # a key's blob: the user it first appears under
    for uname, user in config.users.items():
        for i, key in enumerate(user.keys):
            blob = asyncssh.import_public_key(key).public_data  # (the comment aside)
            other = holder.setdefault(blob, uname)
            if other != uname:
                problems.append((("users", uname, "keys", i),
                                 f"the same key as user {other!r}: one key is one person "
                                 f"(under two names, one person could approve their own "
                                 f"requests)"))
    for gname, group in config.groups.items():
        for i, member in enumerate(group.members):
            if member not in users and not system:
                problems.append((("groups", gname, "members", i),
                                 f"unknown user {member!r} (known: {known(users)})"))
    seen: set[str] = set()
    for p, policy in enumerate(config.policies):
        if policy.name in seen:
            problems.append((("policies", p, "name"), f"duplicate policy name {policy.name!r}"))
        seen.add(policy.name)
        for i, t in enumerate(policy.targets):
            if t not in targets:
                problems.append((("policies", p, "targets", i),
                                 f"unknown target {t!r} (known: {known(targets)})"))
                continue
            target = config.targets[t]
            if isinstance(target, SSHTarget) and not policy.logins:
                problems.append((("policies", p, "logins"),
                                 f"SSH target {t!r} needs at least one login here"))
            if isinstance(target, PostgresTarget):
                if not policy.roles:
                    problems.append((("policies", p, "roles"),
                                     f"PostgreSQL target {t!r} needs at least one role here"))
                for j, role in enumerate(policy.roles):
                    if role not in target.roles:
                        problems.append((("policies", p, "roles", j),
                                         f"target {t!r} has no role {role!r} (known: "
                                         f"{known(set(target.roles))})"))
                if config.postgres is None:
                    problems.append((("policies", p, "targets", i),
                                     f"PostgreSQL target {t!r} needs the 'postgres' section "
                                     f"(the proxy's PostgreSQL port)"))
        refs = [(("policies", p, f, i), ref) for f in ("requesters", "approvers")
                for i, ref in enumerate(getattr(policy, f))]
        if policy.auto_approve is not None:
            refs += [(("policies", p, "auto_approve", "requesters", i), ref)
                     for i, ref in enumerate(policy.auto_approve.requesters)]
            for i, t in enumerate(policy.auto_approve.targets):
                if t not in policy.targets:
                    problems.append((("policies", p, "auto_approve", "targets", i),
                                     f"target {t!r} is not one of this policy's targets"))
        for loc, ref in refs:
            kind, _, name = ref.rpartition(":")
            if kind == "group":
                if name not in groups and not system:
                    problems.append((loc, f"unknown group {name!r} (known: {known(groups)})"))
            elif kind in ("", "user"):
                if name not in users and not system:
                    problems.append((loc, f"unknown user {name!r} (known: {known(users)})"))
            else:
                problems.append((loc, f"expected 'user:NAME', 'group:NAME' or a user name, "
                                      f"got {ref!r}"))
    return problems

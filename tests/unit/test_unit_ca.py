"""ca/: key files (0600, refused when too open, encrypted with a passphrase) and the certificates
the CA signs, checked with OpenSSH's own ``ssh-keygen -L``."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess

import asyncssh
import pytest

from ca import (CAKeyError, SSHCertificateAuthority, UserCertificateSpec, load_or_create_key,
                write_private_key)

T0 = 1_800_000_000          # 2027-01-15T08:00:00Z
SSH_KEYGEN = shutil.which("ssh-keygen")
needs_ssh_keygen = pytest.mark.skipif(SSH_KEYGEN is None, reason="OpenSSH ssh-keygen missing")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- key files -----------------------------------------------------------------------------------

def test_load_or_create_creates_0600_key_and_reloads_it(tmp_path):
    path = tmp_path / "ca" / "user_ca"
    key = load_or_create_key(path)
    assert mode(path) == 0o600
    assert mode(path.parent) & 0o077 == 0
    assert path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (tmp_path / "ca" / "user_ca.pub").read_bytes() == key.export_public_key()
    again = load_or_create_key(path)
    assert again.export_public_key() == key.export_public_key()
    assert key.algorithm == b"ssh-ed25519"


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o660, 0o644, 0o601])
def test_refuses_key_readable_by_others(tmp_path, bad_mode):
    path = tmp_path / "user_ca"
    load_or_create_key(path)
    os.chmod(path, bad_mode)
    with pytest.raises(CAKeyError) as info:
        load_or_create_key(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{bad_mode:04o}" in message
    assert "chmod 600" in message


def test_accepts_0400_key(tmp_path):
    path = tmp_path / "user_ca"
    key = load_or_create_key(path)
    os.chmod(path, 0o400)
    assert load_or_create_key(path).export_public_key() == key.export_public_key()


def test_encrypted_key_round_trip(tmp_path):
    path = tmp_path / "user_ca"
    key = load_or_create_key(path, passphrase=b"correct horse")
    assert mode(path) == 0o600
    data = path.read_bytes()
    assert b"ENCRYPTED" in data
    # the private half is not in the file in clear
    assert key.export_private_key("openssh") not in data
    assert load_or_create_key(path, passphrase=b"correct horse").export_public_key() == \
        key.export_public_key()


def test_encrypted_key_wrong_passphrase(tmp_path):
    path = tmp_path / "user_ca"
    load_or_create_key(path, passphrase=b"correct horse")
    with pytest.raises(CAKeyError) as info:
        load_or_create_key(path, passphrase=b"battery staple")
    assert str(path) in str(info.value)
    assert "correct horse" not in str(info.value) and "battery staple" not in str(info.value)


def test_encrypted_key_without_passphrase(tmp_path):
    path = tmp_path / "user_ca"
    load_or_create_key(path, passphrase=b"pw")
    with pytest.raises(CAKeyError) as info:
        load_or_create_key(path)
    assert str(path) in str(info.value) and "passphrase" in str(info.value)


def test_a_key_in_clear_is_encrypted_once_a_passphrase_is_configured(tmp_path, caplog):
    """A passphrase file added to an existing install left the keys in clear, silently (found by
    a newcomer run-through): the next load with the passphrase encrypts the file in place."""
    path = tmp_path / "user_ca"
    key = load_or_create_key(path)
    assert b"ENCRYPTED" not in path.read_bytes()
    with caplog.at_level("WARNING", logger="jit_proxy.ca"):
        again = load_or_create_key(path, passphrase=b"correct horse")
    assert again.export_public_key() == key.export_public_key()
    assert b"ENCRYPTED" in path.read_bytes() and mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["user_ca", "user_ca.pub"]
    assert f"{path} was not encrypted: encrypted it now" in caplog.text
    assert "correct horse" not in caplog.text
    with pytest.raises(CAKeyError, match="passphrase"):
        load_or_create_key(path)
    assert load_or_create_key(path, passphrase=b"correct horse").export_public_key() == \
        key.export_public_key()


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a file to another user (needs root)")
def test_encrypting_in_place_keeps_the_files_owner(tmp_path):
    """Found by an attack review: a daemon started by hand as root replaced the service
    account's key by a root-owned one, which the service then could not read."""
    path = tmp_path / "user_ca"
    load_or_create_key(path)
    os.chown(path, 65534, 65534)
    load_or_create_key(path, passphrase=b"pw")
    assert b"ENCRYPTED" in path.read_bytes()
    assert (path.stat().st_uid, path.stat().st_gid, mode(path)) == (65534, 65534, 0o600)


def test_a_key_that_cannot_be_replaced_stays_usable_with_a_warning(tmp_path, caplog):
    path = tmp_path / "user_ca"
    key = load_or_create_key(path)
    clear = path.read_bytes()
    (tmp_path / "user_ca.new").mkdir()  # where the encrypted copy would be written
    with caplog.at_level("WARNING", logger="jit_proxy.ca"):
        again = load_or_create_key(path, passphrase=b"pw")
    assert again.export_public_key() == key.export_public_key() and path.read_bytes() == clear
    assert "is not encrypted, and could not be encrypted in place" in caplog.text
    # a symbolic link is left as it is (replacing it would leave the key it points to in clear)
    link = tmp_path / "linked_ca"
    link.symlink_to(path)
    caplog.clear()
    with caplog.at_level("WARNING", logger="jit_proxy.ca"):
        load_or_create_key(link, passphrase=b"pw")
    assert link.is_symlink() and path.read_bytes() == clear
    assert "is a symbolic link" in caplog.text


def test_garbage_key_file(tmp_path):
    path = tmp_path / "user_ca"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key at all\n")
    os.close(fd)
    with pytest.raises(CAKeyError) as info:
        load_or_create_key(path)
    assert str(path) in str(info.value)


def test_write_private_key_never_overwrites(tmp_path):
    path = tmp_path / "k"
    key = asyncssh.generate_private_key("ssh-ed25519")
    write_private_key(path, key)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_private_key(path, asyncssh.generate_private_key("ssh-ed25519"))
    assert path.read_bytes() == before
    assert mode(path) == 0o600


def test_open_creates_distinct_user_and_host_ca(tmp_path):
    ca = SSHCertificateAuthority.open(tmp_path / "ca")
    assert ca.user_ca_public != ca.host_ca_public
    assert ca.user_ca_public.startswith("ssh-ed25519 ")
    assert ca.known_hosts_line() == f"@cert-authority * {ca.host_ca_public}"
    assert ca.known_hosts_line("*.example").startswith("@cert-authority *.example ssh-ed25519 ")
    for name in ("user_ca", "host_ca"):
        assert mode(tmp_path / "ca" / name) == 0o600
    again = SSHCertificateAuthority.open(tmp_path / "ca")
    assert (again.user_ca_public, again.host_ca_public) == (ca.user_ca_public, ca.host_ca_public)


def test_open_refuses_open_host_ca(tmp_path):
    SSHCertificateAuthority.open(tmp_path / "ca")
    os.chmod(tmp_path / "ca" / "host_ca", 0o644)
    with pytest.raises(CAKeyError, match="host_ca"):
        SSHCertificateAuthority.open(tmp_path / "ca")


# --- certificates, read back by ssh-keygen -L ----------------------------------------------------

@pytest.fixture(scope="module")
def authority(tmp_path_factory) -> SSHCertificateAuthority:
    return SSHCertificateAuthority.open(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def user_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def keygen_list(tmp_path, cert: asyncssh.SSHCertificate) -> dict:
    path = tmp_path / "cert-cert.pub"
    path.write_bytes(cert.export_certificate())
    out = subprocess.run([SSH_KEYGEN, "-L", "-f", str(path)], capture_output=True, text=True,
                         env={**os.environ, "TZ": "UTC"}, timeout=30)
    assert out.returncode == 0, out.stderr
    return parse_keygen(out.stdout)


def parse_keygen(text: str) -> dict:
    """``ssh-keygen -L`` output as a dict (principals, options, extensions as lists)."""
    info: dict = {}
    section = None
    for line in text.splitlines()[1:]:
        m = re.match(r"^\s{8}(\S[^:]*):\s*(.*)$", line)
        if m:
            key, value = m.group(1), m.group(2).strip()
            if key in ("Principals", "Critical Options", "Extensions"):
                section = key
                info[key] = [] if value in ("", "(none)") else [value]
            else:
                section = None
                info[key] = value
        elif section and line.strip():
            info[section].append(line.strip())
    return info


def fingerprint(public_line: str, tmp_path) -> str:
    path = tmp_path / "ca.pub"
    path.write_text(public_line + "\n")
    out = subprocess.run([SSH_KEYGEN, "-l", "-f", str(path)], capture_output=True, text=True)
    return out.stdout.split()[1]


def spec(**kw) -> UserCertificateSpec:
    base = dict(serial=42, key_id="jit-proxy user=alice grant=3 request=7 serial=42",
                principal="deploy", valid_after=T0, valid_before=T0 + 3600)
    base.update(kw)
    return UserCertificateSpec(**base)


@needs_ssh_keygen
def test_user_certificate_defaults(authority, user_key, tmp_path):
    cert = authority.issue_user_certificate(user_key, spec())
    info = keygen_list(tmp_path, cert)
    assert info["Type"] == "ssh-ed25519-cert-v01@openssh.com user certificate"
    assert info["Key ID"] == '"jit-proxy user=alice grant=3 request=7 serial=42"'
    assert info["Serial"] == "42"
    assert info["Valid"] == "from 2027-01-15T08:00:00 to 2027-01-15T09:00:00"
    assert info["Principals"] == ["deploy"]
    assert info["Critical Options"] == []
    assert info["Extensions"] == ["permit-pty"]
    assert info["Signing CA"].split()[1] == fingerprint(authority.user_ca_public, tmp_path)
    # the certified key is the user's key
    assert cert.key.export_public_key() == user_key.export_public_key()
    assert cert.principals == ["deploy"]


@needs_ssh_keygen
def test_user_certificate_permissions_only_when_allowed(authority, user_key, tmp_path):
    cert = authority.issue_user_certificate(user_key, spec(
        permit_agent_forwarding=True, permit_port_forwarding=True, permit_x11_forwarding=True))
    info = keygen_list(tmp_path, cert)
    assert sorted(info["Extensions"]) == sorted([
        "permit-X11-forwarding", "permit-agent-forwarding", "permit-port-forwarding",
        "permit-pty"])
    assert "permit-user-rc" not in info["Extensions"]

    cert = authority.issue_user_certificate(user_key, spec(permit_pty=False,
                                                           permit_port_forwarding=True))
    assert keygen_list(tmp_path, cert)["Extensions"] == ["permit-port-forwarding"]


@needs_ssh_keygen
def test_user_certificate_large_serial(authority, user_key, tmp_path):
    cert = authority.issue_user_certificate(user_key, spec(serial=2**63 + 5, key_id="k"))
    info = keygen_list(tmp_path, cert)
    assert info["Serial"] == str(2**63 + 5)
    assert info["Key ID"] == '"k"'


@pytest.mark.parametrize("kw, match", [
    (dict(principal=""), "principal"),
    (dict(key_id=""), "key id"),
    (dict(valid_after=T0, valid_before=T0), "validity is empty"),
    (dict(valid_after=T0 + 10, valid_before=T0), "validity is empty"),
])
def test_user_certificate_refusals(authority, user_key, kw, match):
    with pytest.raises(ValueError, match=match):
        authority.issue_user_certificate(user_key, spec(**kw))


@needs_ssh_keygen
def test_host_certificate(authority, user_key, tmp_path):
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    cert = authority.issue_host_certificate(
        host_key, serial=7, key_id="jit-proxy host=web1 serial=7",
        principals=["web1", "jit-proxy"], valid_after=T0 - 120, valid_before=T0 + 86400)
    info = keygen_list(tmp_path, cert)
    assert info["Type"] == "ssh-ed25519-cert-v01@openssh.com host certificate"
    assert info["Principals"] == ["web1", "jit-proxy"]
    assert info["Serial"] == "7"
    assert info["Key ID"] == '"jit-proxy host=web1 serial=7"'
    assert info["Valid"] == "from 2027-01-15T07:58:00 to 2027-01-16T08:00:00"
    assert info["Extensions"] == [] and info["Critical Options"] == []
    assert info["Signing CA"].split()[1] == fingerprint(authority.host_ca_public, tmp_path)
    assert info["Signing CA"].split()[1] != fingerprint(authority.user_ca_public, tmp_path)


@pytest.mark.parametrize("kw, match", [
    (dict(principals=[]), "principal"),
    (dict(principals=["web1", ""]), "principal"),
    (dict(key_id=""), "key id"),
    (dict(valid_after=T0, valid_before=T0 - 1), "validity is empty"),
])
def test_host_certificate_refusals(authority, kw, match):
    args = dict(serial=1, key_id="h", principals=["web1"], valid_after=T0, valid_before=T0 + 60)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        authority.issue_host_certificate(asyncssh.generate_private_key("ssh-ed25519"), **args)


@needs_ssh_keygen
def test_signature_is_checked_by_openssh(authority, user_key, tmp_path):
    """ssh-keygen verifies the CA signature when it parses a certificate: the listing above only
    succeeds for a correctly signed certificate, and a one-byte change inside it is refused."""
    import base64
    cert = authority.issue_user_certificate(user_key, spec(key_id="jit-proxy user=alice"))
    parsed = asyncssh.import_certificate(cert.export_certificate())
    assert parsed.signing_key.export_public_key().decode().strip() == authority.user_ca_public
    kind, blob = cert.export_certificate().split()[:2]
    raw = bytearray(base64.b64decode(blob))
    at = raw.find(b"user=alice")
    assert at > 0
    raw[at + 5] ^= 0x01  # "user=alice" -> "user=`lice": key id no longer matches the signature
    path = tmp_path / "tampered-cert.pub"
    path.write_bytes(kind + b" " + base64.b64encode(bytes(raw)) + b"\n")
    out = subprocess.run([SSH_KEYGEN, "-L", "-f", str(path)], capture_output=True, text=True)
    assert out.returncode != 0
    assert "signature" in out.stderr

"""The internal X.509 CA: a real TLS handshake with hostname verification trusts what it issues."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
import time

import pytest

from ca import CAKeyError
from ca.x509 import X509CertificateAuthority


def _handshake(tmp_path, ca, names, server_hostname):
    sc = ca.issue_server_certificate(names, now=time.time(), validity=3600)
    (tmp_path / "chain.pem").write_bytes(sc.chain_pem)
    (tmp_path / "key.pem").write_bytes(sc.key_pem)
    (tmp_path / "ca.pem").write_bytes(ca.certificate_pem)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()

        def serve():
            conn, _ = srv.accept()
            try:
                with server.wrap_socket(conn, server_side=True) as s:
                    s.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

        t = threading.Thread(target=serve)
        t.start()
        try:
            with client.wrap_socket(socket.create_connection(srv.getsockname()),
                                    server_hostname=server_hostname) as c:
                return c.recv(2)
        finally:
            t.join(5)


def test_verify_full_by_name_and_by_address(tmp_path):
    ca = X509CertificateAuthority.open(tmp_path / "ca", time.time())
    assert _handshake(tmp_path, ca, ["jit-proxy", "127.0.0.1"], "jit-proxy") == b"ok"
    assert _handshake(tmp_path, ca, ["jit-proxy", "127.0.0.1"], "127.0.0.1") == b"ok"
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path, ca, ["jit-proxy"], "other-host")


def test_key_is_private_and_encrypted_and_reloads(tmp_path):
    ca = X509CertificateAuthority.open(tmp_path / "ca", time.time(), passphrase=b"pw")
    key = tmp_path / "ca" / "pg_ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    again = X509CertificateAuthority.open(tmp_path / "ca", time.time(), passphrase=b"pw")
    assert again.certificate_pem == ca.certificate_pem
    with pytest.raises(CAKeyError, match="pg_ca.key"):
        X509CertificateAuthority.open(tmp_path / "ca", time.time(), passphrase=b"wrong")
    os.chmod(key, 0o644)
    with pytest.raises(CAKeyError, match="chmod 600"):
        X509CertificateAuthority.open(tmp_path / "ca", time.time(), passphrase=b"pw")


def test_a_key_in_clear_is_encrypted_once_a_passphrase_is_configured(tmp_path):
    ca = X509CertificateAuthority.open(tmp_path / "ca", time.time())
    key = tmp_path / "ca" / "pg_ca.key"
    assert b"ENCRYPTED" not in key.read_bytes()
    again = X509CertificateAuthority.open(tmp_path / "ca", time.time(), passphrase=b"pw")
    assert again.certificate_pem == ca.certificate_pem
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(CAKeyError, match="pg_ca.key"):
        X509CertificateAuthority.open(tmp_path / "ca", time.time())
    assert X509CertificateAuthority.open(tmp_path / "ca", time.time(),
                                         passphrase=b"pw").certificate_pem == ca.certificate_pem


def test_refuses_empty_names_and_validity(tmp_path):
    ca = X509CertificateAuthority.open(tmp_path / "ca", time.time())
    with pytest.raises(ValueError):
        ca.issue_server_certificate([], now=time.time(), validity=60)
    with pytest.raises(ValueError):
        ca.issue_server_certificate(["x"], now=time.time(), validity=0)

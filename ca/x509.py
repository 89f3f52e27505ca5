"""The internal X.509 CA: TLS server certificates for the proxy's PostgreSQL port (RFC 5280).

What it is for: one ECDSA P-256 CA key and self-signed CA certificate under the state directory
(``ssh jit-proxy ca --pg`` prints the certificate for clients' ``sslrootcert``), and short server
certificates naming the proxy's host names and addresses, so that ``sslmode=verify-full`` works.

What it must not do: import ``proxy``, read the clock (callers pass ``now``), or write a private key
with a mode wider than 0600.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.keys import CAKeyError, check_private_mode, encrypted_now, write_secret_file

CA_KEY_FILE = "pg_ca.key"
CA_CERT_FILE = "pg_ca.pem"
CA_VALIDITY = timedelta(days=3650)


@dataclass(frozen=True)
class ServerCertificate:
    """PEM bytes of a server certificate (leaf, then the CA) and its unencrypted private key."""

    chain_pem: bytes
    key_pem: bytes
    not_after: datetime


def _load_key(path: Path, passphrase: bytes | None) -> ec.EllipticCurvePrivateKey:
    """The CA key at ``path``; one in clear while ``passphrase`` is given is encrypted with it
    in place (as ``ca.keys.load_or_create_key`` does)."""
    check_private_mode(path)
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, passphrase)
    except TypeError:  # "Password was given but private key is not encrypted"
        key = None
    except ValueError as exc:
        raise CAKeyError(f"{path}: cannot load private key: {exc}") from None
    if key is None:
        try:
            key = serialization.load_pem_private_key(data, None)
        except (ValueError, TypeError) as exc:
            raise CAKeyError(f"{path}: cannot load private key: {exc}") from None
        assert passphrase
        encrypted_now(path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase)))
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAKeyError(f"{path}: not an EC private key")
    return key


def _time(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


class X509CertificateAuthority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate):
        self._key = key
        self.certificate = certificate

    @classmethod
    def open(cls, directory: Path, now: float, passphrase: bytes | None = None,
             name: str = "jit-proxy PostgreSQL CA") -> "X509CertificateAuthority":
        """Load the CA from ``directory``, creating key (0600) and certificate on first use.

        Args:
            now: POSIX seconds, the start of a new CA certificate's validity.
        Raises:
            ca.CAKeyError: the key is too open, undecryptable, or not an EC key.
        """
        directory = Path(directory)
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        if not key_path.exists():
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = ec.generate_private_key(ec.SECP256R1())
            enc = (serialization.BestAvailableEncryption(passphrase) if passphrase
                   else serialization.NoEncryption())
            write_secret_file(key_path, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
            cert_path.unlink(missing_ok=True)
        key = _load_key(key_path, passphrase)
        if not cert_path.exists():
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
            ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
            cert = (x509.CertificateBuilder()
                    .subject_name(subject).issuer_name(subject)
                    .public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(_time(now - 300))
                    .not_valid_after(_time(now) + CA_VALIDITY)
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(
                        digital_signature=False, content_commitment=False,
                        key_encipherment=False, data_encipherment=False, key_agreement=False,
                        key_cert_sign=True, crl_sign=True, encipher_only=False,
                        decipher_only=False), critical=True)
                    .add_extension(ski, critical=False)
                    .sign(key, hashes.SHA256()))
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise CAKeyError(f"{cert_path}: does not belong to {key_path}")
        return cls(key, cert)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue_server_certificate(self, names: list[str], *, now: float,
                                 validity: float) -> ServerCertificate:
        """A TLS server certificate for ``names`` (DNS names or IP addresses, as SANs).

        Args:
            now: POSIX seconds; the certificate is valid from 5 minutes before.
            validity: seconds.
        Raises:
            ValueError: no names, or a non-positive validity.
        """
        if not names:
            raise ValueError("a server certificate needs at least one name")
        if validity <= 0:
            raise ValueError("validity must be positive")
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        key = ec.generate_private_key(ec.SECP256R1())
        not_after = _time(now + validity)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.certificate.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_time(now - 300)).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()), critical=False)
                .sign(self._key, hashes.SHA256()))
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.certificate_pem
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return ServerCertificate(chain, key_pem, not_after)

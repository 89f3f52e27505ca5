"""Private key files of the CA: created 0600, optionally encrypted, refused when too open.

What it is for: one place that reads and writes private keys so that every key the project keeps on
disk gets the same treatment (mode 0600 from creation, PKCS#8 encryption with a passphrase when one is
configured, and a refusal to use a file that group or others may read). A key written in clear
before a passphrase was configured is encrypted in place when it is next loaded with one.

What it must not do: print or log key material or passphrases; create a key file with a wider mode
even for an instant (files are opened with O_EXCL and mode 0600).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import asyncssh

log = logging.getLogger("jit_proxy.ca")


class CAKeyError(Exception):
    """A CA key file cannot be used; the message names the file and what to do."""


def check_private_mode(path: Path) -> None:
    """Refuse a private key file that group or others may read or write.

    Args:
        path: the key file.

    Raises:
        CAKeyError: naming the file and its mode when ``mode & 0o077`` is not zero.
    """
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CAKeyError(
            f"{path}: private key is accessible by group or others (mode {mode:04o}); "
            f"run 'chmod 600 {path}' and start again"
        )


def write_private_key(path: Path, key: asyncssh.SSHKey, passphrase: bytes | None = None) -> None:
    """Write ``key`` to a new file with mode 0600 (PKCS#8 PEM, encrypted when a passphrase is given,
    OpenSSH format otherwise) and its public half to ``path.pub``.

    Raises:
        FileExistsError: when ``path`` already exists (keys are never overwritten).
    """
    if passphrase:
        data = key.export_private_key("pkcs8-pem", passphrase=passphrase)
    else:
        data = key.export_private_key("openssh")
    write_secret_file(path, data)
    path.with_name(path.name + ".pub").write_bytes(key.export_public_key())


def write_secret_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never wider, not even briefly), write ``data``, fsync.

    Raises:
        FileExistsError: when ``path`` already exists (secrets are never overwritten).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_secret_file(path: Path, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data``, atomically: written whole (mode 0600, fsync,
    the old file's owner and group) beside it, then renamed over it, so a crash leaves the old
    file or the new one.

    Raises:
        OSError: the directory cannot be written, or the owner cannot be kept (nothing changed)."""
    st = path.stat()
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)  # (left by a crash)
    try:
        # (by descriptor, never by name: the directory's owner could swap a link in between)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(fd, st.st_uid, st.st_gid)  # (a root start keeps the service's key)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encrypted_now(path: Path, data: bytes) -> None:
    """``path``, a key file in clear until now, replaced by ``data`` (the same key encrypted),
    with a warning in the log (the key was readable by anyone who could read the file). A
    symbolic link, or a file that cannot be replaced, stays as it is, with a warning saying so
    (the key still works)."""
    if path.is_symlink():
        log.warning("%s is not encrypted, and is a symbolic link: encrypt the key it points to "
                    "by hand (or replace the link by the file)", path)
        return
    try:
        replace_secret_file(path, data)
    except OSError as exc:
        log.warning("%s is not encrypted, and could not be encrypted in place: %s", path,
                    exc.strerror or exc)
        return
    log.warning("%s was not encrypted: encrypted it now with the configured passphrase (copies "
                "of the file taken before, e.g. in backups, still hold the key in clear)", path)


def load_or_create_key(path: Path, passphrase: bytes | None = None,
                       algorithm: str = "ssh-ed25519") -> asyncssh.SSHKey:
    """Load the private key at ``path``, creating an ``algorithm`` key there first if it is missing.

    Args:
        path: key file; its directory is created with mode 0700 when missing.
        passphrase: bytes to encrypt a new key with and to decrypt an existing one, or None.
        algorithm: the asyncssh algorithm name for a new key.

    A key found in clear while ``passphrase`` is given is encrypted with it in place (the
    passphrase was configured after the key was made).

    Raises:
        CAKeyError: the file is readable by group/others, cannot be decrypted, or is not a key.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private_key(path, asyncssh.generate_private_key(algorithm), passphrase)
    check_private_mode(path)
    data = path.read_bytes()
    if passphrase:
        try:  # written in clear, before a passphrase was configured?
            key = asyncssh.import_private_key(data, None)
        except (asyncssh.KeyImportError, ValueError):
            pass  # encrypted (or no key: said below)
        else:
            encrypted_now(path, key.export_private_key("pkcs8-pem", passphrase=passphrase))
            return key
    try:
        return asyncssh.import_private_key(data, passphrase)
    except (asyncssh.KeyImportError, ValueError) as exc:
        hint = " (is the passphrase file right?)" if passphrase else \
            " (encrypted? set ca.passphrase_file)"
        raise CAKeyError(f"{path}: cannot load private key: {exc}{hint}") from None

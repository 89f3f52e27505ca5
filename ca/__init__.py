"""jit-proxy's internal certificate authority.

What it is for: holding the CA private keys and minting short-lived OpenSSH certificates (user and
host) with exactly the attributes a grant allows.

What it must not do: import anything from ``proxy``, open sockets, talk to a store or log secrets.
Serials and clocks are passed in by the caller, which persists them.
"""

from ca.keys import CAKeyError, load_or_create_key, write_private_key
from ca.ssh import SSHCertificateAuthority, UserCertificateSpec

__all__ = [
    "CAKeyError",
    "SSHCertificateAuthority",
    "UserCertificateSpec",
    "load_or_create_key",
    "write_private_key",
]

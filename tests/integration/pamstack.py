"""PAM stacks for tests, through Debian's pam_wrapper (no system account or /etc/pam.d is touched).

The proxy loads ``libpam_wrapper.so`` as its PAM library (``auth.pam.library``) with
``PAM_WRAPPER=1`` and ``PAM_WRAPPER_SERVICE_DIR`` pointing at our service files, which name
modules by absolute path: pam_matrix (passwords from a ``user:password:service`` file; its account
phase refuses a user whose line names another service: our "locked" account), pam_echo (an info
text) and pam_oath (TOTP codes, checked against ``oathtool``).
"""

from __future__ import annotations

import glob
import subprocess
import time
from pathlib import Path

import pytest


def _find(pattern: str) -> str | None:
    found = sorted(glob.glob(pattern))
    return found[0] if found else None


WRAPPER = _find("/usr/lib/*/libpam_wrapper.so")
MATRIX = _find("/usr/lib/*/pam_wrapper/pam_matrix.so")
ECHO = _find("/lib/*/security/pam_echo.so") or _find("/usr/lib/*/security/pam_echo.so")
OATH = _find("/lib/*/security/pam_oath.so") or _find("/usr/lib/*/security/pam_oath.so")
FAILDELAY = (_find("/lib/*/security/pam_faildelay.so")
             or _find("/usr/lib/*/security/pam_faildelay.so"))

needs_pam_wrapper = pytest.mark.skipif(
    not (WRAPPER and MATRIX and ECHO and OATH and FAILDELAY),
    reason="libpam-wrapper, libpam-oath and oathtool are not installed (tests/run installs them)")

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
TOTP_SECRET = "3132333435363738393031323334353637383930"  # hex, RFC 6238's test key
WELCOME = "Welcome to jit-proxy"


class PamStack:
    """Service files ``jit-proxy`` (password), ``jit-otp`` (info text, password, TOTP) and
    ``jit-delay`` (pam_faildelay, then password: a wrong one takes 2 s, a right one none) and
    ``jit-hang`` (a module that takes 30 s)."""

    def __init__(self, d: Path):
        d.mkdir(parents=True, exist_ok=True)
        self.dir = d / "pam.d"
        self.dir.mkdir(exist_ok=True)
        passdb, otp_passdb, oath = d / "passdb", d / "passdb-otp", d / "users.oath"
        # carol's line names another service: pam_matrix's account phase refuses her
        passdb.write_text(f"alice:{PASSWORDS['alice']}:jit-proxy\n"
                          f"bob:{PASSWORDS['bob']}:jit-proxy\n"
                          f"carol:{PASSWORDS['carol']}:some-other-service\n")
        otp_passdb.write_text(f"alice:{PASSWORDS['alice']}:jit-otp\n")
        oath.write_text(f"HOTP/T30 alice - {TOTP_SECRET}\n")
        oath.chmod(0o600)
        (self.dir / "jit-proxy").write_text(
            f"auth required {MATRIX} passdb={passdb}\n"
            f"account required {MATRIX} passdb={passdb}\n")
        (self.dir / "jit-otp").write_text(
            f"auth optional {ECHO} {WELCOME}, %u.\n"
            f"auth required {MATRIX} passdb={otp_passdb}\n"
            f"auth required {OATH} usersfile={oath} window=4\n"
            f"account required {MATRIX} passdb={otp_passdb}\n")
        delay_db = d / "passdb-delay"
        delay_db.write_text("".join(f"{u}:{p}:jit-delay\n" for u, p in PASSWORDS.items()))
        (self.dir / "jit-delay").write_text(
            f"auth required {FAILDELAY} delay=2000000\n"
            f"auth required {MATRIX} passdb={delay_db}\n"
            f"account required {MATRIX} passdb={delay_db}\n")
        hang = ECHO.replace("pam_echo.so", "pam_exec.so")  # a module that never answers in time
        (self.dir / "jit-hang").write_text(f"auth required {hang} /bin/sleep 30\n"
                                           f"account required {MATRIX} passdb={delay_db}\n")
        self._step = int(time.time()) // 30

    @property
    def environ(self) -> dict[str, str]:
        return {"PAM_WRAPPER": "1", "PAM_WRAPPER_SERVICE_DIR": str(self.dir)}

    def config(self, service: str = "jit-proxy") -> dict:
        """The ``auth.pam`` section for ``service``."""
        return {"service": service, "library": WRAPPER}

    def totp(self) -> str:
        """A code from ``oathtool`` that pam_oath has not seen yet (pam_oath refuses a code
        twice, so each call moves one 30-second step on; window=4 accepts a few ahead)."""
        self._step = max(self._step + 1, int(time.time()) // 30)
        out = subprocess.run(["oathtool", "--totp", "-N", f"@{self._step * 30}", TOTP_SECRET],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

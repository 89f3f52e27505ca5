"""What the proxy mints, read back by OpenSSH's own ``ssh-keygen -L``."""

from __future__ import annotations

import asyncio
import re
import subprocess
from datetime import datetime

import asyncssh

from ca import SSHCertificateAuthority
from proxy.audit.log import AuditLog
from proxy.clock import ManualClock
from proxy.config import parse_config
from proxy.runtime.service import AccessService
from proxy.store.sqlite import SQLiteStore

KEY, BOB_KEY = (asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
                for _ in range(2))
CONFIG = f"""
state_dir: STATE
ca: {{clock_skew: 90s}}
users:
  alice: {{keys: ["{KEY}"]}}
  bob: {{keys: ["{BOB_KEY}"]}}
targets:
  web1: {{address: 127.0.0.1, host_key: "{KEY}"}}
policies:
  - name: p
    targets: [web1]
    logins: [deploy]
    requesters: [alice]
    approvers: [bob]
    max_duration: 2h
"""


def _keygen_l(cert: asyncssh.SSHCertificate, tmp_path) -> str:
    path = tmp_path / "cert-cert.pub"
    path.write_bytes(cert.export_certificate())
    r = subprocess.run(["ssh-keygen", "-L", "-f", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_minted_user_certificate_as_ssh_keygen_shows_it(tmp_path):
    async def mint():
        clock = ManualClock(1_900_000_000)
        config = parse_config(CONFIG.replace("STATE", str(tmp_path)))
        store = await SQLiteStore.open(tmp_path / "db.sqlite")
        service = AccessService(config, store, AuditLog(tmp_path / "audit.jsonl", clock), clock,
                                SSHCertificateAuthority.open(tmp_path / "ca"),
                                asyncssh.generate_private_key("ssh-ed25519"))
        req = await service.request("alice", "web1", "deploy", 3600, "INC-1")
        grant = await service.approve("bob", req.id, None)
        certs = [await service.user_certificate(grant, asyncssh.generate_private_key("ssh-ed25519"))
                 for _ in range(2)]
        await store.close()
        return grant, req, certs

    grant, req, certs = asyncio.run(mint())
    out = _keygen_l(certs[0], tmp_path)
    assert "Type: ssh-ed25519-cert-v01@openssh.com user certificate" in out
    key_id = re.search(r'Key ID: "(.*)"', out).group(1)
    serial = int(re.search(r"Serial: (\d+)", out).group(1))
    assert key_id == f"jit-proxy user=alice grant={grant.id} request={req.id} serial={serial}"
    principals = re.search(r"Principals:\s*\n((?:\s{16,}\S+\n)+)", out).group(1).split()
    assert principals == ["deploy"]
    m = re.search(r"Valid: from (\S+) to (\S+)", out)
    start, end = (datetime.fromisoformat(x).timestamp() for x in m.groups())
    # ssh-keygen prints local time; the machine runs in UTC here, so compare loosely by span
    assert end - start == 3600 + 90
    ext = re.search(r"Extensions:\s*\n((?:\s{16,}\S+\n)*)", out).group(1).split()
    assert ext == ["permit-pty"]
    assert "Critical Options: (none)" in out
    out2 = _keygen_l(certs[1], tmp_path)
    serial2 = int(re.search(r"Serial: (\d+)", out2).group(1))
    assert serial2 > serial  # unique, increasing

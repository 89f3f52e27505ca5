"""jit-proxy against its anchors, in one run on this machine, reported as ratios (issue 6).

What it is for: setting up its own peers on 127.0.0.1 — an OpenSSH sshd as the target, a second
sshd as a plain OpenSSH jump host, and jit-proxy (recording on) — then measuring, alternately and
several times each: SSH connection setup (``ssh -J … true``) and bulk transfer up and down, through
jit-proxy, through the OpenSSH jump host, and direct. It prints medians and jit-proxy/anchor ratios
and writes bench/results/RESULTS.json and RESULTS.md (machine, versions, date).

What it must not do: run as a test (it measures; it asserts nothing), leave a process behind, or
reach anything but 127.0.0.1. Not measured yet (issue 6): interactive latency, pgbench against
pgbouncer and direct, the control plane, the expiry storm, idle memory at scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import asyncssh
import yaml

from ca import SSHCertificateAuthority, UserCertificateSpec
from ca.keys import write_private_key
from proxy.runtime.sandbox import TargetSSHD, client_files, ensure_login, free_port
from proxy.runtime.service import known_hosts_patterns
from proxy.config import load_config

ROOT = Path(__file__).resolve().parent


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Bench:
    def __init__(self, d: Path, login: str):
        self.d, self.login = d, login
        self.keys = d / "keys"
        self.keys.mkdir(mode=0o700)
        write_private_key(self.keys / "alice", asyncssh.generate_private_key("ssh-ed25519"))
        self.alice_pub = (self.keys / "alice.pub").read_text().strip()
        self.ca = SSHCertificateAuthority.open(d / "state" / "ca")
        # a certificate for the anchors' paths (the target trusts only the CA)
        key = asyncssh.import_private_key((self.keys / "alice").read_bytes())
        now = int(time.time())
        cert = self.ca.issue_user_certificate(key, UserCertificateSpec(
            serial=1, key_id="bench", principal=login, valid_after=now - 60,
            valid_before=now + 86400, permit_port_forwarding=True))
        (self.keys / "alice-cert.pub").write_bytes(cert.export_certificate())
        self.target = TargetSSHD(d / "target", user_ca=self.ca.user_ca_public)
        self.target_host_key = self.target.prepare()
        self.jump = TargetSSHD(d / "jump", user_ca=self.ca.user_ca_public)
        self.jump.prepare()
        cfg = (d / "jump" / "sshd_config").read_text()
        (d / "jump" / "sshd_config").write_text(
            cfg.replace("AuthorizedKeysFile none", "AuthorizedKeysFile none\nAllowTcpForwarding yes"))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.target.start()
        self.jump.start()
        config = {
            "state_dir": str(self.d / "state"),
            "ssh": {"listen_address": "127.0.0.1", "listen_port": free_port(),
                    "host_names": ["jit-proxy"]},
            "users": {"alice": {"keys": [self.alice_pub]}},
            "targets": {"web1": {"address": "127.0.0.1", "port": self.target.port,
                                 "host_key": self.target_host_key}},
            "policies": [{"name": "bench", "targets": ["web1"], "logins": [self.login],
                          "requesters": ["alice"], "approvers": ["alice"],
                          "max_duration": "1d", "auto_approve": {"requesters": ["alice"]}}],
        }
        (self.d / "jit-proxy.yaml").write_text(yaml.safe_dump(config))
        log = open(self.d / "proxy.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "-c",
                                      str(self.d / "jit-proxy.yaml"), "--log-level", "warning"],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        port = config["ssh"]["listen_port"]
        for _ in range(200):
            try:
                import socket
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        kh = self.ca.known_hosts_line(",".join(known_hosts_patterns(
            load_config(self.d / "jit-proxy.yaml"), port)))
        self.ssh_config = client_files(self.d, port, kh, ["alice"], self.keys)
        jump_key = (self.d / "jump" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        target_key = self.target_host_key.split()[:2]
        with open(self.d / "known_hosts", "a") as f:
            f.write(f"[127.0.0.1]:{self.jump.port} {' '.join(jump_key)}\n")
            f.write(f"[127.0.0.1]:{self.target.port} {' '.join(target_key)}\n")
        with open(self.ssh_config, "a") as f:
            f.write(textwrap.dedent(f"""\
                Host openssh-jump
                  HostName 127.0.0.1
                  Port {self.jump.port}
                  User {self.login}
                  IdentityFile {self.keys / 'alice'}
                  CertificateFile {self.keys / 'alice-cert.pub'}
                Host direct-target
                  HostName 127.0.0.1
                  Port {self.target.port}
                  IdentityFile {self.keys / 'alice'}
                  CertificateFile {self.keys / 'alice-cert.pub'}
                """))
        r = subprocess.run(["ssh", "-F", str(self.ssh_config), "alice@jit-proxy", "request",
                            "web1", "--login", self.login, "--for", "1d", "--reason", "bench"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"could not get a grant: {r.stderr}")

    def ssh_args(self, path: str) -> list[str]:
        base = ["ssh", "-F", str(self.ssh_config)]
        if path == "jit-proxy":
            return base + ["-J", "alice@jit-proxy", f"{self.login}@web1"]
        if path == "openssh-jump":
            return base + ["-J", "openssh-jump", f"{self.login}@direct-target"]
        return base + [f"{self.login}@direct-target"]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.target.stop()
        self.jump.stop()


def measure(bench: Bench, paths: list[str], rounds: int, size: int) -> dict:
    results: dict = {p: {"setup_s": [], "up_mib_s": [], "down_mib_s": []} for p in paths}
    for _ in range(rounds):
        for p in paths:  # alternate, so drifts in the machine's load hit every path alike
            t0 = time.perf_counter()
            subprocess.run(bench.ssh_args(p) + ["true"], check=True, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=60)
            results[p]["setup_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with subprocess.Popen(bench.ssh_args(p) + ["cat > /dev/null"],
                                  stdin=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
                block = b"\0" * (1 << 20)
                for _ in range(size >> 20):
                    proc.stdin.write(block)
                proc.stdin.close()
            results[p]["up_mib_s"].append((size >> 20) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            got = 0
            with subprocess.Popen(bench.ssh_args(p) + [f"head -c {size} /dev/zero"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL) as proc:
                while chunk := proc.stdout.read(1 << 20):
                    got += len(chunk)
            if got != size:
                raise RuntimeError(f"{p}: short transfer ({got} of {size} bytes)")
            results[p]["down_mib_s"].append((size >> 20) / (time.perf_counter() - t0))
    return results


def report(results: dict, size: int, rounds: int) -> tuple[dict, str]:
    med = {p: {k: _median(v) for k, v in m.items()} for p, m in results.items()}
    rows = []
    for metric, unit, better in (("setup_s", "s", "lower"), ("up_mib_s", "MiB/s", "higher"),
                                 ("down_mib_s", "MiB/s", "higher")):
        j = med["jit-proxy"][metric]
        for anchor in ("openssh-jump", "direct"):
            a = med[anchor][metric]
            rows.append({"metric": metric, "unit": unit, "better": better, "anchor": anchor,
                         "jit_proxy": j, "anchor_value": a, "ratio": j / a if a else None})
    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    data = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "python": platform.python_version(), "openssh": ssh_version,
                        "asyncssh": asyncssh.__version__},
            "transfer_bytes": size, "rounds": rounds, "medians": med, "ratios": rows}
    md = [f"# jit-proxy benchmark, {data['date']}", "",
          f"{data['machine']['platform']}, {data['machine']['cpus']} CPUs, Python "
          f"{data['machine']['python']}, {ssh_version}, asyncssh {asyncssh.__version__}; "
          f"{rounds} rounds, {size >> 20} MiB transfers, recording on.", "",
          "| metric | anchor | jit-proxy | anchor | ratio jit-proxy/anchor | better |",
          "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['metric']} ({r['unit']}) | {r['anchor']} | {r['jit_proxy']:.3f} | "
                  f"{r['anchor_value']:.3f} | {r['ratio']:.2f} | {r['better']} |")
    return data, "\n".join(md) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size-mib", type=int, default=1024, help="bulk transfer size (MiB)")
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args()
    d = Path(tempfile.mkdtemp(prefix="jit-bench-"))
    os.chmod(d, 0o711)
    bench = Bench(d, ensure_login("jitbench"))
    try:
        bench.start()
        results = measure(bench, ["jit-proxy", "openssh-jump", "direct"], args.rounds,
                          args.size_mib << 20)
    finally:
        bench.stop()
        shutil.rmtree(d, ignore_errors=True)
    data, md = report(results, args.size_mib << 20, args.rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "RESULTS.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

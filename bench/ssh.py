"""SSH measurements with stock OpenSSH clients: connection setup, bulk up/down, pty echo latency.

What it is for: running each measurement alternately through jit-proxy (``ssh -J``, recording on),
through the plain OpenSSH jump host and direct, ``rounds`` times, and adding the samples to the
results: (1) wall time of ``ssh … true``; (2) MiB/s of ``cat > /dev/null`` (up) and ``head -c N
/dev/zero`` (down); (3) round trip of one byte echoed by ``cat`` on the target through a pty in raw
mode (p50 and p99 per path, samples of all rounds pooled).

What it must not do: assert anything (it measures), or use any client but ``ssh``.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time

from bench.env import BenchEnv, stop_process
from bench.stats import Results, percentile

PATHS = ["jit-proxy", "openssh-jump", "direct"]


def setup_once(env: BenchEnv, path: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(env.ssh_args(path) + ["true"], check=True, stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=60)
    return time.perf_counter() - t0


def ciphers(env: BenchEnv, path: str) -> str:
    """The ciphers ``ssh -v`` reports for ``path`` (outer/inner for a jump), as the client chose
    them from what each server offers (jit-proxy offers AES-GCM first: ``ssh.ciphers``)."""
    r = subprocess.run(env.ssh_args(path)[:1] + ["-v"] + env.ssh_args(path)[1:] + ["true"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    found = re.findall(r"kex: server->client cipher: (\S+)", r.stderr)
    return "/".join(found) or "?"


def _session_ready(proc: subprocess.Popen) -> None:
    """Wait for the remote command's READY line: the transfer is timed from there, without the
    connection's setup (measured on its own)."""
    line = proc.stdout.readline()
    if line != b"READY\n":
        raise RuntimeError(f"expected READY from the target, got {line[:200]!r}")


def bulk_up(env: BenchEnv, path: str, size: int) -> tuple[float, float | None]:
    """MiB/s of ``size`` bytes up, and the relay's CPU seconds per GiB (None for direct), both
    from the session's start."""
    with subprocess.Popen(env.ssh_args(path) + ["echo READY; exec cat > /dev/null"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as proc:
        _session_ready(proc)
        with env.relay_cpu(path) as meter:
            t0 = time.perf_counter()
            block = b"\0" * (1 << 20)
            for _ in range(size >> 20):
                proc.stdin.write(block)
            proc.stdin.close()
            proc.wait()
            elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{path}: upload failed ({proc.returncode})")
    return (size >> 20) / elapsed, _per_gib(meter, size)


def bulk_down(env: BenchEnv, path: str, size: int) -> tuple[float, float | None]:
    """As ``bulk_up``, ``size`` bytes down."""
    got = 0
    with subprocess.Popen(env.ssh_args(path) + [f"echo READY; exec head -c {size} /dev/zero"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as proc:
        _session_ready(proc)
        with env.relay_cpu(path) as meter:
            t0 = time.perf_counter()
            while chunk := proc.stdout.read(1 << 20):
                got += len(chunk)
            elapsed = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"{path}: short transfer ({got} of {size} bytes)")
    return (size >> 20) / elapsed, _per_gib(meter, size)


def _per_gib(meter, size: int) -> float | None:
    return meter.used * (1 << 30) / size if meter is not None else None


def _read_until(fd: int, marker: bytes, timeout: float = 20) -> None:
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"no {marker!r} from the target (got {buf[-200:]!r})")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError(f"session ended before {marker!r} (got {buf[-200:]!r})")
        buf += chunk


def echo_latency(env: BenchEnv, path: str, samples: int) -> list[float]:
    """Round trips (seconds) of one byte through a pty in raw mode, echoed by ``cat``."""
    cmd = env.ssh_args(path)
    cmd.insert(1, "-tt")
    proc = subprocess.Popen(cmd + ["stty raw -echo; echo READY; exec cat"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, bufsize=0)
    rtts = []
    try:
        out, inp = proc.stdout.fileno(), proc.stdin.fileno()
        _read_until(out, b"READY")
        for i in range(samples):
            time.sleep(0.002)
            t0 = time.perf_counter()
            os.write(inp, b"x")
            got = b""
            while not got:
                if not select.select([out], [], [], 10)[0]:
                    raise RuntimeError(f"{path}: no echo within 10 s")
                got = os.read(out, 64)
            rtts.append(time.perf_counter() - t0)
    finally:  # (a raw-mode pty ignores EOF: cat would run on, so ssh is stopped instead)
        proc.stdin.close()
        stop_process(proc, 10)
    return rtts


def run(env: BenchEnv, results: Results, rounds: int, size: int, echo_samples: int,
        parts: set[str]) -> None:
    setup = {p: [] for p in PATHS}
    up = {p: [] for p in PATHS}
    down = {p: [] for p in PATHS}
    up_cpu: dict[str, list[float]] = {"jit-proxy": [], "openssh-jump": []}
    down_cpu: dict[str, list[float]] = {"jit-proxy": [], "openssh-jump": []}
    lat = {p: [] for p in PATHS}
    lat_p50 = {p: [] for p in PATHS}
    lat_p99 = {p: [] for p in PATHS}
    for r in range(rounds):
        for p in PATHS:  # alternate, so drifts in the machine's load hit every path alike
            if "ssh" in parts:
                setup[p].append(setup_once(env, p))
                for rates, cpus, transfer in ((up, up_cpu, bulk_up), (down, down_cpu, bulk_down)):
                    rate, cpu = transfer(env, p, size)
                    rates[p].append(rate)
                    if cpu is not None:
                        cpus[p].append(cpu)
            if "latency" in parts:
                s = echo_latency(env, p, echo_samples)
                lat[p] += s
                lat_p50[p].append(percentile(s, 50) * 1000)
                lat_p99[p].append(percentile(s, 99) * 1000)
        print(f"bench: ssh round {r + 1}/{rounds} done", flush=True)
    if "ssh" in parts:
        results.add("ssh", "connection setup (ssh -J … true)", "s", "lower", setup)
        used = "ciphers (outer/inner): " + "; ".join(f"{p} {ciphers(env, p)}" for p in PATHS)
        results.add("ssh", f"bulk up {size >> 20} MiB (cat > /dev/null)", "MiB/s", "higher", up,
                    "timed from the session's start; " + used)
        results.add("ssh", f"bulk down {size >> 20} MiB (head -c)", "MiB/s", "higher", down,
                    "timed from the session's start; " + used)
        note = ("CPU (user + system) from the session's start of jit-proxy, or of the jump "
                "host's per-connection sshd processes (sampled every 20 ms)")
        results.add("ssh", "relay CPU per GiB up", "s", "lower", up_cpu, note)
        results.add("ssh", "relay CPU per GiB down", "s", "lower", down_cpu, note)
    if "latency" in parts:
        pooled = {p: [percentile(v, 50) * 1000] for p, v in lat.items()}
        pooled99 = {p: [percentile(v, 99) * 1000] for p, v in lat.items()}
        note = f"{echo_samples} echoes per round, {rounds} rounds, pooled"
        results.add("latency", "pty 1-byte echo p50", "ms", "lower", pooled, note)
        results.add("latency", "pty 1-byte echo p99", "ms", "lower", pooled99, note)

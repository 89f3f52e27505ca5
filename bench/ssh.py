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
import select
import subprocess
import time
from pathlib import Path

from bench.env import BenchEnv
from bench.stats import Results, percentile

PATHS = ["jit-proxy", "openssh-jump", "direct"]


def setup_once(env: BenchEnv, path: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(env.ssh_args(path) + ["true"], check=True, stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=60)
    return time.perf_counter() - t0


def relay_cpu_per_gib(env: BenchEnv, path: str, transfer, size: int) -> tuple[float, float | None]:
    """Run ``transfer(env, path, size)`` (MiB/s) and also return the relay's CPU seconds per GiB
    it cost (None for the direct path): a figure the machine's other load barely moves."""
    before = env.relay_cpu_s(path)
    rate = transfer(env, path, size)
    if before is None:
        return rate, None
    if path == "openssh-jump":  # its connection's processes count once sshd has reaped them
        children = Path(f"/proc/{env.jump.process.pid}/task/{env.jump.process.pid}/children")
        deadline = time.monotonic() + 5
        while children.exists() and children.read_text().strip() and \
                time.monotonic() < deadline:
            time.sleep(0.02)
    return rate, (env.relay_cpu_s(path) - before) * (1 << 30) / size


def bulk_up(env: BenchEnv, path: str, size: int) -> float:
    t0 = time.perf_counter()
    with subprocess.Popen(env.ssh_args(path) + ["cat > /dev/null"], stdin=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as proc:
        block = b"\0" * (1 << 20)
        for _ in range(size >> 20):
            proc.stdin.write(block)
        proc.stdin.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{path}: upload failed ({proc.returncode})")
    return (size >> 20) / (time.perf_counter() - t0)


def bulk_down(env: BenchEnv, path: str, size: int) -> float:
    t0 = time.perf_counter()
    got = 0
    with subprocess.Popen(env.ssh_args(path) + [f"head -c {size} /dev/zero"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as proc:
        while chunk := proc.stdout.read(1 << 20):
            got += len(chunk)
    if got != size:
        raise RuntimeError(f"{path}: short transfer ({got} of {size} bytes)")
    return (size >> 20) / (time.perf_counter() - t0)


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
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
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
                    rate, cpu = relay_cpu_per_gib(env, p, transfer, size)
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
        results.add("ssh", f"bulk up {size >> 20} MiB (cat > /dev/null)", "MiB/s", "higher", up)
        results.add("ssh", f"bulk down {size >> 20} MiB (head -c)", "MiB/s", "higher", down)
        note = "CPU (user + system) of the relaying process(es) only; the least noisy figure"
        results.add("ssh", "relay CPU per GiB up", "s", "lower", up_cpu, note)
        results.add("ssh", "relay CPU per GiB down", "s", "lower", down_cpu, note)
    if "latency" in parts:
        pooled = {p: [percentile(v, 50) * 1000] for p, v in lat.items()}
        pooled99 = {p: [percentile(v, 99) * 1000] for p, v in lat.items()}
        note = f"{echo_samples} echoes per round, {rounds} rounds, pooled"
        results.add("latency", "pty 1-byte echo p50", "ms", "lower", pooled, note)
        results.add("latency", "pty 1-byte echo p99", "ms", "lower", pooled99, note)

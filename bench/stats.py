"""Medians, percentiles and the results table (JSON and markdown) of one bench run.

What it is for: turning the raw samples each measurement collected into medians per peer and
ratios jit-proxy/peer, and writing RESULTS.json and RESULTS.md with the machine and versions.

What it must not do: measure anything, or judge a figure (goals are compared by the reader).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from datetime import datetime, timezone


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


class Results:
    """Rows of (section, metric, unit, better, {peer: [samples]}) plus single figures."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.notes: list[str] = []

    def add(self, section: str, metric: str, unit: str, better: str,
            samples: dict[str, list[float]], note: str = "") -> None:
        self.rows.append({"section": section, "metric": metric, "unit": unit, "better": better,
                          "samples": samples, "note": note,
                          "median": {p: median(v) for p, v in samples.items()}})

    def to_data(self, args: dict) -> dict:
        ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
        versions = {"python": platform.python_version(), "openssh": ssh_version}
        for mod in ("asyncssh", "asyncpg", "uvloop", "cryptography"):
            try:
                versions[mod] = __import__(mod).__version__
            except Exception:  # noqa: BLE001 - informative only
                pass
        for prog, flag in (("pgbench", "--version"), ("pgbouncer", "--version")):
            try:
                out = subprocess.run([prog, flag], capture_output=True, text=True, timeout=10)
                versions[prog] = (out.stdout or out.stderr).splitlines()[0].strip()
            except (OSError, IndexError, subprocess.SubprocessError):
                pass
        out = []
        for r in self.rows:
            med = r["median"]
            j = med.get("jit-proxy")
            ratios = {p: (j / v if j is not None and v else None)
                      for p, v in med.items() if p != "jit-proxy"}
            out.append({**r, "ratio_jit_proxy_over": ratios})
        return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "versions": versions, "args": args, "rows": out, "notes": self.notes}

    @staticmethod
    def markdown(data: dict) -> str:
        v = data["versions"]
        md = [f"# jit-proxy benchmark, {data['date']}", "",
              f"{data['machine']['platform']}, {data['machine']['cpus']} CPUs; "
              + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
              "Arguments: " + ", ".join(f"{k}={val}" for k, val in data["args"].items()), "",
              "| section | metric | unit | better | jit-proxy | peer | peer value | "
              "ratio jit-proxy/peer | note |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in data["rows"]:
            j = r["median"].get("jit-proxy")
            peers = [p for p in r["median"] if p != "jit-proxy"]
            if not peers:
                md.append(f"| {r['section']} | {r['metric']} | {r['unit']} | {r['better']} | "
                          f"{_fmt(j)} | | | | {r['note']} |")
            for p in peers:
                ratio = r["ratio_jit_proxy_over"].get(p)
                md.append(f"| {r['section']} | {r['metric']} | {r['unit']} | {r['better']} | "
                          f"{_fmt(j)} | {p} | {_fmt(r['median'][p])} | "
                          f"{'' if ratio is None else f'{ratio:.2f}'} | {r['note']} |")
        if data["notes"]:
            md += ["", *[f"- {n}" for n in data["notes"]]]
        return "\n".join(md) + "\n"


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.4f}"

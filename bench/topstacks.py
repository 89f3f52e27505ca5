"""Summarise a py-spy ``--format raw`` profile: the functions with the most samples, self and total.

What it is for: ``python -m bench.topstacks FILE [N]`` after ``python -m bench --profile FILE``.
What it must not do: anything but read FILE and print.
"""

from __future__ import annotations

import collections
import sys


def main(path: str, n: int = 30) -> None:
    self_c: collections.Counter = collections.Counter()
    total_c: collections.Counter = collections.Counter()
    all_samples = 0
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        c = int(count)
        all_samples += c
        frames = stack.split(";")
        self_c[frames[-1]] += c
        for f in set(frames):
            total_c[f] += c
    if not all_samples:
        sys.exit(f"{path}: no samples (py-spy could not read the process, or it was gone)")
    print(f"{all_samples} samples")
    print("--- self ---")
    for f, c in self_c.most_common(n):
        print(f"{100 * c / all_samples:5.1f}%  {f}")
    print("--- total ---")
    for f, c in total_c.most_common(n):
        print(f"{100 * c / all_samples:5.1f}%  {f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30)

"""Authentication method chains, as sshd's AuthenticationMethods: which methods may come next.

What it is for: given the configured chains (``["publickey,keyboard-interactive", "password"]``)
and the methods a connection has completed so far, in order, saying which methods the server offers
next and whether the login is complete. Pure functions, tested on their own.

What it must not do: authenticate anything itself, or let a method complete a chain out of order.
"""

from __future__ import annotations

from typing import Sequence


def _chains(chains: Sequence[str]) -> list[list[str]]:
    return [chain.split(",") for chain in chains]


def next_methods(chains: Sequence[str], completed: Sequence[str]) -> set[str]:
    """Methods that are next in at least one chain whose beginning is exactly ``completed``.
    Empty when the login is complete or no chain fits."""
    done = list(completed)
    return {chain[len(done)] for chain in _chains(chains)
            if len(chain) > len(done) and chain[:len(done)] == done}


def is_complete(chains: Sequence[str], completed: Sequence[str]) -> bool:
    """Whether ``completed`` is exactly one of the chains."""
    return list(completed) in _chains(chains)

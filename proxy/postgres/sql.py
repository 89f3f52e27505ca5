"""Quoting for the few statements that cannot take parameters (CREATE/ALTER/DROP ROLE, REASSIGN).

What it is for: one correct implementation of identifier and literal quoting.
What it must not do: accept NUL bytes (PostgreSQL cannot store them; they would truncate).
"""

from __future__ import annotations


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted identifier (PostgreSQL "Identifiers and Key Words").

    Raises:
        ValueError: empty, longer than 63 bytes, or containing NUL.
    """
    if not name or "\0" in name or len(name.encode()) > 63:
        raise ValueError(f"invalid identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """``value`` as a standard-conforming string constant (no backslash escapes).

    Raises:
        ValueError: containing NUL.
    """
    if "\0" in value:
        raise ValueError("string constants cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"

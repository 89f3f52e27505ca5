"""Quoting for the few statements that cannot take parameters (CREATE/ALTER/DROP ROLE, REASSIGN),
and password literals taken out of SQL before it is audited.

What it is for: one correct implementation of identifier and literal quoting, and of redaction.
What it must not do: accept NUL bytes (PostgreSQL cannot store them; they would truncate), or
let a password literal through to the audit log in any quoting PostgreSQL accepts (redacting too
much is the safe side).
"""

from __future__ import annotations

import re

# PASSWORD followed by a string constant (PostgreSQL "Lexical Structure"): CREATE/ALTER
# ROLE/USER ... [ENCRYPTED] PASSWORD '...' (psql's \\password sends a SCRAM verifier so), a
# foreign server's OPTIONS (password '...'), and ``password = '...'``; comments between are
# skipped. Standard, E'' and U&'' constants (a backslash always taken as an escape, as with
# standard_conforming_strings off: more is redacted, never less) and dollar-quoted ones; an
# unterminated one to the end of the text.
_PASSWORD_LITERAL = re.compile(
    r"""(\bpassword(?:\s|/\*.*?\*/|--[^\n]*(?:\n|\Z))*=?(?:\s|/\*.*?\*/|--[^\n]*(?:\n|\Z))*)
        ( (?:[eE]|[uU]&)?'(?:[^'\\]|''|\\.)*(?:'|\Z)
        | \$(?P<tag>[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*|)\$
          .*?(?:\$(?P=tag)\$|\Z) )""", re.IGNORECASE | re.DOTALL | re.VERBOSE)
REDACTED = "'<redacted>'"


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


def redact_passwords(sql: str) -> str:
    """``sql`` with the string constant after each PASSWORD keyword (and ``password =``)
    replaced by ``'<redacted>'``; ``sql`` itself when it has none. Over-redacts rather than
    misses: a ``password`` inside a comment or another literal is redacted too."""
    if "password" not in sql.lower():
        return sql
    return _PASSWORD_LITERAL.sub(lambda m: m.group(1) + REDACTED, sql)

"""Quoting for the few statements that cannot take parameters (CREATE/ALTER/DROP ROLE, REASSIGN),
and password literals taken out of SQL before it is audited.

What it is for: one correct implementation of identifier and literal quoting, and of redaction.
What it must not do: accept NUL bytes (PostgreSQL cannot store them; they would truncate); let a
password constant through to the audit log in a quoting PostgreSQL accepts; change any other part
of the audited text (hiding what ran would be worse than showing a password); or take more than
linear time (redaction runs on the event loop, for every statement that names a password).
"""

from __future__ import annotations

import re
from typing import Iterator, NamedTuple

REDACTED = "'<redacted>'"
MAX_DEPTH = 3  # string constants holding SQL (DO blocks, EXECUTE '...') looked into, nested

_SPACES = re.compile(r"[ \t\n\r\f\v]+")
_LINE_COMMENT = re.compile(r"--[^\n\r]*")
_COMMENT_MARK = re.compile(r"/\*|\*/")
_STANDARD_BODY = re.compile(r"(?:[^']|'')*")  # after the opening quote
_ESCAPE_BODY = re.compile(r"(?:[^'\\]|\\.|'')*", re.DOTALL)  # with backslash escapes
_IDENT_START = re.compile(r"[A-Za-z_\x80-\U0010ffff]")
_IDENT_REST = re.compile(r"[A-Za-z0-9_$\x80-\U0010ffff]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")
_DIGITS = re.compile(r"[0-9]+")
_E_ESCAPE = re.compile(r"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|u([0-9A-Fa-f]{4})"
                       r"|U([0-9A-Fa-f]{8})|(.))|''", re.DOTALL)
_E_SIMPLE = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_U_ESCAPE = re.compile(r"\\(?:\+([0-9A-Fa-f]{6})|([0-9A-Fa-f]{4})|(\\))")
# inside a string constant: a libpq connection string's password (CREATE SUBSCRIPTION ...
# CONNECTION, dblink) and a URI's (postgresql://user:SECRET@host)
_CONNINFO_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s']*)", re.I)
_URI_PASSWORD = re.compile(r"(://[^:/@\s]*:)([^@\s/]*)(@)")


class _Token(NamedTuple):
    kind: str   # space, comment, string, ident, qident, other
    start: int
    end: int
    text: str = ""    # ident: lowercased; qident: the name; string: its style (see _scan)
    newline: bool = False  # space or comment: holds or ends at a line break
    closed: bool = True  # string: its closing quote came (not cut off at the end)


def _string_end(sql: str, i: int, backslash: bool) -> tuple[int, bool]:
    """(end, closed) of the string constant whose opening quote is at ``i`` (the end of
    ``sql``, not closed, when it is cut off): '' is a quote; with ``backslash``, a backslash
    escapes the next character."""
    j = (_ESCAPE_BODY if backslash else _STANDARD_BODY).match(sql, i + 1).end()
    if j < len(sql) and sql[j] == "'":
        return j + 1, True
    return len(sql), False  # (a lone backslash at the very end, or no closing quote)


def _scan(sql: str, standard_strings: bool) -> Iterator[_Token]:
    """PostgreSQL's lexical structure (PostgreSQL 15 docs, "Lexical Structure"), just enough
    to tell comments, string constants and identifiers apart, in one pass."""
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if m := _SPACES.match(sql, i):
            yield _Token("space", i, m.end(), newline="\n" in m[0] or "\r" in m[0])
            i = m.end()
        elif m := _LINE_COMMENT.match(sql, i):
            yield _Token("comment", i, m.end())
            i = m.end()
        elif sql.startswith("/*", i):  # nested, as PostgreSQL's are
            depth, j = 1, n
            for mark in _COMMENT_MARK.finditer(sql, i + 2):
                depth += 1 if mark[0] == "/*" else -1
                if not depth:
                    j = mark.end()
                    break
            body = sql[i:j]
            yield _Token("comment", i, j, newline="\n" in body or "\r" in body)
            i = j
        elif c == "'":
            j, closed = _string_end(sql, i, backslash=not standard_strings)
            yield _Token("string", i, j, "'" if standard_strings else "e", closed=closed)
            i = j
        elif c in "eEbBxXnN" and sql.startswith("'", i + 1):
            style = "e" if c in "eE" else "'" if c in "nN" else "bits"
            j, closed = _string_end(sql, i + 1, backslash=style == "e" or not standard_strings)
            yield _Token("string", i, j, style if standard_strings or style == "bits" else "e",
                         closed=closed)
            i = j
        elif c in "uU" and sql.startswith("&'", i + 1):
            j, closed = _string_end(sql, i + 2, backslash=False)
            yield _Token("string", i, j, "u&", closed=closed)
            i = j
        elif c == '"' or (c in "uU" and sql.startswith('&"', i + 1)):
            q = i if c == '"' else i + 2
            j, closed = q + 1, False
            while j < n:
                if sql[j] == '"':
                    if sql.startswith('""', j):
                        j += 2
                        continue
                    j, closed = j + 1, True
                    break
                j += 1
            name = sql[q + 1:j - 1 if closed else j].replace('""', '"')
            if c != '"':
                name = _U_ESCAPE.sub(lambda m: chr(int(m[1] or m[2], 16)) if m[3] is None
                                     else "\\", name)
            yield _Token("qident", i, j, name)
            i = j
        elif c == "$" and (m := _DOLLAR_TAG.match(sql, i)):
            close = sql.find(m[0], m.end())
            j = n if close < 0 else close + len(m[0])
            yield _Token("string", i, j, m[0], closed=close >= 0)
            i = j
        elif _IDENT_START.match(c):
            j = _IDENT_REST.match(sql, i + 1).end()
            yield _Token("ident", i, j, sql[i:j].lower())
            i = j
        elif c.isdigit() and (m := _DIGITS.match(sql, i)):
            yield _Token("other", i, m.end())
            i = m.end()
        else:
            yield _Token("other", i, i + 1, c)
            i += 1


def _closing(tok: _Token) -> str:
    """A string constant's closing delimiter."""
    return tok.text if tok.text.startswith("$") else "'"


def _content(sql: str, tok: _Token) -> str | None:
    """A string constant's value, for the styles that can hold SQL (None for the others)."""
    style, end = tok.text, tok.end - (len(_closing(tok)) if tok.closed else 0)
    if style == "'":
        return sql[tok.start + 1:end].replace("''", "'")
    if style == "e":
        body = sql[sql.index("'", tok.start) + 1:end]

        def unescape(m: re.Match) -> str:
            if m[0] == "''":
                return "'"
            if m[1]:
                return chr(int(m[1], 8) & 0xFF)
            code = m[2] or m[3] or m[4]
            if code:
                return chr(min(int(code, 16), 0x10FFFF))
            return _E_SIMPLE.get(m[5], m[5])
        return _E_ESCAPE.sub(unescape, body)
    if style.startswith("$"):
        return sql[tok.start + len(style):end]
    return None


def _requote(value: str, style: str) -> str:
    if style == "'":
        return quote_literal(value.replace("\0", ""))
    if style == "e":
        return "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return style + value + style  # dollar quoting: a redacted body holds no new $tag$


def redact_passwords(sql: str, standard_strings: bool = True, _depth: int = 0) -> str:
    """``sql`` with password constants replaced by ``'<redacted>'``, or ``sql`` itself when it
    holds none. What is redacted: the string constant after the word PASSWORD (CREATE/ALTER
    ROLE/USER ... [ENCRYPTED] PASSWORD '...', psql's \\password and its SCRAM verifier, a
    user mapping's OPTIONS (password '...'), ``password = '...'``), with the constants it
    continues into across a line break; inside other string constants (DO blocks, EXECUTE,
    CREATE FUNCTION bodies; ``MAX_DEPTH`` deep) the same, and a connection string's
    ``password=`` or a URI's password. Nothing else changes: the text around is audited as
    sent.

    Args:
        sql: one statement or several, as the client sent them.
        standard_strings: the session's ``standard_conforming_strings`` (a backslash in '...'
            is then no escape), as the server reports it in ParameterStatus.

    Runs in time linear in ``len(sql)`` per nesting level (PostgreSQL 15 docs, "Lexical
    Structure": comments nest, '' is a quote, E'' takes backslash escapes, dollar quoting)."""
    low = sql.lower()
    if "password" not in low and "u&" not in low and "://" not in low:  # (U&"p\0061ssword")
        return sql
    tokens = list(_scan(sql, standard_strings))
    replace: dict[int, str] = {}  # token index: its new text

    def significant(k: int) -> tuple[int, bool]:
        """The next token at or after ``k`` that is no space or comment, and whether a line
        break came before it."""
        newline = False
        while k < len(tokens) and tokens[k].kind in ("space", "comment"):
            newline = newline or tokens[k].newline or (
                tokens[k].kind == "comment" and tokens[k].end < len(sql))  # (a -- line's end)
            k += 1
        return k, newline

    for k, tok in enumerate(tokens):
        if tok.kind in ("ident", "qident") and tok.text == "password":  # (quoted: as spelt)
            j, _ = significant(k + 1)
            if j < len(tokens) and tokens[j].kind == "other" and tokens[j].text == "=":
                j, _ = significant(j + 1)
            while j < len(tokens) and tokens[j].kind == "string" and tokens[j].text != "bits":
                replace[j] = REDACTED
                j, newline = significant(j + 1)  # 'ab'<newline>'cd' is one constant
                if not newline:
                    break
        elif tok.kind == "string" and k not in replace and _depth < MAX_DEPTH:
            value = _content(sql, tok)
            if value is None or ("password" not in value.lower() and "u&" not in value.lower()
                                 and "://" not in value):
                continue
            inner = redact_passwords(value, standard_strings, _depth + 1)
            inner = _CONNINFO_PASSWORD.sub(lambda m: m[1] + "<redacted>", inner)
            inner = _URI_PASSWORD.sub(lambda m: m[1] + "<redacted>" + m[3], inner)
            if inner != value:
                quoted = _requote(inner, tok.text)  # (cut off as the original was)
                replace[k] = quoted if tok.closed else quoted[:-len(_closing(tok))]
    if not replace:
        return sql
    out, last = [], 0
    for k in sorted(replace):
        out.append(sql[last:tokens[k].start])
        out.append(replace[k])
        last = tokens[k].end
    out.append(sql[last:])
    return "".join(out)


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

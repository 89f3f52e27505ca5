"""proxy.postgres.sql.redact_passwords: no password literal reaches the audit log, in any quoting
PostgreSQL accepts; everything else is left as it was."""

from __future__ import annotations

from hypothesis import given, strategies as st

from proxy.postgres.sql import REDACTED, quote_literal, redact_passwords

# printable secrets long enough not to occur by chance in the statement around them
SECRETS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                  min_size=6, max_size=40).filter(lambda s: s.strip() == s and "$" not in s)


def e_literal(value: str) -> str:
    return "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@given(SECRETS, st.sampled_from(["ALTER ROLE app PASSWORD {}",
                                 "alter user app with encrypted password {} valid until 'x'",
                                 "CREATE ROLE app LOGIN PASSWORD\n\t{};",
                                 "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', "
                                 "password {})",
                                 "ALTER ROLE app PASSWORD /* it */ {} -- done"]),
       st.sampled_from([quote_literal, e_literal, lambda v: f"$q${v}$q$", lambda v: f"$${v}$$"]))
def test_the_literal_after_password_never_shows(secret, statement, quote):
    sql = statement.format(quote(secret))
    shown = redact_passwords(sql)
    assert secret not in shown
    assert shown == statement.format(REDACTED)


@given(st.text(max_size=200).filter(lambda s: "password" not in s.lower()))
def test_sql_without_the_word_is_the_same_object(sql):
    assert redact_passwords(sql) is sql


def test_what_is_not_a_password_literal_stays():
    for sql in ("SELECT password_hash FROM users", "ALTER ROLE app PASSWORD NULL",
                "SELECT 'no secret here'", "UPDATE t SET passwords_changed = 1"):
        assert redact_passwords(sql) == sql


def test_a_literal_cut_off_or_with_backslashes_is_redacted_to_the_end():
    # unterminated (the audit keeps the first 64 KiB of a statement), and a backslash taken as
    # an escape as with standard_conforming_strings off: more is redacted, never less
    assert redact_passwords("ALTER ROLE a PASSWORD 'cut off her") == f"ALTER ROLE a PASSWORD {REDACTED}"
    assert "cret" not in redact_passwords("ALTER ROLE a PASSWORD 'se\\'cret'; SELECT 1")

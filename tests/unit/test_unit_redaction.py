"""proxy.postgres.sql.redact_passwords: no password constant reaches the audit log in the quotings
PostgreSQL accepts, nothing else of the statement changes, and crafted input cannot make it slow
(it runs on the event loop)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from proxy.postgres.sql import REDACTED, quote_literal, redact_passwords

SECRETS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0$"),
                  min_size=6, max_size=40)


def e_literal(value: str) -> str:
    return "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def continued(value: str) -> str:  # 'ab'<newline>'cd' is one constant
    return quote_literal(value[:3]) + "\n  " + quote_literal(value[3:])


STATEMENTS = ["ALTER ROLE app PASSWORD {}",
              "alter user app with encrypted password {} valid until 'infinity'",
              "CREATE ROLE app LOGIN PASSWORD\n\t{};",
              "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', password {})",
              'CREATE USER MAPPING FOR app SERVER s OPTIONS (user \'u\', "password" {})',
              "ALTER ROLE app PASSWORD /* it /* nests */ */ {} -- done",
              "ALTER ROLE app PASSWORD --\r{}",
              "UPDATE accounts SET password = {} WHERE id = 1"]
QUOTINGS = [quote_literal, e_literal, continued, lambda v: f"$q${v}$q$", lambda v: f"$${v}$$"]


@given(SECRETS, st.sampled_from(STATEMENTS), st.sampled_from(QUOTINGS))
def test_the_constant_after_password_never_shows(secret, statement, quote):
    expected = statement.format(REDACTED if quote is not continued
                                else f"{REDACTED}\n  {REDACTED}")
    sql = statement.format(quote(secret))
    assert redact_passwords(sql) == expected
    if secret not in expected:
        assert secret not in redact_passwords(sql)


@given(SECRETS)
def test_sql_that_runs_sql_is_looked_into(secret):
    """A DO block or EXECUTE holds the statement in a string constant, quotes doubled."""
    inner = f"ALTER ROLE app PASSWORD {quote_literal(secret)}"
    sql = f"DO $body$BEGIN EXECUTE {quote_literal(inner)}; END$body$"
    shown = redact_passwords(sql)
    assert shown == ("DO $body$BEGIN EXECUTE 'ALTER ROLE app PASSWORD ''<redacted>'''; "
                     "END$body$")
    sql = f"SELECT {e_literal(inner)}"
    assert redact_passwords(sql) == "SELECT E'ALTER ROLE app PASSWORD \\'<redacted>\\''"


@given(st.text(max_size=300))
def test_any_text_is_read_and_without_those_words_is_the_same_object(sql):
    shown = redact_passwords(sql)
    low = sql.lower()
    if "password" not in low and "u&" not in low and "://" not in low:
        assert shown is sql


def test_nothing_but_password_constants_changes():
    for sql in ("SELECT password_hash FROM users", "ALTER ROLE app PASSWORD NULL",
                "SELECT 'no secret here'", "UPDATE t SET passwords_changed = 1",
                "SELECT 1 AS password", "SELECT 'password' AS word"):
        assert redact_passwords(sql) == sql
    # the backslash ends nothing with standard_conforming_strings on (the default): the
    # constant is 'p1\', and the next statement is audited as sent, its own password redacted
    sql = "ALTER ROLE a PASSWORD 'p1\\'; SELECT 1; ALTER ROLE b PASSWORD 'two'"
    assert redact_passwords(sql) == ("ALTER ROLE a PASSWORD '<redacted>'; SELECT 1; "
                                     "ALTER ROLE b PASSWORD '<redacted>'")
    # off: the backslash escapes the quote, so the constant runs on (as the server reads it)
    assert redact_passwords(sql, standard_strings=False) == \
        "ALTER ROLE a PASSWORD '<redacted>'two'"


def test_other_spellings_of_the_word_and_of_a_password():
    cases = {
        # an option name written as a quoted identifier, plain or with Unicode escapes
        "OPTIONS (user 'u', U&\"p\\0061ssword\" 'secret1')":
            "OPTIONS (user 'u', U&\"p\\0061ssword\" '<redacted>')",
        # PostgreSQL 14 reads 5PASSWORD as 5 and PASSWORD
        "CREATE ROLE a CONNECTION LIMIT 5PASSWORD 'secret2'":
            "CREATE ROLE a CONNECTION LIMIT 5PASSWORD '<redacted>'",
        # a connection string and a URI inside a constant
        "CREATE SUBSCRIPTION s CONNECTION 'host=h password=secret3 dbname=d' PUBLICATION p":
            "CREATE SUBSCRIPTION s CONNECTION 'host=h password=<redacted> dbname=d' "
            "PUBLICATION p",
        "SELECT dblink_connect('postgresql://app:secret4@db/x')":
            "SELECT dblink_connect('postgresql://app:<redacted>@db/x')",
        # cut off (the audit keeps the first 64 KiB of a statement)
        "ALTER ROLE a PASSWORD 'cut off her": "ALTER ROLE a PASSWORD '<redacted>'",
        "ALTER ROLE a PASSWORD E'cut\\": "ALTER ROLE a PASSWORD '<redacted>'",
    }
    for sql, shown in cases.items():
        assert redact_passwords(sql) == shown, sql


@pytest.mark.parametrize("crafted", [
    "'ALTER ROLE x PASSWORD ' + '/**/' * 60 + ' NULL'",
    "'password /*' * 6000", "'password--' * 6500", "\"password '\" * 6000",
    "\"E'password\\\\\" * 6000", "'/*' * 30000 + 'password'", "'$$password' * 6000"])
def test_crafted_statements_end(crafted):
    """A regex with nested quantifiers took 30 s for 22 empty comments after PASSWORD (and
    doubled with each one), holding up every session of the proxy meanwhile. This is no speed
    measurement: work linear in the text ends in milliseconds, exponential work never."""
    code = (f"from proxy.postgres.sql import redact_passwords\n"
            f"redact_passwords({crafted})\nprint('done')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout == "done\n", r.stderr

"""parse_duration / format_duration: the accepted forms, the refused ones, and round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.access.duration import MAX_DURATION, format_duration, parse_duration


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30),
    ("15m", 900),
    ("2h", 7200),
    ("1d", 86400),
    ("1w", 604800),
    ("1h30m", 5400),
    ("1d2h3m4s", 86400 + 7200 + 180 + 4),
    ("90s", 90),
    (" 15m ", 900),     # surrounding blanks are ignored
    ("2H", 7200),       # units are case-insensitive
    ("0h30m", 1800),    # a zero part is fine when the total is positive
])
def test_parse_good_forms(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", "   ", "2x", "-5m", "5", "1.5h", "h", "m30", "1h 30m", "1 h", "+5m", "5mm",
    "1h-30m", "10000000000s",  # more than 9 digits in one part
])
def test_parse_bad_forms_explain_the_accepted_forms(text):
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    message = str(info.value)
    assert repr(text) in message
    assert "30s" in message and "15m" in message and "2h" in message


@pytest.mark.parametrize("text", ["0s", "0m", "0h0m0s", "000d"])
def test_parse_zero_is_refused(text):
    with pytest.raises(ValueError, match=r"must be longer than 0s"):
        parse_duration(text)


@pytest.mark.parametrize("seconds, text", [
    (1, "1s"), (59, "59s"), (60, "1m"), (61, "1m1s"), (3600, "1h"), (5400, "1h30m"),
    (86400, "1d"), (90061, "1d1h1m1s"), (604800, "7d"), (29.6, "30s"), (0, "0s"), (-5, "0s"),
])
def test_format(seconds, text):
    assert format_duration(seconds) == text


# parse_duration refuses anything longer than MAX_DURATION (366 days).
MAX_ROUND_TRIP = MAX_DURATION


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=MAX_ROUND_TRIP))
def test_round_trip_seconds(n):
    assert parse_duration(format_duration(n)) == n


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 365), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
def test_round_trip_canonical_text(d, h, m, s):
    text = "".join(f"{n}{u}" for n, u in ((d, "d"), (h, "h"), (m, "m"), (s, "s")) if n)
    if not text:
        with pytest.raises(ValueError):
            parse_duration("0s")
        return
    assert format_duration(parse_duration(text)) == text


@pytest.mark.parametrize("text", ["\u0663m", "\uff11h", "1\u0660m"])
def test_non_ascii_digits_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)

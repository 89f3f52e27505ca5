"""parse_duration on arbitrary text: a positive int or a ValueError, nothing else."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.access.duration import format_duration, parse_duration

DURATION_ISH = st.text(alphabet="0123456789smhdwSMHDW .-+x\t", max_size=24)


def _check(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        assert str(exc).startswith("invalid duration "), str(exc)
        return
    assert type(seconds) is int and seconds > 0
    # whatever was accepted formats to text that parses back to the same number of seconds
    assert parse_duration(format_duration(seconds)) == seconds


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=40))
def test_parse_arbitrary_text(text):
    _check(text)


@settings(max_examples=400, deadline=None)
@given(DURATION_ISH)
def test_parse_duration_like_text(text):
    _check(text)

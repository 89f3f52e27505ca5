"""proxy.runtime.recordings.TerminalFilter: what `recordings play` sends to an auditor's terminal.
A recorded user must not set the auditor's title, write their clipboard or make the terminal
answer (found by an attack review: OSC 0 and OSC 52 were played as recorded), while what draws
the session (text, colours, cursor movement) passes unchanged, however the output was split."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.runtime.recordings import TerminalFilter, frames


def run(*pieces: str) -> str:
    f = TerminalFilter()
    return "".join(f.feed(p) for p in pieces)


def test_drawing_passes_unchanged():
    text = "plain \x1b[1;31mred\x1b[0m \x1b[2J\x1b[H\x1b[?25l\x1b[10;5Hé\r\n\ttab \x1b7\x1b8 ünï"
    assert run(text) == text


def test_control_strings_and_window_operations_are_dropped():
    assert run("a\x1b]0;TITLE\x07b") == "ab"                       # title, BEL-ended
    assert run("a\x1b]52;c;ZWNobyBwd25lZA==\x1b\\b") == "ab"        # clipboard, ST-ended
    assert run("a\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\b") == "alinkb"  # hyperlink
    assert run("a\x1bP+q544e\x1b\\b") == "ab"                      # DCS (XTGETTCAP)
    assert run("a\x1b_apc\x1b\\b\x1b^pm\x9cc\x1bXsos\x07d") == "abcd"  # APC, PM, SOS
    assert run("a\x9d0;TITLE\x9cb\x90dcs\x9cc") == "abc"           # 8-bit forms
    assert run("a\x1b]0;never ends \x18b") == "ab"                  # CAN cuts it
    assert run("a\x1b[21tb\x1b[8;100;100tc\x9b14td") == "abcd"      # report title, resize
    assert run("a\x1bktitle\x1b\\b") == "ab"                          # screen's title
    assert run("a\x1b[6nb\x1b[cc\x1b[>0qd\x1b[?25$pe") == "abcde"     # queries answered as input


def test_a_sequence_split_anywhere_is_still_dropped():
    text = "x\x1b]52;c;QUJD\x1b\\y\x1b[21tz"
    for i in range(len(text)):
        assert run(text[:i], text[i:]) == "xyz"


def test_a_string_inside_a_cut_or_overlong_csi_is_still_dropped():
    assert run("a\x1b[1;2\x1b]0;T\x07b") == "ab"
    assert run("a\x1b[" + "1" * 100 + "\x1b]52;c;QQ==\x07b") == "a" + "1" * 37 + "b"


def test_a_recording_with_unicode_line_separators_plays():
    """The recorder writes U+2028 and U+0085 as they are (valid JSON); str.splitlines broke the
    file there, so a user could make their own session unplayable (found by an attack review)."""
    cast = '{"version": 2, "width": 80, "height": 24}\n[0.1, "o", "a\u2028b\u0085c"]\n'
    assert "".join(text for _, text in frames(cast)) == "a\u2028b\u0085c"


def test_frames_filter_the_whole_recording():
    cast = "\n".join(['{"version": 2, "width": 80, "height": 24}', '[0.1, "o", "a\\u001b]0;"]',
                      '[0.2, "i", "typed"]', '[0.3, "o", "TITLE\\u0007b"]'])
    assert "".join(text for _, text in frames(cast)) == "ab"


ALPHABET = st.sampled_from(["a", "é", "\x1b", "[", "]", "P", "_", "^", "X", "\\", "\x07", "\x9c",
                            "\x9d", "\x9b", "\x90", "\x18", "0", ";", "t", "m", "?", " ", "\n",
                            "k", "n", "c"])


@settings(max_examples=400)
@given(st.lists(ALPHABET, max_size=60).map("".join), st.lists(st.integers(0, 60), max_size=5))
def test_any_split_gives_the_same_and_nothing_acts_on_the_terminal(text, cuts):
    whole = run(text)
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    assert run(*pieces) == whole
    assert not re.search(r"\x1b[\]PX^_k]|[\x9d\x90\x98\x9e\x9f]", whole), repr(whole)
    assert not re.search(r"(\x1b\[|\x9b)[ -?]*[tnc]", whole), repr(whole)

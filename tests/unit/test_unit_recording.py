"""proxy.audit.recording.AsciicastRecorder: a valid asciicast v2 file, UTF-8 split across writes,
the SHA-256 of exactly the file's bytes, mode 0600, idempotent close."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import subprocess

import pytest

from proxy.audit.recording import AsciicastRecorder
from proxy.clock import ManualClock

T0 = 1_800_000_000.5
META = {"user": "alice", "target": "web1", "login": "deploy", "grant": 3, "session": 9}


def recorder(path, clock, **kw):
    args = dict(width=120, height=40, clock=clock, title="alice: deploy@web1",
                env={"TERM": "xterm-256color", "SHELL": "/bin/bash"}, meta=META)
    args.update(kw)
    return AsciicastRecorder(path, **args)


def read_cast(path):
    # split on "\n" only: str.splitlines() would also split inside events at U+2028 etc.
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines.pop() == "", "the file ends with a newline"
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def test_valid_asciicast_v2(tmp_path):
    path = tmp_path / "rec" / "s.cast"
    clock = ManualClock(T0)
    rec = recorder(path, clock)
    rec.output(b"$ ls\r\n")
    clock.advance(0.25)
    rec.output(b"file1  file2\r\n")
    clock.advance(1.000_000_4)
    rec.resize(100, 30)
    rec.output("\u00e9t\u00e9 \u2603\n".encode())
    digest = rec.close()

    header, events = read_cast(path)
    assert header["version"] == 2
    assert (header["width"], header["height"]) == (120, 40)
    assert header["timestamp"] == int(T0)
    assert header["title"] == "alice: deploy@web1"
    assert header["env"] == {"TERM": "xterm-256color", "SHELL": "/bin/bash"}
    assert header["jit_proxy"] == META
    assert events == [
        [0.0, "o", "$ ls\r\n"],
        [0.25, "o", "file1  file2\r\n"],
        [1.25, "r", "100x30"],
        [1.25, "o", "\u00e9t\u00e9 \u2603\n"],
    ]
    for t, code, data in events:
        assert isinstance(t, float) and code in ("o", "r") and isinstance(data, str)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_times_never_decrease_and_are_relative(tmp_path):
    path = tmp_path / "s.cast"
    clock = ManualClock(T0)
    rec = recorder(path, clock)
    for step in (0.1, 0.0, 2.5, 0.001):
        clock.advance(step)
        rec.output(b"x")
    clock.advance(-10)  # a clock stepped back before the start: clamped, never negative
    rec.output(b"y")
    rec.close()
    _, events = read_cast(path)
    times = [e[0] for e in events]
    assert times == [0.1, 0.1, 2.6, 2.601, 0.0]


@pytest.mark.parametrize("text", ["\u00e9", "\u2603", "\U0001F600", "a\u00e9b\u4e2d\U0001F680c"])
def test_utf8_split_across_calls(tmp_path, text):
    data = text.encode()
    for cut in range(1, len(data)):
        path = tmp_path / f"split-{cut}.cast"
        rec = recorder(path, ManualClock(T0))
        rec.output(data[:cut])
        rec.output(data[cut:])
        rec.close()
        _, events = read_cast(path)
        assert "".join(e[2] for e in events) == text
        assert "\ufffd" not in "".join(e[2] for e in events)


def test_utf8_one_byte_at_a_time(tmp_path):
    text = "h\u00e9llo \U0001F600 w\u00f6rld \u4e2d\u6587"
    path = tmp_path / "bytes.cast"
    rec = recorder(path, ManualClock(T0))
    for b in text.encode():
        rec.output(bytes([b]))
    rec.close()
    _, events = read_cast(path)
    assert "".join(e[2] for e in events) == text
    assert all(e[2] for e in events)  # no empty events for incomplete sequences


def test_invalid_utf8_is_replaced_not_fatal(tmp_path):
    path = tmp_path / "bad.cast"
    rec = recorder(path, ManualClock(T0))
    rec.output(b"ok \xff\xfe end")
    rec.output(b"\xe2\x98")  # an incomplete sequence left at close
    digest = rec.close()
    _, events = read_cast(path)
    text = "".join(e[2] for e in events)
    assert text.startswith("ok ") and "end" in text and "\ufffd" in text
    assert text.endswith("\ufffd")
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_control_characters_survive_json(tmp_path):
    path = tmp_path / "ctl.cast"
    rec = recorder(path, ManualClock(T0))
    payload = "\x1b[31mred\x1b[0m\t\"quoted\"\\ \x00\x07\u2028"
    rec.output(payload.encode())
    rec.close()
    raw = path.read_bytes()
    assert raw.count(b"\n") == 2  # header + one event: nothing breaks a line
    _, events = read_cast(path)
    assert events[0][2] == payload


def test_close_returns_sha256_of_file_and_is_idempotent(tmp_path):
    path = tmp_path / "s.cast"
    rec = recorder(path, ManualClock(T0))
    rec.output(b"hello\r\n" * 1000)
    first = rec.close()
    size = path.stat().st_size
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rec.sha256 == first
    assert rec.close() == first
    assert path.stat().st_size == size


def test_empty_recording(tmp_path):
    path = tmp_path / "empty.cast"
    rec = recorder(path, ManualClock(T0))
    digest = rec.close()
    header, events = read_cast(path)
    assert header["version"] == 2 and events == []
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_mode_0600_and_never_overwrites(tmp_path):
    path = tmp_path / "recordings" / "alice" / "s.cast"
    rec = recorder(path, ManualClock(T0))
    rec.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # every directory the recorder had to create is private, not only the innermost
    for d in (tmp_path / "recordings", tmp_path / "recordings" / "alice"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    with pytest.raises(FileExistsError):
        recorder(path, ManualClock(T0))


@pytest.mark.parametrize("w, h, ew, eh", [(0, 0, 80, 24), (None, None, 80, 24), (-5, -1, 1, 1)])
def test_size_defaults(tmp_path, w, h, ew, eh):
    path = tmp_path / "s.cast"
    recorder(path, ManualClock(T0), width=w, height=h).close()
    header, _ = read_cast(path)
    assert (header["width"], header["height"]) == (ew, eh)


@pytest.mark.skipif(shutil.which("asciinema") is None, reason="asciinema is not installed")
def test_stock_player_reads_it(tmp_path):
    path = tmp_path / "play.cast"
    clock = ManualClock(T0)
    rec = recorder(path, clock)
    rec.output("h\u00e9".encode()[:2])
    rec.output("h\u00e9".encode()[2:] + b"llo\r\n")
    clock.advance(0.5)
    rec.resize(90, 30)
    rec.output(b"\x1b[1mworld\x1b[0m\r\n")
    rec.close()
    out = subprocess.run(["asciinema", "cat", str(path)], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "h\u00e9llo\r\n\x1b[1mworld\x1b[0m\r\n".encode()

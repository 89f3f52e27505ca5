"""proxy.audit.log with arbitrary event field values: the chain always verifies, the lines read
back equal what emit returned, and an edit to any event is located."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.audit.log import AuditLog, canonical, verify_log
from proxy.clock import ManualClock

T0 = 1_800_000_000.0


SCALARS = st.one_of(st.text(max_size=30), st.integers(), st.booleans(), st.none(),
                    st.floats(allow_nan=False, allow_infinity=False))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)
FIELD_NAMES = st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True).filter(
    lambda n: n not in ("ts", "type", "actor", "prev", "hash")
    and not any(s in n for s in ("pass", "secret", "private", "token")))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=20), st.dictionaries(FIELD_NAMES, VALUES, max_size=4)),
                min_size=1, max_size=6))
def test_random_events_verify(events):
    with tempfile.TemporaryDirectory() as d:
        _check_events(Path(d) / "audit.jsonl", events)


def _check_events(path: Path, events) -> None:
    clock = ManualClock(T0)
    log = AuditLog(path, clock)
    written = []
    for actor, fields in events:
        written.append(log.emit("test.event", actor, **fields))
        clock.advance(0.001)
    log.close()
    result = verify_log(path)
    assert result.ok and result.lines == len(events), result
    read_back = [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]
    assert read_back == written
    # and a one-character change to an actor is caught on that line
    if any(actor for actor, _ in events):
        i = next(i for i, (actor, _) in enumerate(events) if actor)
        lines = path.read_bytes().split(b"\n")
        obj = json.loads(lines[i])
        obj["actor"] = obj["actor"] + "x"
        lines[i] = canonical(obj)
        path.write_bytes(b"\n".join(lines))
        bad = verify_log(path)
        assert not bad.ok and bad.bad_line == i + 1

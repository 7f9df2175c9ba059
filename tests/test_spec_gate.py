"""The draft back-off gate (tierserve/engine/spec_decode/gate.py): exact step sequences."""

from __future__ import annotations

from tierserve.engine.spec_decode.gate import DraftGate


def run(outcomes: list[int], steps: int, gate: DraftGate) -> str:
    """A request over ``steps`` steps; each allowed step verifies and takes the next outcome (accepted count).
    Returns one letter per step: V verified, s skipped."""
    trace, it = [], iter(outcomes)
    for _ in range(steps):
        if gate.allow():
            gate.record(next(it))
            trace.append("V")
        else:
            trace.append("s")
    return "".join(trace)


def test_misses_pause_with_doubling_up_to_the_cap():
    # 2 misses -> pause 2; probe misses -> 4; -> 8; -> 16; -> 32; -> 32 (capped)
    trace = run([0] * 20, 2 + 2 + 1 + 4 + 1 + 8 + 1 + 16 + 1 + 32 + 1 + 32 + 1, DraftGate(patience=2))
    assert trace == "VV" + "ss" + "V" + "s" * 4 + "V" + "s" * 8 + "V" + "s" * 16 + "V" + "s" * 32 + "V" \
        + "s" * 32 + "V"


def test_a_hit_resets_the_gate():
    g = DraftGate(patience=2)
    # miss, miss -> pause 2; probe misses -> pause 4; probe hits (3 accepted): reset, so the next two
    # misses are needed before a fresh pause of 2
    assert run([0, 0, 0, 3, 0, 0], 12, g) == "VVss" + "V" + "ssss" + "V" + "VV"
    assert (g.pause, g.skip, g.misses) == (2, 2, 0)


def test_hits_never_pause():
    g = DraftGate(patience=2)
    assert run([1, 0, 2, 0, 1, 0, 4], 7, g) == "V" * 7 and g.pause == 0


def test_never_accepting_request_verifies_rarely_once_backed_off():
    g = DraftGate(patience=2)
    trace = run([0] * 1000, 1000, g)
    # 2 misses, then probes after pauses 2, 4, 8, 16 (2+2+1+4+1+8+1+16+1 = 36 steps, 6 verifications);
    # from then on a pause of 32 and one probe: one verification per 33 steps
    tail = trace[36:]
    assert trace[:36].count("V") == 6
    assert all(tail[i] == ("V" if i % 33 == 32 else "s") for i in range(len(tail)))

"""Smoke test of ``python -m benchmarks.encryption_cost`` on a small count."""

from __future__ import annotations

import io

from benchmarks.encryption_cost import SETUPS, main


def test_prints_a_row_per_setup_format_and_payload() -> None:
    out = io.StringIO()
    assert main(["--messages", "20", "--repeats", "1"], out=out) == 0
    rows = out.getvalue().splitlines()[2:]
    assert len(rows) == len(SETUPS) * 2 * 2
    encrypted = [r.split() for r in rows if r.split()[2] == "encrypted"]
    plain = [r.split() for r in rows if r.split()[2] == "plain"]
    # the sealed body is the plain one plus the task id framing (2 + 32), nonce (12), tag (16)
    assert [int(r[3]) - int(p[3]) for r, p in zip(encrypted, plain, strict=True)] == [62] * 4

"""Seats out of placement come back by their own rule: a window, changed checkpoint files, or never."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rallypoint.daemon.seats import OutSeats, fingerprint


def test_a_window_brings_a_seat_back_and_nothing_else_does(tmp_path: Path) -> None:
    seats = OutSeats(str(tmp_path))
    seats.take_out(0, "restart budget spent", retry_after=5.0)
    seats.take_out(1, "GPU 1: Xid 79")
    now = time.monotonic()
    assert seats.bring_back_due(now + 1) == []
    assert seats.bring_back_due(now + 6) == [(0, "its restart window ended")]
    assert seats.local_ranks() == (1,) and seats.reasons() == {"1": "GPU 1: Xid 79"}
    assert seats.bring_back_due(now + 10_000) == []  # an unhealthy GPU stays out


def test_a_bad_checkpoint_keeps_the_seat_out_until_its_files_change(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 100)
    seats = OutSeats(str(tmp_path))
    seats.take_out(2, "checkpoint failed to load", until_checkpoint_changes=True)
    assert seats.bring_back_due(time.monotonic() + 10_000) == []  # time alone never does it
    assert seats.why(2) == "checkpoint failed to load"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # rewritten in place
    assert seats.bring_back_due() == [(2, "its checkpoint files changed")]
    assert seats.local_ranks() == () and seats.why(2) == ""


def test_fingerprint_sees_sizes_names_and_a_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"12")
    before = fingerprint(tmp_path)
    (tmp_path / "a").write_bytes(b"1")
    assert fingerprint(tmp_path) != before and fingerprint(tmp_path)[0][:2] == ("a", 1)
    (tmp_path / "sub").mkdir()  # directories are not part of it
    assert len(fingerprint(tmp_path)) == 1
    assert fingerprint(tmp_path / "gone") == ()

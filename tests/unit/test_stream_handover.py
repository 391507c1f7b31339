"""The hand-over of frames a replica committed to its own stream readers
(hub.StreamSubscription): a reader takes only the frames that continue at
its cursor, and anything else (a gap, an overflow, a wake-up that is not a
frame's) sends it to the database, so nothing is skipped or sent twice."""

from __future__ import annotations

from typing import Any

from intentd.server import hub
from intentd.server.hub import StreamSubscription


def frame(first: int, end: int, size: int = 1) -> dict[str, Any]:
    return {"first_offset": first, "end_offset": end, "data": [b"x" * size] * (end - first)}


def subscription() -> StreamSubscription:
    sub = StreamSubscription()
    sub.must_read = False  # as after the reader's first read
    return sub


def test_frames_that_continue_at_the_cursor_are_taken_in_order() -> None:
    sub = subscription()
    sub.hand_over(frame(0, 3))
    sub.hand_over(frame(3, 5))
    assert [f["first_offset"] for f in sub.frames_at(0)] == [0, 3]
    assert sub.frames_at(5) == [] and not sub.must_read and sub.notified_end == 5


def test_frames_read_past_already_are_dropped() -> None:
    sub = subscription()
    sub.hand_over(frame(0, 3))
    sub.hand_over(frame(3, 5))
    # The reader read offsets 0-2 from the database meanwhile.
    assert [f["first_offset"] for f in sub.frames_at(3)] == [3]
    assert not sub.pending


def test_a_gap_sends_the_reader_to_the_database() -> None:
    sub = subscription()
    sub.hand_over(frame(4, 6))  # 3 was a marker, or another replica's frame
    assert sub.frames_at(3) == [] and sub.must_read and not sub.pending


def test_an_overflow_drops_the_hand_over_and_sends_the_reader_to_the_database() -> None:
    sub = subscription()
    for i in range(hub.MAX_PENDING_FRAMES):
        sub.hand_over(frame(i, i + 1))
    assert not sub.must_read
    sub.hand_over(frame(hub.MAX_PENDING_FRAMES, hub.MAX_PENDING_FRAMES + 1))
    assert sub.must_read and not sub.pending
    big = subscription()
    big.hand_over(frame(0, 1, hub.MAX_PENDING_BYTES + 1))
    assert big.must_read and not big.pending


def test_other_wake_ups_and_notifications_past_the_cursor_mean_a_read() -> None:
    sub = subscription()
    sub.notify_frames(7)  # another replica's frame up to 7
    assert sub.notified_end == 7 and not sub.must_read  # the reader compares it with its cursor
    sub.notify_frames(None)
    assert sub.must_read
    other = subscription()
    other.notify()  # an event, the catch-up, a reconnect
    assert other.must_read and other.intent_moved

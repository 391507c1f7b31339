"""Framer: what a stream writer sends as one frame."""

from __future__ import annotations

import asyncio

from intentd.core.framing import Framer, frame
from intentd.generated.v1 import agent_service_pb2 as apb
from intentd.generated.v1 import delivery_pb2


def _write(n: int, size: int = 0) -> apb.ConnectRequest:
    return apb.ConnectRequest(write=apb.WriteRequest(request_id=n, write=delivery_pb2.IntentWrite(
        complete=delivery_pb2.CompleteWrite(result=b"x" * size))))


def _ids(frames: list[list[apb.ConnectRequest]]) -> list[list[int]]:
    return [[m.write.request_id for m in f] for f in frames]


async def _drain(framer: Framer[apb.ConnectRequest]) -> list[list[apb.ConnectRequest]]:
    frames = []
    while (messages := await framer.next()) is not None:
        frames.append(messages)
    return frames


def _queue(*items: apb.ConnectRequest | None) -> asyncio.Queue[apb.ConnectRequest | None]:
    queue: asyncio.Queue[apb.ConnectRequest | None] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    return queue


async def test_what_is_queued_goes_together_up_to_the_limit_in_order() -> None:
    assert _ids(await _drain(Framer(_queue(*map(_write, range(1, 6)), None)))) == [[1, 2, 3, 4, 5]]
    assert _ids(await _drain(Framer(_queue(*map(_write, range(1, 6)), None), limit=2))) == [[1, 2], [3, 4], [5]]
    assert _ids(await _drain(Framer(_queue(*map(_write, range(1, 4)), None), limit=1))) == [[1], [2], [3]]


async def test_a_frame_stops_before_the_message_that_would_pass_the_byte_bound() -> None:
    big = 600 * 1024
    queue = _queue(_write(1, big), _write(2, big), _write(3, 10), _write(4, 3 * 1024 * 1024), _write(5, 10), None)
    frames = await _drain(Framer(queue, max_bytes=1024 * 1024))
    # 2 does not fit behind 1 and starts the next frame; 4 is over the bound on its own and goes alone.
    assert _ids(frames) == [[1], [2, 3], [4], [5]]
    assert all(sum(m.ByteSize() for m in f) <= 1024 * 1024 or len(f) == 1 for f in frames)


async def test_nothing_waits_to_fill_a_frame_and_the_end_marker_ends_it() -> None:
    queue = _queue(_write(1))
    framer = Framer(queue)
    assert _ids([await framer.next() or []]) == [[1]]  # alone: nothing else was queued
    later = asyncio.ensure_future(framer.next())
    await asyncio.sleep(0)
    assert not later.done()
    queue.put_nowait(_write(2))
    queue.put_nowait(None)
    assert _ids([await later or []]) == [[2]]
    assert await framer.next() is None
    assert await framer.next() is None


def test_frame_wraps_only_several_messages() -> None:
    one = _write(1)
    assert frame([one], lambda ms: apb.ConnectRequest(batch=apb.ConnectRequestBatch(messages=ms))) is one
    both = frame([one, _write(2)], lambda ms: apb.ConnectRequest(batch=apb.ConnectRequestBatch(messages=ms)))
    assert [m.write.request_id for m in both.batch.messages] == [1, 2]

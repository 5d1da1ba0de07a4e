"""The micro-batcher on its own: lone calls go at once, concurrent ones coalesce, failures stay separate."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence

import pytest

from cnnserve.gateway.batching import MicroBatcher
from tests.helpers import wait_until_async


class RecordingBackend:
    """Records each batch; answers ``10 * item`` (a ValueError for a negative item) after ``delay`` seconds,
    or, with ``gate``, once the test sets it."""

    def __init__(self, delay: float = 0.02, gate: asyncio.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.keys: list[Hashable] = []
        self.delay = delay
        self.gate = gate

    async def send(self, key: Hashable, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.keys.append(key)
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(self.delay)
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


def test_a_lone_call_is_sent_alone_and_at_once() -> None:
    async def scenario() -> None:
        backend = RecordingBackend()
        batcher: MicroBatcher[int, int] = MicroBatcher(backend.send, max_batch=8, max_in_flight=1)
        assert await batcher.submit("k", 3) == 30
        assert backend.batches == [[3]]

    asyncio.run(scenario())


def test_concurrent_calls_coalesce_up_to_max_batch() -> None:
    async def scenario() -> None:
        backend = RecordingBackend()
        batcher: MicroBatcher[int, int] = MicroBatcher(backend.send, max_batch=8, max_in_flight=1)
        results = await asyncio.gather(*(batcher.submit("k", i) for i in range(20)))
        assert results == [i * 10 for i in range(20)]  # each caller gets its own answer
        assert backend.batches[0] == [0]  # the first left alone, at once
        assert all(len(batch) <= 8 for batch in backend.batches)
        assert max(len(batch) for batch in backend.batches) == 8
        assert sorted(i for batch in backend.batches for i in batch) == list(range(20))
        assert batcher.stats.largest == 8

    asyncio.run(scenario())


def test_keys_never_share_a_batch() -> None:
    async def scenario() -> None:
        backend = RecordingBackend()
        batcher: MicroBatcher[int, int] = MicroBatcher(backend.send, max_batch=8, max_in_flight=1)
        offsets = {"a": 0, "b": 100}
        await asyncio.gather(*(batcher.submit(key, offsets[key] + i) for i in range(6) for key in offsets))
        assert len(backend.batches) >= 2
        for key, batch in zip(backend.keys, backend.batches, strict=True):
            low = offsets[str(key)]
            assert all(low <= item < low + 100 for item in batch), (key, batch)

    asyncio.run(scenario())


def test_one_bad_item_fails_only_its_caller() -> None:
    async def scenario() -> None:
        backend = RecordingBackend()
        batcher: MicroBatcher[int, int] = MicroBatcher(backend.send, max_batch=8, max_in_flight=1)
        results = await asyncio.gather(
            *(batcher.submit("k", i) for i in (1, 2, -3, 4)), return_exceptions=True
        )
        assert results[:2] == [10, 20] and results[3] == 40
        assert isinstance(results[2], ValueError)

    asyncio.run(scenario())


def test_a_failed_batch_fails_its_callers_and_the_next_batch_still_runs() -> None:
    async def scenario() -> None:
        calls = 0

        async def flaky(key: Hashable, items: Sequence[int]) -> list[int | BaseException]:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.01)
            if calls == 1:
                raise ConnectionError("backend went away")
            return list(items)

        batcher: MicroBatcher[int, int] = MicroBatcher(flaky, max_batch=4, max_in_flight=1)
        results = await asyncio.gather(*(batcher.submit("k", i) for i in range(6)), return_exceptions=True)
        assert isinstance(results[0], ConnectionError)
        assert results[1:] == [1, 2, 3, 4, 5]

    asyncio.run(scenario())


def test_a_caller_that_gives_up_is_dropped_from_its_batch() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        backend = RecordingBackend(gate=gate)
        batcher: MicroBatcher[int, int] = MicroBatcher(backend.send, max_batch=8, max_in_flight=1)
        first = asyncio.ensure_future(batcher.submit("k", 1))
        await wait_until_async(lambda: backend.batches == [[1]], 10, "the first batch to reach the backend")
        impatient = asyncio.ensure_future(batcher.submit("k", 2))
        patient = asyncio.ensure_future(batcher.submit("k", 3))
        # Not a timed wait: the loop first runs both tasks created above, up to where they queue.
        await asyncio.sleep(0)
        impatient.cancel()
        gate.set()
        assert await first == 10 and await patient == 30
        assert backend.batches == [[1], [3]]

    asyncio.run(scenario())


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MicroBatcher(RecordingBackend().send, max_batch=0)


def test_concurrency_limit_sheds_instead_of_queueing() -> None:
    from cnnserve.errors import OverloadedError
    from cnnserve.gateway.limits import ConcurrencyLimit

    seen: list[int] = []
    limit = ConcurrencyLimit(2, seen.append)
    limit.enter()
    limit.enter()
    with pytest.raises(OverloadedError, match="over 2 concurrent calls"):
        limit.enter()
    assert limit.in_flight == 2
    limit.leave()
    limit.leave()
    assert limit.in_flight == 0 and seen == [1, 2, 1, 0]

"""Micro-batching: concurrent single-input calls with the same key ride one backend request.

The policy is adaptive rather than timer-based, so a lone caller never waits:

- while fewer than ``max_in_flight`` batches for a key are at the backend, a new call is sent at once
  (from the caller's own coroutine when nothing is queued), together with whatever else is queued;
- otherwise it queues, and the queue leaves as one batch (up to ``max_batch``) the moment a batch returns.

Under light load every call goes out alone (no added latency); under heavy load batches grow to match the
backend's pace. A caller that gives up (deadline, cancellation) before its batch leaves is dropped from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["MicroBatcher", "BatchStats"]

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest: int = 0


@dataclass
class _Queue(Generic[Item, Result]):
    waiting: list[tuple[Item, asyncio.Future[Result]]] = field(default_factory=list)
    in_flight: int = 0


class MicroBatcher(Generic[Item, Result]):
    def __init__(
        self,
        # Sends one batch; one result per item, in order (an exception in a slot fails only that caller).
        send: Callable[[Hashable, Sequence[Item]], Awaitable[Sequence[Result | BaseException]]],
        max_batch: int = 32,
        max_in_flight: int = 2,
        on_batch: Callable[[Hashable, int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._send = send
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._on_batch = on_batch
        self._queues: dict[Hashable, _Queue[Item, Result]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = BatchStats()

    async def submit(self, key: Hashable, item: Item) -> Result:
        """Queue ``item`` under ``key`` and wait for its own result."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(key, _Queue())
        if not queue.waiting and queue.in_flight < self.max_in_flight:
            # Nobody to wait for: send at once from this coroutine (no task, no extra turn of the loop).
            queue.in_flight += 1
            await self._run(key, queue, [(item, future)])
            return future.result()
        queue.waiting.append((item, future))
        if queue.in_flight < self.max_in_flight:
            self._dispatch(key, queue)
        return await future

    def _dispatch(self, key: Hashable, queue: _Queue[Item, Result]) -> None:
        batch = [(item, future) for item, future in queue.waiting[: self.max_batch] if not future.done()]
        del queue.waiting[: self.max_batch]
        if not batch:
            return
        queue.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(key, queue, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self, key: Hashable, queue: _Queue[Item, Result], batch: list[tuple[Item, asyncio.Future[Result]]]
    ) -> None:
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        if self._on_batch is not None:
            self._on_batch(key, len(batch))
        try:
            results = await self._send(key, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} got {len(results)} results")
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        except BaseException as error:  # the whole batch failed: every caller in it gets the error
            cancelled = isinstance(error, asyncio.CancelledError)
            for _, future in batch:
                if not future.done():
                    if cancelled:
                        future.cancel()
                    else:
                        future.set_exception(error)
            if cancelled:
                raise
        finally:
            queue.in_flight -= 1
            if queue.waiting:
                self._dispatch(key, queue)
            elif queue.in_flight == 0:
                self._queues.pop(key, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

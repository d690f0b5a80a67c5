"""A work queue like controller-runtime's: a key is reconciled by one worker at a time, events
for a key being reconciled mark it dirty (one more run afterwards, never two at once), and
delayed requeues keep only the earliest deadline per key."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Hashable

from kompressor.console import log


class WorkQueue:
    def __init__(self, handler: Callable[[Hashable], Awaitable[None]], workers: int = 8):
        self._handler = handler
        self._workers = workers
        self._queue: asyncio.Queue = asyncio.Queue()
        self._dirty: set = set()
        self._processing: set = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def add(self, key: Hashable) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.put_nowait(key)

    def add_after(self, key: Hashable, delay: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay)
        timer = self._timers.get(key)
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def forget(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._dirty.discard(key)
            self._processing.add(key)
            try:
                await self._handler(key)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # one resource's failure never stops the others
                log("reconcile failed; retrying", level="error", key=str(key), error=repr(err))
                self.add_after(key, 5.0)
            finally:
                self._processing.discard(key)
                if key in self._dirty:
                    self._queue.put_nowait(key)

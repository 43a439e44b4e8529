"""One compute thread per shard server; concurrent requests of the same shape run as one batch.

Requests wait in a bounded queue: when it is full, new requests are refused at once ("busy") instead
of piling up in memory; the client then tries a replica. Requests with the same batching key (kind,
sub-span, positions, tokens) that wait together are concatenated along the batch dimension, up to
``max_batch_tokens`` rows × tokens, run once, and split again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


class ServerBusy(RuntimeError):
    """The server's queue is full: try another server (or later)."""


@dataclass
class _Task:
    key: Hashable | None
    """Tasks with equal, non-None keys may run in one batch."""
    inputs: list[torch.Tensor]
    run: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    rows: int = field(init=False)

    def __post_init__(self):
        self.rows = int(self.inputs[0].shape[0]) if self.inputs else 0


class BatchingExecutor:
    """Tune ``max_queue`` for memory (each waiting request holds its tensors) and
    ``max_batch_tokens`` for throughput against latency (bigger batches, longer waits)."""

    def __init__(self, max_batch_tokens: int = 8192, max_queue: int = 64):
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self._queue: collections.deque[_Task] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.on_batch: Callable[[int, int], None] = lambda tasks, rows: None
        """Called with (requests, rows) for every batch run: metrics hook."""
        self.busy_seconds = 0.0
        """Seconds the compute thread has spent computing since it started (:class:`LoadMeter` reads it)."""
        self._thread = threading.Thread(target=self._work, name="shard-compute", daemon=True)
        self._thread.start()

    async def submit(
        self,
        inputs: list[torch.Tensor],
        run: Callable[[list[torch.Tensor]], list[torch.Tensor]],
        key: Hashable | None = None,
    ) -> list[torch.Tensor]:
        """Run ``run(inputs)`` on the compute thread (batched with other tasks of the same ``key``:
        then ``run`` gets their inputs concatenated along dimension 0 and must keep that order)."""
        loop = asyncio.get_running_loop()
        task = _Task(key, inputs, run, loop, loop.create_future())
        with self._cond:
            if self._closed:
                raise ServerBusy("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise ServerBusy(f"the server's queue is full ({self.max_queue} requests waiting)")
            self._queue.append(task)
            self._cond.notify()
        return await task.future

    def _take_batch(self) -> list[_Task]:
        first = self._queue.popleft()
        batch = [first]
        if first.key is None:
            return batch
        # [rows, tokens, hidden] (a span's) or [tokens, hidden] (an expert's: every row one token)
        tokens_per_row = int(first.inputs[0].shape[1]) if first.inputs[0].dim() > 2 else 1
        budget = self.max_batch_tokens - first.rows * tokens_per_row
        for task in list(self._queue):
            if task.key == first.key and task.rows * tokens_per_row <= budget:
                self._queue.remove(task)
                batch.append(task)
                budget -= task.rows * tokens_per_row
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                batch = self._take_batch()
            self._run(batch)

    def _run(self, batch: list[_Task]) -> None:
        started = time.perf_counter()
        try:
            if len(batch) == 1:
                outputs = [batch[0].run(batch[0].inputs)]
            else:
                joined = [torch.cat(parts) for parts in zip(*(t.inputs for t in batch), strict=True)]
                sizes = [t.rows for t in batch]
                outputs = list(zip(*(o.split(sizes) for o in batch[0].run(joined)), strict=True))
            self.on_batch(len(batch), sum(t.rows for t in batch))
            for task, result in zip(batch, outputs, strict=True):
                task.loop.call_soon_threadsafe(_resolve, task.future, list(result), None)
        except Exception as e:  # noqa: BLE001 (the error goes back to every waiting request)
            logger.warning(f"shard compute failed: {e!r}")
            for task in batch:
                task.loop.call_soon_threadsafe(_resolve, task.future, None, e)
        finally:
            self.busy_seconds += time.perf_counter() - started

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)


class LoadMeter:
    """The share of wall time a server's compute thread was busy since the last reading: its ``load``, 0 (idle)
    to 1 (computing all the time, requests likely waiting), as an expert server announces it."""

    def __init__(self, executor: BatchingExecutor):
        self.executor = executor
        self._at, self._busy = time.monotonic(), executor.busy_seconds

    def read(self) -> float:
        now, busy = time.monotonic(), self.executor.busy_seconds
        elapsed = now - self._at
        load = (busy - self._busy) / elapsed if elapsed > 0 else 0.0
        self._at, self._busy = now, busy
        return min(max(load, 0.0), 1.0)


def _resolve(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

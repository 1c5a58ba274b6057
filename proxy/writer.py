"""The one writer: a bounded queue of captured completions, committed in groups.

A handler submits a record and awaits its commit; the writer takes everything queued (up
to ``batch_size``) and commits it in one transaction, so under load many completions share
one commit and at rest a single one commits at once. Under load it also takes what the next
few passes of the event loop queue, when the store commits in this process (SQLite; see
``Writer._gather``): each commit has a fixed cost (its search segment, its pages in the
WAL), and sharing it among more completions costs less CPU per request than the few loop
passes the batch waits.

When the driver or the database refuses a batch for a record's own values (``OverflowError``,
``ValueError``, ``TypeError``, ``RecordRefused``: a number outside 64 bits, a NUL character in
PostgreSQL's text, say), its records are retried one by one, so one bad record cannot sink
its neighbours, and only that record fails (``WriteFailed.rejected``).
Any other failure is the store's (full, read-only, locked, gone): the batch's records fail,
and the store is marked unhealthy: from then on ``store: true`` requests are refused with 503
before any upstream call, and records still queued fail at once rather than each waiting out
the store's lock timeout (so a shutdown is prompt), until a probe write succeeds again. (A
probe cannot tell the two kinds apart: a full SQLite file still takes its one-row update.)
Every record that fails is logged with its id and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.store import CompletionRecord, RecordRefused, Store, Writable

log = logging.getLogger("proxy.writer")

PROBE_INTERVAL = 2.0
LINGER_PASSES = 4  # loop passes a batch under load may wait for more (see Writer._gather)
# What drivers raise for a value they cannot encode: sqlite3 an OverflowError, asyncpg a
# DataError that is a ValueError (the store passes it on as the cause of a StoreError).
_REJECTED = (OverflowError, ValueError, TypeError)


def _rejects_record(error: BaseException) -> bool:
    return isinstance(error, (*_REJECTED, RecordRefused)) or isinstance(error.__cause__, _REJECTED)


class WriteFailed(Exception):
    """The record could not be committed; ``rejected`` when the store is fine and the record
    itself was refused."""

    def __init__(self, reason: str, *, rejected: bool = False) -> None:
        super().__init__(reason)
        self.rejected = rejected


@dataclass(slots=True)
class WriterStats:
    committed: int = 0
    duplicates: int = 0
    failed: int = 0
    batches: int = 0
    failed_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Job:
    record: Writable
    done: asyncio.Future[None]


class Writer:
    def __init__(
        self,
        store: Store,
        *,
        queue_size: int = 10_000,
        batch_size: int = 256,
        on_committed: Callable[[CompletionRecord], None] | None = None,
        on_failed: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._on_committed = on_committed
        self._on_failed = on_failed
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(queue_size)
        self._batch_size = batch_size
        self._linger = LINGER_PASSES if store.commits_in_process else 0  # see _gather
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._closing = False
        self.stats = WriterStats()
        self.broken: str | None = None  # why the store cannot write, while it cannot

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="store-writer")

    async def commit(self, record: Writable) -> None:
        """Queue a record and wait until it is committed; raises WriteFailed if it cannot be."""
        if self._closing:
            raise WriteFailed("the writer is shut down")
        job = _Job(record, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)  # no coroutine to make unless the queue is full
        except asyncio.QueueFull:
            await self._queue.put(job)
        # Awaited as it is: a client that goes away cancels only this future, never the
        # commit, since the writer writes every queued record and settles only futures
        # still waiting. (``asyncio.shield`` would cost one more loop pass per commit.) So
        # an outcome set on it is always read here, unlike an ``enqueue``d record's.
        await job.done

    def enqueue(self, record: Writable) -> None:
        """Queue a record nobody waits for (an audit record); if the queue is full it is
        logged with its id and counted as a failed write, never silently dropped."""
        job = _Job(record, asyncio.get_running_loop().create_future())
        job.done.add_done_callback(_consume)
        if self._closing:
            self._fail(job, "the writer is shut down")
            return
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._fail(job, "the write queue is full")

    async def settled(self) -> None:
        """Until every record queued so far has been committed or has failed. An audit record
        (``enqueue``) is queued after its client's answer, so a reader that must see it
        waits for this first."""
        await self._queue.join()

    async def close(self) -> None:
        """Commit everything queued, then stop."""
        self._closing = True
        if self._task is not None:
            await self.settled()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe

    async def _run(self) -> None:
        while True:
            jobs = await self._gather()
            try:
                await self._write(jobs)
            finally:
                for _ in jobs:
                    self._queue.task_done()

    async def _gather(self) -> list[_Job]:
        """The next batch: everything queued and, under load, what the event loop queues in
        its next few passes. A lone record (a quiet proxy) is written at once. When more
        than one is waiting, other requests are close behind: each pass of the loop that
        queues more buys one more, up to ``LINGER_PASSES``, so one commit (and its search
        segment) is shared by more completions. A pass is a turn of the loop, not a timer:
        the wait ends as soon as a pass brings nothing.

        Only for a store whose commits run in this process (``Store.commits_in_process``),
        where a commit's work takes CPU from the loop and fewer, fuller commits cost less.
        A database server commits beside the loop: there, waiting only delays the commit,
        and PostgreSQL served fewer stored requests with the wait (docs/benchmarks.md)."""
        jobs = [await self._queue.get()]
        self._take(jobs)
        passes = 0
        while 1 < len(jobs) < self._batch_size and passes < self._linger:
            passes += 1
            before = len(jobs)
            await asyncio.sleep(0)
            self._take(jobs)
            if len(jobs) == before:
                break
        return jobs

    def _take(self, jobs: list[_Job]) -> None:
        while len(jobs) < self._batch_size and not self._queue.empty():
            jobs.append(self._queue.get_nowait())

    async def _write(self, jobs: list[_Job]) -> None:
        if self.broken is not None:
            # Known broken (the probe decides when it is back): each write would only wait
            # out the store's lock timeout, and a shutdown would wait for all of them.
            for job in jobs:
                self._fail(job, f"the store is unavailable ({self.broken})")
            return
        try:
            inserted = await self._store.write_batch([job.record for job in jobs])
        except Exception as error:  # noqa: BLE001 - sorted out below
            if _rejects_record(error):
                log.warning("batch of %d failed (%s); retrying one by one", len(jobs), error)
                for job in jobs:
                    await self._write_one(job)
                return
            for job in jobs:  # the store's failure: every record fails
                self._fail(job, str(error))
            self._mark_broken(str(error))
            return
        self.stats.batches += 1
        self.stats.committed += inserted
        self._note_duplicates(jobs, inserted)
        for job in jobs:
            self._succeed(job)

    def _succeed(self, job: _Job) -> None:
        if self._on_committed is not None and isinstance(job.record, CompletionRecord):
            self._on_committed(job.record)
        if not job.done.done():
            job.done.set_result(None)

    def _fail(self, job: _Job, reason: str, *, rejected: bool = False) -> None:
        record = job.record
        record_id = record.id if isinstance(record, CompletionRecord) else record.request_id
        self.stats.failed += 1
        if len(self.stats.failed_ids) < 1000:
            self.stats.failed_ids.append(record_id)
        log.error(
            "completion not stored"
            if isinstance(record, CompletionRecord)
            else "audit record not stored",
            extra={"completion_id": record_id, "caller": record.caller, "reason": reason},
        )
        if self._on_failed is not None:
            self._on_failed()
        if not job.done.done():
            job.done.set_exception(WriteFailed(reason, rejected=rejected))

    def _note_duplicates(self, jobs: list[_Job], inserted: int) -> None:
        if inserted < len(jobs):
            self.stats.duplicates += len(jobs) - inserted
            log.warning(
                "%d completion(s) already stored under the same caller and id were kept as first"
                " written",
                len(jobs) - inserted,
            )

    async def _write_one(self, job: _Job) -> None:
        if self.broken is not None:
            self._fail(job, f"the store is unavailable ({self.broken})")
            return
        try:
            inserted = await self._store.write_batch([job.record])
        except Exception as error:  # noqa: BLE001 - reported, counted and surfaced in _fail
            if _rejects_record(error):
                self._fail(job, f"the store refused this record: {error}", rejected=True)
            else:
                self._fail(job, str(error))
                self._mark_broken(str(error))
            return
        self.stats.batches += 1
        self.stats.committed += inserted
        self._note_duplicates([job], inserted)
        self._succeed(job)

    def _mark_broken(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            self._probe = asyncio.create_task(self._probe_until_healthy(), name="store-probe")

    async def _probe_until_healthy(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self._store.probe_write()
            except Exception as error:  # noqa: BLE001 - still broken; try again later
                self.broken = str(error)
                continue
            log.warning("store writable again after %s", self.broken)
            self.broken = None
            self._probe = None
            return


def _consume(future: asyncio.Future[None]) -> None:
    """Mark a job's outcome as seen even when its waiter went away."""
    if not future.cancelled():
        future.exception()

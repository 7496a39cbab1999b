"""Queue-draining workers: claim a batch from harmonia.source_queue, decide it (retrieve -> rerank -> route), and
commit each item's outcome together with its queue state.

Any number of worker processes, on any number of machines, can drain one queue against one PostgreSQL:
- claims use `FOR UPDATE SKIP LOCKED` and set a lease (owner + expiry), renewed by a background thread;
- an item whose worker died keeps an expiring lease and is reclaimed by another worker (counted as an attempt);
- each outcome is written in one transaction that first locks the item and checks this worker still owns it,
  so a worker whose lease was taken over rolls back instead of mapping the code a second time;
- an item whose decide raised goes back to pending with its error (after a short back-off); after
  worker_max_attempts it goes to the review queue (reason max_attempts) and the queue state `failed`;
- stop() (SIGTERM/SIGINT in the CLI) finishes the items in hand and returns; `drain` returns once nothing is
  pending or leased; idle workers LISTEN on `harmonia_queue` so a new item starts at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from harmonia import db
from harmonia.config import DatabaseSettings, Settings, WorkerSettings
from harmonia.domain import Decision, SourceTerm
from harmonia.pipeline.run import Pipeline
from harmonia.store import mapping as map_store
from harmonia.store import migrations
from harmonia.store import queue as qstore
from harmonia.store.queue import EnqueueCounts, QueueItem

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000
MAX_RETRY_DELAY_S = 60.0


def enqueue(conn: psycopg.Connection, terms: Sequence[SourceTerm]) -> EnqueueCounts:
    """Add source terms to the queue; (source_code, source_vocab) pairs already queued are counted as
    duplicates and left alone. Idle workers are woken by the insert trigger's NOTIFY."""
    counts = EnqueueCounts()
    seen: set[tuple[str, str]] = set()
    unique = []
    for t in terms:  # a pair twice in one call would be one insert and one duplicate anyway; do it here
        if t.key in seen:
            counts.duplicate += 1
            continue
        seen.add(t.key)
        unique.append(t)
    for start in range(0, len(unique), 5000):
        with conn.transaction():
            c = qstore.enqueue(conn, unique[start:start + 5000])
        counts.new += c.new
        counts.duplicate += c.duplicate
        counts.ids += c.ids
    return counts


@dataclass
class WorkerStats:
    owner: str
    claimed: int = 0
    approved: int = 0
    in_review: int = 0
    failed: int = 0          # gave up after worker_max_attempts: in the review queue with reason max_attempts
    retried: int = 0         # failed attempts put back to pending
    lost_lease: int = 0      # outcome not written: another worker owns the item now
    batches: int = 0
    seconds: float = 0.0

    @property
    def finished(self) -> int:
        return self.approved + self.in_review + self.failed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "finished": self.finished}


class LeaseRenewer(threading.Thread):
    """Keeps the leases of the items in hand alive while the batch is decided (LLM calls can take minutes).
    Uses its own connection: the worker's connection may be busy in a long query."""

    def __init__(self, owner: str, lease_s: float, url: str) -> None:
        super().__init__(name="lease-renewer", daemon=True)
        self.owner, self.lease_s, self.url = owner, lease_s, url
        self.interval = max(0.05, lease_s / 3)
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._conn: psycopg.Connection | None = None
        self.lost: set[int] = set()

    def hold(self, ids: Sequence[int]) -> None:
        with self._lock:
            self._ids = set(ids)

    def done(self, item_id: int) -> None:
        with self._lock:
            self._ids.discard(item_id)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            with self._lock:
                ids = sorted(self._ids)
            if not ids:
                continue
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self.url, autocommit=True)
                kept = qstore.renew(self._conn, self.owner, ids, self.lease_s)
            except psycopg.Error as exc:  # the next round retries; the lease is long enough for a few misses
                log.warning("lease renewal failed: %s", exc)
                self._conn = None
                continue
            with self._lock:
                lost = {i for i in ids if i not in kept and i in self._ids}
            if lost:
                log.warning("lost the lease on %d item(s): another worker has them", len(lost))
                self.lost |= lost

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        if self._conn is not None:
            self._conn.close()


PipelineFactory = Callable[[psycopg.Connection], Pipeline]


class Worker:
    """One worker process's loop. `make_pipeline` builds its pipeline on the worker's own connection
    (`from_settings`: the configured one, or an injected one for tests and custom rerankers)."""

    def __init__(self, cfg: WorkerSettings, database: DatabaseSettings, make_pipeline: PipelineFactory, *,
                 batch_size: int | None = None, drain: bool = False, max_items: int | None = None,
                 owner: str | None = None) -> None:
        self.batch_size = max(1, batch_size or cfg.batch_size)
        self.drain = drain
        self.max_items = max_items
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease_s = cfg.lease_s
        self.max_attempts = max(1, cfg.max_attempts)
        self.poll_s = max(0.01, cfg.poll_s)
        self.url = db.database_url(database)
        self.conn = psycopg.connect(self.url, autocommit=True)
        migrations.migrate(self.conn)
        self._listen = psycopg.connect(self.url, autocommit=True)
        qstore.listen(self._listen)
        try:
            self.pipeline = make_pipeline(self.conn)
            if self.pipeline.retriever.embedder is not None:  # load the model now: a worker is ready (or fails)
                self.pipeline.retriever.embedder.encode_queries(["warm-up"])  # before it claims anything
        except BaseException:
            self._listen.close()
            self.conn.close()
            raise
        self.stats = WorkerStats(owner=self.owner)
        self._stop = threading.Event()
        self._renewer = LeaseRenewer(self.owner, self.lease_s, self.url)

    @classmethod
    def from_settings(cls, settings: Settings, *, pipeline: Pipeline | None = None, batch_size: int | None = None,
                      drain: bool = False, max_items: int | None = None, owner: str | None = None) -> Worker:
        """A worker with the configured pipeline (llm_concurrency: the LLM calls in flight), or with `pipeline`."""

        def make_pipeline(conn: psycopg.Connection) -> Pipeline:
            return pipeline if pipeline is not None else Pipeline.from_settings(conn, settings)

        return cls(settings.worker, settings.database, make_pipeline, batch_size=batch_size, drain=drain,
                   max_items=max_items, owner=owner)

    # ------------------------------------------------------------------------------------------- control

    def stop(self) -> None:
        """Finish the items in hand, then return from run()."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Close the pipeline (its reranker and retriever) and the worker's connections."""
        try:
            self.pipeline.close()
        finally:
            self._listen.close()
            self.conn.close()

    # ---------------------------------------------------------------------------------------------- loop

    def run(self) -> WorkerStats:
        t0 = time.perf_counter()
        self._renewer.start()
        try:
            while not self._stop.is_set():
                limit = self.batch_size
                if self.max_items is not None:
                    limit = min(limit, self.max_items - self.stats.claimed)
                    if limit <= 0:
                        break
                items = qstore.claim(self.conn, self.owner, limit, self.lease_s)
                if not items:
                    if self.drain and self._queue_empty():
                        break
                    self._wait()
                    continue
                self.stats.claimed += len(items)
                self.stats.batches += 1
                self.process(items)
        finally:
            self._renewer.stop()
            self.stats.seconds = time.perf_counter() - t0
        return self.stats

    def _queue_empty(self) -> bool:
        o = qstore.outstanding(self.conn)
        return o["pending"] == 0 and o["in_progress"] == 0

    def _wait(self) -> None:
        """Sleep up to worker_poll_s, waking at once on a NOTIFY (new items) or stop()."""
        deadline = time.monotonic() + self.poll_s
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # short slices so a signal is seen promptly; a notification ends the wait
            if any(True for _ in self._listen.notifies(timeout=min(left, 0.25), stop_after=1)):
                for _ in self._listen.notifies(timeout=0):  # drain the rest of a burst
                    pass
                return

    # ------------------------------------------------------------------------------------------- a batch

    def process(self, items: list[QueueItem]) -> None:
        self._renewer.hold([i.id for i in items])
        try:
            todo = []
            for item in items:
                if item.attempts > self.max_attempts:  # its workers died max_attempts times holding it
                    self._give_up(item, item.last_error or f"the lease expired {item.attempts - 1} times: "
                                                           "a worker died holding this item")
                else:
                    todo.append(item)
            for item, outcome in self._decide(todo):
                if isinstance(outcome, Decision):
                    self._persist(item, outcome)
                else:
                    self._failed_attempt(item, outcome)
                self._renewer.done(item.id)
        finally:
            self._renewer.hold([])

    def _decide(self, items: list[QueueItem]) -> list[tuple[QueueItem, Decision | BaseException]]:
        """Decide the batch together (retrieval batched, reranker concurrent); if that raises, decide each item
        alone so one bad item does not fail the others."""
        if not items:
            return []
        try:
            decisions = self.pipeline.decide([i.term for i in items])
            return list(zip(items, decisions, strict=True))
        except Exception as exc:  # noqa: BLE001 - every fault is an attempt recorded on its item
            if len(items) == 1:
                return [(items[0], exc)]
            log.warning("batch decide failed (%s); deciding the %d items one by one", exc, len(items))
        out: list[tuple[QueueItem, Decision | BaseException]] = []
        for item in items:
            try:
                out.append((item, self.pipeline.decide([item.term])[0]))
            except Exception as exc:  # noqa: BLE001 - the item gets the fault as a failed attempt
                out.append((item, exc))
        return out

    def _persist(self, item: QueueItem, d: Decision) -> None:
        """The decision and the queue state, in one transaction, only while this worker owns the item."""
        with self.conn.transaction():
            if not qstore.lock_owned(self.conn, item.id, self.owner):
                self.stats.lost_lease += 1
                log.warning("item %s (%s) is no longer ours; its outcome is left to the new owner", item.id,
                            item.term.source_code)
                return
            outcome = map_store.record_decision(self.conn, d)
            state = "in_review" if outcome == "review" else "approved"  # already_mapped: it is mapped
            qstore.finish(self.conn, item.id, self.owner, state, error=d.error)
        if state == "approved":
            self.stats.approved += 1
        else:
            self.stats.in_review += 1

    def _failed_attempt(self, item: QueueItem, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        log.warning("item %s (%s) attempt %d failed: %s", item.id, item.term.source_code, item.attempts, error)
        if item.attempts >= self.max_attempts:
            self._give_up(item, error)
            return
        delay = min(self.poll_s * 2 ** (item.attempts - 1), MAX_RETRY_DELAY_S)
        with self.conn.transaction():
            released = qstore.release_failed(self.conn, item.id, self.owner, error, delay)
        if released:
            self.stats.retried += 1
        else:
            self.stats.lost_lease += 1

    def _give_up(self, item: QueueItem, error: str) -> None:
        """Out of attempts: to the review queue with the last error (unless the code got mapped meanwhile)."""
        t = item.term
        with self.conn.transaction():
            if not qstore.lock_owned(self.conn, item.id, self.owner):
                self.stats.lost_lease += 1
                return
            if map_store.existing_maps(self.conn, [t.key]):
                qstore.finish(self.conn, item.id, self.owner, "approved")
                self.stats.approved += 1
                return
            map_store.enqueue_review(self.conn, t.source_code, t.source_vocab, t.source_text, t.source_frequency,
                                     t.extra, [], None, None, "max_attempts",
                                     f"{item.attempts} attempts; last error: {error}"[:MAX_ERROR_CHARS])
            qstore.finish(self.conn, item.id, self.owner, "failed", error=error)
        self.stats.failed += 1


def run_until_signalled(worker: Worker) -> WorkerStats:
    """Run with SIGTERM/SIGINT meaning "finish the items in hand, then exit"; a second signal exits at once
    (the items in hand are then reclaimed by another worker when their lease expires)."""
    def handler(signum: int, _frame: object) -> None:
        if worker.stopping:
            log.warning("second signal %d: exiting now", signum)
            os._exit(128 + signum)
        log.warning("signal %d: finishing the items in hand, then exiting", signum)
        worker.stop()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return worker.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

"""Queue-draining workers: claim a batch from harmonia.source_queue, decide it (retrieve -> rerank -> route), and
commit each item's outcome together with its queue state.

Any number of worker processes, on any number of machines, can drain one queue against one PostgreSQL:
- claims use `FOR UPDATE SKIP LOCKED` and set a lease (owner + expiry), renewed by a background thread that also
  writes the worker's heartbeat (harmonia.queue_worker);
- each outcome is written in one transaction that first locks the item and checks this worker still owns it,
  so a worker whose lease was taken over rolls back instead of mapping the code a second time;
- why an item comes back is counted by cause, and each cause has its own rule:
  * decide raised (the code's fault): back to pending after a back-off; after worker_max_attempts such failures
    it goes to review (reason max_attempts) and the queue state `failed`;
  * the reranker's provider failed (RerankResult.retryable: rate limit, 5xx, timeout, connection): back to
    pending after a capped, jittered back-off; only once the provider has failed it for worker_provider_patience_s
    and worker_max_attempts times does it go to review, with the last error and the retrieval top five. A circuit
    breaker stops claiming after worker_breaker_failures consecutive provider failures and probes with one item;
  * its worker died (the lease expired): another worker takes it over *alone*, so a code that kills its worker
    cannot take healthy codes down with it; only worker_max_attempts deaths while held alone make it poison;
- a database outage (restart, failover) is waited out: every database step retries with back-off on fresh
  connections (the pipeline is rebuilt on them), decisions in hand are persisted once it is back if the lease still
  holds, and the worker gives up (DatabaseUnavailable, exit 1) only after worker_db_patience_s;
- stop() (SIGTERM/SIGINT in the CLI) finishes the items in hand and returns; `drain` returns once nothing is
  pending or leased; idle workers LISTEN on `harmonia_queue` so a new item starts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import psycopg
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from harmonia import db
from harmonia.config import DatabaseSettings, Settings, WorkerSettings
from harmonia.domain import RETRYABLE_ERROR_KINDS, Decision, SourceTerm
from harmonia.pipeline.route import retrieval_ranking
from harmonia.pipeline.run import Pipeline
from harmonia.store import mapping as map_store
from harmonia.store import migrations
from harmonia.store import queue as qstore
from harmonia.store.queue import EnqueueCounts, QueueItem

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000
HEARTBEAT_MAX_S = 5.0
T = TypeVar("T")


class DatabaseUnavailable(RuntimeError):
    """The database stayed unreachable for longer than worker_db_patience_s."""


def is_provider_failure(d: Decision) -> bool:
    """The decision carries a retryable reranker failure (RerankResult.retryable: the router puts the error kind in
    `reason`): the provider's fault, not the code's, so it is no outcome to persist."""
    return d.error is not None and d.reason in RETRYABLE_ERROR_KINDS


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
    unique.sort(key=lambda t: t.key)  # every chunk in key order: concurrent enqueues lock in the same order
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
    failed: int = 0          # gave up: in the review queue with reason max_attempts (code failures or poison)
    retried: int = 0         # failed attempts (decide raised) put back to pending
    deferred: int = 0        # provider failures put back to pending (not counted against the code)
    provider_gave_up: int = 0  # sent to review after worker_provider_patience_s of provider failures
    taken_over: int = 0      # claimed from an expired lease, decided alone
    poison: int = 0          # gave up: its workers died worker_max_attempts times holding it alone
    lost_lease: int = 0      # outcome not written: another worker owns the item now
    batches: int = 0
    breaker_pauses: int = 0  # times claiming paused because the provider was down
    db_outages: int = 0      # times the database went away
    reconnects: int = 0
    seconds: float = 0.0

    @property
    def finished(self) -> int:
        return self.approved + self.in_review + self.failed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "finished": self.finished}


class ProviderBreaker:
    """Pauses claiming while the reranker's provider is down, instead of burning every item's attempts.

    Closed: claim batches. After `threshold` consecutive provider failures: open, claim nothing for `pause_s`;
    then probe with one item. A probe that succeeds closes it; one that fails opens it again for twice as long
    (up to `max_pause_s`). Any answer that is not a provider failure resets the count."""

    def __init__(self, threshold: int, pause_s: float, max_pause_s: float) -> None:
        self.threshold = max(0, threshold)
        self.base = max(0.01, pause_s)
        self.max = max(self.base, max_pause_s)
        self.pause = self.base
        self.consecutive = 0
        self.open_until: float | None = None
        self.probing = False
        self.opened = 0

    @property
    def is_open(self) -> bool:
        return self.open_until is not None

    def record(self, provider_failed: bool) -> None:
        if not provider_failed:
            self.consecutive, self.open_until, self.pause, self.probing = 0, None, self.base, False
            return
        self.consecutive += 1
        if self.probing:  # the provider is still down
            self.pause = min(self.pause * 2, self.max)
            self._open()
        elif self.threshold and self.consecutive >= self.threshold and self.open_until is None:
            self._open()

    def _open(self) -> None:
        self.open_until = time.monotonic() + self.pause
        self.probing = False
        self.opened += 1
        log.warning("the provider failed %d calls in a row: claiming paused for %.1fs, then one probe",
                    self.consecutive, self.pause)

    def wait_s(self) -> float:
        """Seconds to wait before claiming (0: claim now)."""
        if self.open_until is None or self.probing:
            return 0.0
        return max(0.0, self.open_until - time.monotonic())

    def limit(self, batch: int) -> int:
        """How many items to claim now: a batch, or one probe once the pause is over."""
        if self.open_until is None:
            return batch
        self.probing = True
        return 1


class LeaseRenewer(threading.Thread):
    """Keeps the leases of the items in hand alive while the batch is decided (LLM calls can take minutes) and
    writes the worker's heartbeat. Uses its own connection, reopened after any error (the worker's connection may
    be busy in a long query, or the database may be restarting)."""

    def __init__(self, owner: str, lease_s: float, url: str,
                 status: Callable[[], tuple[str, dict[str, Any]]] | None = None) -> None:
        super().__init__(name="lease-renewer", daemon=True)
        self.owner, self.lease_s, self.url = owner, lease_s, url
        self.interval = max(0.05, min(lease_s / 3, HEARTBEAT_MAX_S))
        self.status = status
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._failing = False
        self.lost: set[int] = set()

    def hold(self, ids: Sequence[int]) -> None:
        with self._lock:
            self._ids = set(ids)

    def done(self, item_id: int) -> None:
        with self._lock:
            self._ids.discard(item_id)

    def beat(self) -> None:
        """One round: renew the leases in hand, then the heartbeat."""
        with self._lock:
            ids = sorted(self._ids)
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            kept = qstore.renew(self._conn, self.owner, ids, self.lease_s) if ids else set()
            if self.status is not None:
                state, stats = self.status()
                qstore.heartbeat(self._conn, self.owner, socket.gethostname(), os.getpid(), self.interval, state,
                                 stats)
        except psycopg.Error as exc:  # the next round retries on a fresh connection; a lease survives a few misses
            if not self._failing:
                log.warning("lease renewal failed (retrying every %.1fs on a fresh connection): %s", self.interval,
                            exc)
            self._failing = True
            self._drop()
            return
        if self._failing:
            log.warning("lease renewal works again")
        self._failing = False
        with self._lock:
            lost = {i for i in ids if i not in kept and i in self._ids}
        if lost:
            log.warning("lost the lease on %d item(s): another worker has them", len(lost))
            self.lost |= lost

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.beat()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)
        self._drop()


PipelineFactory = Callable[[psycopg.Connection], Pipeline]


def _close_quietly(conn: psycopg.Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(psycopg.Error):
            conn.close()


def _usable(conn: psycopg.Connection) -> bool:
    """The connection still reaches the server."""
    if conn.closed or conn.broken:
        return False
    try:
        qstore.ping(conn)
    except psycopg.OperationalError:
        return False
    return True


class Worker:
    """One worker process's loop. `make_pipeline` builds its pipeline on the worker's connection (`from_settings`:
    the configured one, or an injected one for tests and custom rerankers); it is called again on the fresh
    connection after a database outage."""

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
        self.retry_base_s = max(0.0, cfg.retry_base_s)
        self.retry_max_s = max(self.retry_base_s, cfg.retry_max_s)
        self.provider_patience_s = cfg.provider_patience_s
        self.db_patience_s = cfg.db_patience_s
        self.breaker = ProviderBreaker(cfg.breaker_failures, cfg.breaker_pause_s, self.retry_max_s)
        self.url = db.database_url(database)
        self._make_pipeline = make_pipeline
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
        self.state = "idle"
        self._outage_since: float | None = None
        self._stop = threading.Event()
        self._renewer = LeaseRenewer(self.owner, self.lease_s, self.url,
                                     status=lambda: (self.state, self.stats.to_dict()))

    @classmethod
    def from_settings(cls, settings: Settings, *, pipeline: Pipeline | None = None, batch_size: int | None = None,
                      drain: bool = False, max_items: int | None = None, owner: str | None = None) -> Worker:
        """A worker with the configured pipeline (llm_concurrency: the LLM calls in flight), or with `pipeline`
        (whose connections are the caller's: it is kept as it is after a database outage)."""

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
            _close_quietly(self._listen)
            _close_quietly(self.conn)

    # ---------------------------------------------------------------------------------- database faults

    def _with_db(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args), retried on fresh connections while the database is away (fn re-reads self.conn)."""
        while True:
            try:
                out = fn(*args)
            except psycopg.OperationalError as exc:
                self._recover(exc)
                continue
            self._outage_since = None
            return out

    def _recover(self, exc: BaseException) -> None:
        """The database went away (or a statement failed for an operational reason): reconnect with jittered
        exponential back-off; after worker_db_patience_s without a working connection, DatabaseUnavailable."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            self.stats.db_outages += 1
            log.warning("database error (%s): reconnecting, for up to %.0fs", str(exc).strip()[:300],
                        self.db_patience_s)
        left = self.db_patience_s - (now - self._outage_since)
        previous, self.state = self.state, "db_outage"
        try:
            for attempt in Retrying(retry=retry_if_exception_type(psycopg.OperationalError),
                                    wait=wait_exponential_jitter(initial=0.25, max=5.0),
                                    stop=stop_after_delay(max(0.0, left)), reraise=True):
                with attempt:
                    self._reconnect()
        except psycopg.OperationalError as last:
            raise DatabaseUnavailable(f"the database has been unreachable for "
                                      f"{time.monotonic() - self._outage_since:.0f}s (worker_db_patience_s = "
                                      f"{self.db_patience_s:g}): {str(last).strip()[:300]}") from last
        finally:
            self.state = previous
        log.warning("database reachable again after %.1fs", time.monotonic() - self._outage_since)

    def _reconnect(self) -> None:
        """Fresh connections for the loop, the LISTEN and the pipeline (rebuilt on the new connection: its
        retriever, calibration and LLM call log held the old one)."""
        if _usable(self.conn):
            if not _usable(self._listen):  # only the LISTEN connection went (e.g. its backend was terminated)
                listen = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
                qstore.listen(listen)
                _close_quietly(self._listen)
                self._listen = listen
                self.stats.reconnects += 1
            return  # the worker's connection is fine: the error was the statement's (the caller retries it)
        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        try:
            listen = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            qstore.listen(listen)
            pipeline = self._make_pipeline(conn)
        except BaseException:
            conn.close()
            raise
        old_conn, old_listen, old_pipeline = self.conn, self._listen, self.pipeline
        self.conn, self._listen, self.pipeline = conn, listen, pipeline
        if old_pipeline is not pipeline:
            try:
                old_pipeline.close()
            except Exception as exc:  # noqa: BLE001 - what it held is gone with the old server anyway
                log.debug("closing the old pipeline: %s", exc)
        _close_quietly(old_listen)
        _close_quietly(old_conn)
        self.stats.reconnects += 1

    # ---------------------------------------------------------------------------------------------- loop

    def run(self) -> WorkerStats:
        t0 = time.perf_counter()
        self._renewer.beat()  # visible in `harmonia status` at once
        self._renewer.start()
        try:
            while not self._stop.is_set():
                limit = self.batch_size
                if self.max_items is not None:
                    limit = min(limit, self.max_items - self.stats.claimed)
                    if limit <= 0:
                        break
                pause = self.breaker.wait_s()
                if pause > 0:  # the provider is down: claim nothing (attempts would only be burnt)
                    if self.state != "paused":
                        self.stats.breaker_pauses += 1
                    self.state = "paused"
                    self._stop.wait(min(pause, 1.0))
                    continue
                items = self._with_db(self._claim, self.breaker.limit(limit))
                if not items:
                    if self.drain and self._with_db(self._queue_empty):
                        break
                    self.state = "idle"
                    self._with_db(self._wait)
                    continue
                self.state = "working"
                self.stats.claimed += len(items)
                self.stats.batches += 1
                self.process(items)
        finally:
            self._renewer.stop()
            self.stats.seconds = time.perf_counter() - t0
            self.state = "stopped"
            with contextlib.suppress(psycopg.Error):
                qstore.heartbeat(self.conn, self.owner, socket.gethostname(), os.getpid(), self._renewer.interval,
                                 "stopped", self.stats.to_dict())
        return self.stats

    def _claim(self, limit: int) -> list[QueueItem]:
        return qstore.claim(self.conn, self.owner, limit, self.lease_s)

    def _renew(self, ids: list[int]) -> set[int]:
        return qstore.renew(self.conn, self.owner, ids, self.lease_s)

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

    def _backoff(self, n: int) -> float:
        """The n-th back-off: exponential, capped, jittered (half to all of it) so retries do not come in waves."""
        d = min(self.retry_max_s, self.retry_base_s * 2 ** max(0, n - 1))
        return d / 2 + random.uniform(0.0, d / 2)

    # ------------------------------------------------------------------------------------------- a batch

    def process(self, items: list[QueueItem]) -> None:
        self._renewer.hold([i.id for i in items])
        try:
            todo = []
            for item in items:
                if item.taken_over:
                    self.stats.taken_over += 1
                if item.taken_over and item.solo_deaths >= self.max_attempts:
                    # its workers died holding it alone, again and again: the code itself kills them
                    self.stats.poison += 1
                    why = (f"poison: the worker holding this item alone died {item.solo_deaths} times "
                           f"({item.deaths} deaths in all)")
                    self._with_db(self._give_up, item, f"{why}; {item.last_error}" if item.last_error else why)
                    self._renewer.done(item.id)
                else:
                    todo.append(item)
            for item, outcome in self._decide(todo):
                if isinstance(outcome, Decision):
                    failed = is_provider_failure(outcome)
                    self.breaker.record(failed)
                    if failed:
                        self._with_db(self._provider_failure, item, outcome)
                    else:
                        self._with_db(self._persist, item, outcome)
                else:
                    self._with_db(self._failed_attempt, item, outcome)
                self._renewer.done(item.id)
        finally:
            self._renewer.hold([])

    def _decide(self, items: list[QueueItem]) -> list[tuple[QueueItem, Decision | BaseException]]:
        """Decide the items; if the database goes away meanwhile, wait for it and decide again the items whose
        lease this worker still holds (nothing was persisted: the decide only reads)."""
        while items:
            try:
                return self._decide_once(items)
            except psycopg.OperationalError as exc:
                self._recover(exc)
                kept = self._with_db(self._renew, [i.id for i in items])
                self.stats.lost_lease += sum(1 for i in items if i.id not in kept)
                items = [i for i in items if i.id in kept]
        return []

    def _decide_once(self, items: list[QueueItem]) -> list[tuple[QueueItem, Decision | BaseException]]:
        """Decide the batch together (retrieval batched, reranker concurrent); if that raises, decide each item
        alone so one bad item does not fail the others. A database error is no item's fault: it propagates."""
        if not items:
            return []
        try:
            decisions = self.pipeline.decide([i.term for i in items])
            return list(zip(items, decisions, strict=True))
        except psycopg.OperationalError:
            raise
        except Exception as exc:  # noqa: BLE001 - every fault is an attempt recorded on its item
            if len(items) == 1:
                return [(items[0], exc)]
            log.warning("batch decide failed (%s); deciding the %d items one by one", exc, len(items))
        out: list[tuple[QueueItem, Decision | BaseException]] = []
        for item in items:
            try:
                out.append((item, self.pipeline.decide([item.term])[0]))
            except psycopg.OperationalError:
                raise
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

    def _provider_failure(self, item: QueueItem, d: Decision) -> None:
        """The provider failed this code (after the reranker's own retries): back to the queue with a back-off,
        unless the provider has failed it for worker_provider_patience_s and worker_max_attempts times: then to
        review with the last error and the retrieval top five."""
        n = item.provider_failures + 1
        failing_s = item.provider_failing_s or 0.0
        if n >= self.max_attempts and failing_s >= self.provider_patience_s:
            note = f"{n} provider attempts over {failing_s:.0f}s; last error: {d.error}"[:MAX_ERROR_CHARS]
            final = dataclasses.replace(d, error=note, ranking=d.ranking or retrieval_ranking(d.candidates, 5))
            with self.conn.transaction():
                if not qstore.lock_owned(self.conn, item.id, self.owner):
                    self.stats.lost_lease += 1
                    return
                outcome = map_store.record_decision(self.conn, final)
                qstore.finish(self.conn, item.id, self.owner, "in_review" if outcome == "review" else "approved",
                              error=note)
            if outcome == "review":
                self.stats.in_review += 1
                self.stats.provider_gave_up += 1
            else:
                self.stats.approved += 1
            return
        error = f"{d.reason}: {d.error}"[:MAX_ERROR_CHARS]
        delay = self._backoff(n)
        log.info("item %s (%s): provider failure %d (%s), retry in %.1fs", item.id, item.term.source_code, n,
                 d.reason, delay)
        with self.conn.transaction():
            released = qstore.release_provider_failure(self.conn, item.id, self.owner, error, delay)
        if released:
            self.stats.deferred += 1
        else:
            self.stats.lost_lease += 1

    def _failed_attempt(self, item: QueueItem, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        n = item.failures + 1
        log.warning("item %s (%s) attempt failed (%d of %d): %s", item.id, item.term.source_code, n,
                    self.max_attempts, error)
        if n >= self.max_attempts:
            self._give_up(item, error, failures=n)
            return
        with self.conn.transaction():
            released = qstore.release_failed(self.conn, item.id, self.owner, error, self._backoff(n))
        if released:
            self.stats.retried += 1
        else:
            self.stats.lost_lease += 1

    def _give_up(self, item: QueueItem, error: str, failures: int | None = None) -> None:
        """Out of attempts: to the review queue with the last error (unless the code got mapped meanwhile)."""
        t = item.term
        what = f"{failures} failed attempts" if failures is not None else f"{item.attempts} claims"
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
                                     f"{what}; last error: {error}"[:MAX_ERROR_CHARS])
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

"""One worker thread runs every request's model work, in arrival order, behind a bounded queue.

The engine is safe to share between threads (its per-forward state lives in context variables), but
on a CPU two forwards at once are no faster than one after the other, and each would finish later: one
worker in arrival order gives every request the whole machine. So the event loop only queues jobs and
relays their output; a full queue is refused at once (429) instead of
letting latency grow without bound. A job stops between two text deltas once it is cancelled (client
gone, timeout); its prefill and recompute, a bounded amount of work, always run to the end.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..pipeline_answer import PipelineAnswer, PipelineStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    answer: PipelineAnswer


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = Delta | Done | Failed


class QueueFull(Exception):
    def __init__(self, queued: int, retry_after: int):
        super().__init__(f"{queued} requests are already waiting")
        self.queued, self.retry_after = queued, retry_after


@dataclass
class Job:
    start: Callable[[], PipelineStream]  # runs on the worker thread: everything up to the first token
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which the job is abandoned
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None

    def emit(self, event: Event) -> None:
        """Hand an event to the request's coroutine (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def queue_s(self) -> float:
        return (self.started or time.monotonic()) - self.enqueued


class Worker:
    def __init__(self, max_queue: int, timeout: float):
        if max_queue < 1 or timeout <= 0:
            raise ValueError(f"need max_queue >= 1 and timeout > 0, got {max_queue} and {timeout}")
        self.max_queue, self.timeout = max_queue, timeout
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet started
        self.running: Job | None = None
        self.completed = 0
        self.cancelled = 0  # stopped early: client gone or timed out
        self._mean_s = 1.0  # moving average of a job's run time, for Retry-After
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="infoflow-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Abandon the running job and those still queued, then end the thread."""
        self._stopping = True
        if (job := self.running) is not None:
            job.cancel()
        self._jobs.put(None)
        self._thread.join()

    @property
    def queued(self) -> int:
        return self._queued

    def submit(self, start: Callable[[], PipelineStream]) -> Job:
        """Queue a job (from the event loop); raises :class:`QueueFull` when ``max_queue`` jobs already wait."""
        with self._lock:
            if self._queued >= self.max_queue:
                raise QueueFull(self._queued, max(1, math.ceil(self._mean_s * (self._queued + 1))))
            self._queued += 1
        job = Job(start, asyncio.get_running_loop(), time.monotonic() + self.timeout)
        self._jobs.put(job)
        return job

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._queued -= 1
            if job.cancelled.is_set() or self._stopping or time.monotonic() > job.deadline:
                self.cancelled += 1  # nobody waits for it any more
                continue
            self.running, job.started = job, time.monotonic()
            try:
                self._run(job)
            finally:
                self.running = None
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - job.started)

    def _run(self, job: Job) -> None:
        try:
            stream = job.start()
            for delta in stream:
                if job.cancelled.is_set():
                    self.cancelled += 1  # leaving the loop drops the decode generator: no more tokens
                    return
                job.emit(Delta(delta))
        except Exception as err:  # reported to the client; the worker goes on with the next job
            job.emit(Failed(err))
            return
        self.completed += 1
        job.emit(Done(stream.answer))

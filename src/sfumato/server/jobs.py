"""One generation lane: a bounded queue of jobs run in order by one worker thread.

The pipeline and its scheduler are not re-entrant (diffusers schedulers hold step state, and the
explain views swap the UNet's attention processors), so every use of them goes through this lane.
A job calls `job.check()` often (work.stoppable: before every UNet and VAE layer), which raises when
the job was cancelled, ran out of time or the server is stopping.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import SfumatoError

log = logging.getLogger("sfumato.server")


class QueueFull(Exception):
    def __init__(self, retry_after: int, limit: int):
        super().__init__(f"the generation queue is full ({limit} jobs waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class QueueClosed(Exception):
    """The server is stopping: no new jobs."""


def _running_future() -> concurrent.futures.Future:
    """A future already running: a waiter that gives up (asyncio cancellation) cannot cancel it."""
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_running_or_notify_cancel()
    return f


class Stopped(Exception):
    """Raised from a step callback: the job was cancelled or passed its time limit."""


@dataclass
class Job:
    id: str
    kind: str
    run: Callable[["Job"], Any]
    limit: float
    status: str = "queued"  # queued | running | done | failed | cancelled
    step: int = 0
    total: int = 0
    preview: bytes | None = None  # PNG of the latest step preview
    result: Any = None
    error: str | None = None
    timed_out: bool = False
    user_error: bool = False  # failed by the request's fault (a UsageError), not by a bug
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    events: list = field(default_factory=list)  # (name, data); readers follow by position
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None  # set with cancel_flag when the server stops it (not the client)
    done: threading.Event = field(default_factory=threading.Event)
    finished_future: concurrent.futures.Future = field(default_factory=_running_future)  # for asyncio waiters

    @property
    def progress(self) -> float:
        if self.status == "done":
            return 1.0
        return self.step / self.total if self.total else 0.0

    def emit(self, name: str, data: dict) -> None:
        self.events.append((name, data))  # list.append is atomic; readers only read

    @property
    def cancelled_by_client(self) -> bool:
        return self.cancel_flag.is_set() and self.stop_reason is None and not self.timed_out

    def check(self) -> None:
        """Stop here if the job was cancelled, has run past its time limit or the server is stopping."""
        if self.cancel_flag.is_set():
            raise Stopped(self.stop_reason or "cancelled")
        if self.started is not None and time.time() - self.started > self.limit:
            self.timed_out = True
            raise Stopped(f"the job ran past its time limit of {self.limit:g} s")


class JobQueue:
    """Bounded FIFO of jobs and the one worker thread that runs them."""

    def __init__(self, max_queue: int, job_seconds: float, keep: int = 32):
        self.max_queue, self.job_seconds, self.keep = max_queue, job_seconds, keep
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._cv = threading.Condition()
        self._closed: str | None = None  # why new jobs are refused (the server is stopping)
        self._thread: threading.Thread | None = None
        self.current: Job | None = None
        self._mean_seconds = 5.0  # running estimate of a job's duration, for Retry-After

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sfumato-generation", daemon=True)
        self._thread.start()

    def close(self, reason: str = "the server is shutting down") -> None:
        """Refuse new jobs, fail the waiting ones now and stop the running one at its next check.
        Returns at once (it is called from the signal path); `stop` also waits for the worker."""
        with self._cv:
            if self._closed is None:
                self._closed = reason
            waiting, self._waiting = list(self._waiting), collections.deque()
            for job in waiting:
                job.stop_reason = reason
                job.cancel_flag.set()
                self._finish(job, "failed", error=reason)
            if self.current is not None and not self.current.cancel_flag.is_set():
                self.current.stop_reason = reason
                self.current.cancel_flag.set()
            self._cv.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        self.close()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def full(self) -> bool:
        return len(self._waiting) >= self.max_queue

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the waiting jobs at the running estimate of one job."""
        return max(1, math.ceil(self._mean_seconds * (len(self._waiting) + 1)))

    # ---------------------------------------------------------------- API

    def submit(self, kind: str, run: Callable[[Job], Any], total: int = 0) -> Job:
        with self._cv:
            if self._closed is not None:
                raise QueueClosed(self._closed)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.retry_after(), self.max_queue)
            job = Job(uuid.uuid4().hex, kind, run, self.job_seconds, total=total)
            self._jobs[job.id] = job
            self._forget_old()
            self._waiting.append(job)
            job.emit("queued", {"id": job.id, "position": len(self._waiting)})
            self._cv.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """1 for the next job to run; None when not waiting."""
        with self._cv:
            try:
                return self._waiting.index(job) + 1
            except ValueError:
                return None

    def cancel(self, job: Job) -> None:
        """A waiting job ends at once; a running one at its next step."""
        with self._cv:
            job.cancel_flag.set()
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, "cancelled", error="cancelled")

    def pending(self) -> int:
        return len(self._waiting) + (self.current is not None)

    # ---------------------------------------------------------------- worker

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and self._closed is None:
                    self._cv.wait()
                if self._closed is not None:
                    return
                job = self._waiting.popleft()
                self.current = job
                job.status, job.started = "running", time.time()
            try:
                job.check()
                job.result = job.run(job)
            except Stopped as e:
                self._finish(job, "cancelled" if job.cancelled_by_client else "failed", error=str(e))
            except SfumatoError as e:  # the request's fault: the job fails, the lane goes on
                job.user_error = True
                self._finish(job, "failed", error=str(e))
            except Exception as e:  # a bug: logged with its traceback; the lane goes on
                log.exception("job %s failed", job.id)
                self._finish(job, "failed", error=f"internal error: {type(e).__name__}: {e}")
            else:
                self._finish(job, "done")
            finally:
                with self._cv:
                    self.current = None
                    self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.time() - job.started)

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.status, job.error, job.finished = status, error, time.time()
        if status == "done":
            job.emit("done", {"id": job.id, "status": status})
        else:
            job.emit("failed", {"id": job.id, "status": status, "error": error})
        job.done.set()
        job.finished_future.set_result(job)

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.done.is_set()]
        for j in finished[:max(0, len(finished) - self.keep)]:
            del self._jobs[j.id]

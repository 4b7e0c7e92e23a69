"""The load generator: one event loop, prepared requests, a lean HTTP client; open or closed loop; a progress line.

Why this shape: the runner must not be the bottleneck on a 2-core machine that also runs the target. Requests are
serialized before the run (`loadtest.plan.Prepared`) and sent by a lean HTTP/1.1 client (`loadtest.http`), and
the only per-answer parsing is one orjson parse (a stream: the SSE decoder the gateway itself uses).
`loadtests/bench_loadtest.py` measures what it reaches.

Open loop (`fixed`, `poisson`): each request starts at its scheduled time whatever the earlier ones are doing, so
a slow target meets the asked rate instead of slowing the client down. Nothing is dropped: a start that comes
more than `late_after_ms` after its time (the loop was busy, or `max_inflight` requests were already waiting) is
sent anyway and counted late, with its lateness. Closed loop (`concurrent`): N clients, each sending its next
request when its last one is answered. A warm-up (`warmup` requests, every variant in turn, answered before
measuring starts) comes first, and its first requests double as a preflight: an unreachable target, a refused
key or an unknown variant stops the run with the gateway's own message before anything is measured.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from gateway.loadtest.answer import Sample, StreamReader, judge, read_unary
from gateway.loadtest.http import Answer, Client
from gateway.loadtest.plan import Job, Jobs, Prepared, arrivals, prepare, request_id
from gateway.loadtest.results import RunData
from gateway.loadtest.scenario import Loaded, planned_requests
from gateway.toolcalls import Completion


class LoadTestError(Exception):
    """The run cannot go on (target unreachable, key refused, unknown variant); the message says why."""


@dataclass(slots=True)
class _Counts:
    done: int = 0
    errors: int = 0
    late: int = 0
    inflight: int = 0
    history: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))


class Runner:
    def __init__(
        self,
        loaded: Loaded,
        key: str | None,
        *,
        progress: TextIO | None = sys.stderr,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.loaded = loaded
        self.scenario = loaded.scenario
        self.prepared: Prepared = prepare(self.scenario, loaded.golden, key)
        self.jobs = Jobs(self.scenario, len(loaded.golden))
        self.clock = clock
        self.progress = progress
        self.prefix = "lt" + os.urandom(4).hex()
        self.rng = random.Random(self.scenario.load.seed)
        self.counts = _Counts()
        self.samples: list[Sample] = []
        self.t0 = 0.0
        self.http = Client(self.prepared.url, timeout_s=self.scenario.target.timeout_s, clock=clock)

    async def run(self) -> RunData:
        try:
            await self._warmup()
            return await self._measure()
        finally:
            self.http.close()

    # -- phases ----------------------------------------------------------------------------------------------

    async def _warmup(self) -> None:
        variants = len(self.jobs.variants)
        jobs = self.jobs.warmup(max(self.scenario.load.warmup, variants))
        for job in jobs[:variants]:  # the preflight: one at a time, so its failure is the first thing said
            sample = await self._one(job, None, keep=False)
            _preflight(sample, self.prepared.url)
        rest = iter(jobs[variants:])
        workers = min(len(jobs), self.scenario.load.concurrency or 8)
        await asyncio.gather(*(self._drain(rest) for _ in range(workers)))

    async def _drain(self, jobs: Iterator[Job]) -> None:
        for job in jobs:
            await self._one(job, None, keep=False)

    async def _measure(self) -> RunData:
        load = self.scenario.load
        count = planned_requests(self.scenario, len(self.loaded.golden))
        reporter = asyncio.create_task(self._report(count))
        cpu0, self.t0, started = time.process_time(), self.clock(), time.time()
        deadline = None if load.duration_s is None or count is not None else self.t0 + load.duration_s
        try:
            if load.arrival == "concurrent":
                assert load.concurrency is not None
                await self._closed_loop(load.concurrency, count, deadline)
            else:
                await self._open_loop(count)
        finally:
            reporter.cancel()
        elapsed, ended = self.clock() - self.t0, time.time()
        self._print_progress(count, final=True)
        self.samples.sort(key=lambda s: s.seq)
        cpu = time.process_time() - cpu0
        return RunData(self.samples, started, ended, elapsed, load.warmup, cpu, self.prefix)

    async def _open_loop(self, count: int | None) -> None:
        load = self.scenario.load
        assert load.rate is not None and count is not None
        slots = asyncio.Semaphore(load.max_inflight)
        pending: set[asyncio.Task[Sample]] = set()
        late_after = load.late_after_ms / 1000
        for k, offset in enumerate(arrivals(load.arrival, load.rate, count, random.Random(load.seed))):
            delay = self.t0 + offset - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()  # beyond max_inflight the start waits: it will be late, never dropped
            task = asyncio.create_task(self._one(self.jobs.job(k), offset, late_after=late_after))
            pending.add(task)
            task.add_done_callback(pending.discard)
            task.add_done_callback(lambda _: slots.release())
        if pending:
            await asyncio.gather(*pending)

    async def _closed_loop(self, clients: int, count: int | None, deadline: float | None) -> None:
        sequence = itertools.count()

        async def client() -> None:
            while True:
                k = next(sequence)
                if (count is not None and k >= count) or (deadline is not None and self.clock() >= deadline):
                    return
                await self._one(self.jobs.job(k), None)

        await asyncio.gather(*(client() for _ in range(clients)))

    # -- one request -----------------------------------------------------------------------------------------

    async def _one(
        self, job: Job, scheduled: float | None, *, keep: bool = True, late_after: float = math.inf
    ) -> Sample:
        p = self.prepared
        sample = Sample(job.seq, job.item, job.variant, request_id(self.prefix, job.seq))
        user = self.rng.randrange(len(p.users)) if p.users else None
        request = p.request(job.item, job.variant, sample.request_id, user)
        t0 = self.clock()
        sample.start_s, sample.scheduled_s = t0 - self.t0, scheduled
        if scheduled is not None:
            sample.late_s = max(0.0, sample.start_s - scheduled)
            self.counts.late += sample.late_s > late_after
        self.counts.inflight += 1
        try:
            answer = await self.http.send(request)
        except TimeoutError:
            sample.outcome, sample.error, answer = "error", "timeout", None
        except OSError as exc:
            sample.outcome, sample.error, answer = "error", "transport", None
            sample.reason = type(exc).__name__
        finally:
            self.counts.inflight -= 1
        sample.e2e_s = self.clock() - t0
        completions = _read(sample, answer, t0) if answer is not None else []
        judge(sample, completions, self.loaded.golden[job.item].expected)
        if keep:
            self.samples.append(sample)
            self.counts.done += 1
            self.counts.errors += sample.outcome == "error"
        return sample

    # -- progress --------------------------------------------------------------------------------------------

    async def _report(self, count: int | None) -> None:
        while True:
            await asyncio.sleep(0.5)
            self._print_progress(count)

    def _print_progress(self, count: int | None, *, final: bool = False) -> None:
        if self.progress is None:
            return
        c = self.counts
        now = self.clock()
        c.history.append((now, c.done))
        then, done_then = c.history[max(0, len(c.history) - 3)]  # over the last second or so
        rate = (c.done - done_then) / (now - then) if now > then else 0.0
        total = f"/{count}" if count is not None else ""
        line = (
            f"{self.scenario.name}: {c.done}{total} requests  {c.errors} errors  {rate:,.0f} req/s  "
            f"{c.inflight} in flight  {c.late} late  {now - self.t0:.1f}s"
        )
        tty = self.progress.isatty()
        if tty or final or len(c.history) % 10 == 0:
            self.progress.write(("\r" + line + "\x1b[K") if tty else line + "\n")
            if final and tty:
                self.progress.write("\n")
            self.progress.flush()


def _read(sample: Sample, answer: Answer, t0: float) -> list[Completion]:
    if answer.status == 200 and answer.headers.get("content-type", "").startswith("text/event-stream"):
        reader = StreamReader(sample, answer.status, answer.headers)
        for piece, at in zip(answer.pieces, answer.times, strict=True):
            reader.feed(piece, at)
        return reader.finish(t0)
    return read_unary(sample, answer.status, answer.headers, answer.body)


def _preflight(sample: Sample, url: str) -> None:
    if sample.status == 0:
        raise LoadTestError(f"cannot reach {url}: {sample.error} ({sample.reason or 'no answer'})")
    if sample.outcome == "client_error":
        what = f"variant {sample.requested!r}: " if sample.requested else ""
        raise LoadTestError(f"{what}the target refused the request: HTTP {sample.status} {sample.error}")


def run(loaded: Loaded, key: str | None, *, progress: TextIO | None = sys.stderr) -> RunData:
    """Run a loaded scenario to the end, on uvloop when it is installed (it is, with uvicorn[standard])."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop ships with the gateway's dependencies
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(Runner(loaded, key, progress=progress).run())

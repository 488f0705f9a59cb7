"""The server's one generation slot: a worker thread that serves queued jobs in turn.

The model has one KV cache (batch 1), so exactly one thread ever generates: jobs wait in a FIFO
queue and never interleave. Each job streams its text pieces back to the event loop through an
asyncio queue; setting `job.cancelled` (the client went away) stops its generation at the next
token and frees the slot for the next job.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from dataclasses import dataclass, field

from ..api import Detokenizer
from ..decoding.stats import GenerationStats
from ..drafters import DraftSpec


class StopMatcher:
    """Cuts generated text at the first stop sequence. Text that could be the start of a stop
    sequence is held back until the next piece shows whether it is one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop sequence was found: then generation should end)."""
        if not self.stops:
            return piece, False
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending = self.pending[:min(found)], ""
            return out, True
        keep = 0  # the longest tail of `pending` that starts some stop sequence
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    draft: str | None = None  # drafter name; None = the server's default
    drafter: object = None  # the built drafter for `draft` (None = plain decoding)
    tree_size: int | None = None
    stop: list[str] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.perf_counter)
    outcome: Outcome | None = None  # set by the worker when the job ends

    def post(self, kind: str, value=None) -> None:
        """Hand an event ("text", "done", "error") to the waiting request, from any thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody listens
            self.cancelled.set()

    async def events_until_done(self):
        while True:
            kind, value = await self.events.get()
            yield kind, value
            if kind in ("done", "error"):
                return

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Outcome:
    finish_reason: str  # "stop", "length" or "cancelled"
    completion_tokens: int
    stats: GenerationStats
    draft: str
    queue_time: float

    def hasten_stats(self) -> dict:
        """The speculative statistics returned with every answer."""
        s = self.stats
        return {"draft": self.draft, "exact": s.exact, "steps": s.steps,
                "mean_accepted_tokens_per_step": round(s.mean_accepted, 3),
                "accepted_histogram": {str(k): v for k, v in s.accepted_histogram().items()},
                "tokens_per_second": round(s.tokens_per_second, 2),
                "decode_tokens_per_second": round(s.decode_tokens_per_second, 2),
                "time_to_first_token_s": round(s.time_to_first_token, 4),
                "generation_time_s": round(s.total_time, 4),
                "queue_time_s": round(self.queue_time, 4)}


class Engine:
    """Owns the model and the single worker thread that generates with it."""

    def __init__(self, model, draft: DraftSpec = DraftSpec(), tree_size: int | None = None,
                 typical: bool = False):
        self.model = model
        self.draft = draft  # the server's drafter and the options every request's drafter gets
        self.tree_size = tree_size
        self.typical = typical
        self.jobs: queue.Queue = queue.Queue()
        self.current: Job | None = None
        self.served = 0
        self.finished: collections.deque[Outcome] = collections.deque(maxlen=64)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def queued(self) -> int:
        return self.jobs.qsize()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="hasten-engine", daemon=True)
                self._thread.start()

    def submit(self, job: Job) -> None:
        self.start()
        self.jobs.put(job)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running and queued jobs and end the worker thread."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.post("error", RuntimeError("the server is shutting down"))
        if self.current is not None:
            self.current.cancel()
        if self._thread is not None and self._thread.is_alive():
            self.jobs.put(None)
            self._thread.join(timeout)
        self._thread = None

    def spec(self, name: str | None) -> DraftSpec:
        """The drafter a request names (None: the server's), with the server's options."""
        return self.draft.named(name)

    def drafter(self, spec: DraftSpec):
        return self.model.drafter(spec)  # built once per spec, kept by the model

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():  # the client left while waiting in the queue
                job.outcome = Outcome("cancelled", 0, GenerationStats(), job.draft or "", 0.0)
                job.post("done", job.outcome)
                continue
            self.current = job
            try:
                job.outcome = self._generate(job)
                self.finished.append(job.outcome)
                job.post("done", job.outcome)
            except Exception as e:  # noqa: BLE001 - reported to the client; the server goes on
                job.post("error", e)
            finally:
                self.current = None
                self.served += 1

    def _generate(self, job: Job) -> Outcome:
        model = self.model
        queue_time = time.perf_counter() - job.created
        name = job.draft or self.draft.name
        drafter = job.drafter
        tokens = model.generate_ids(job.prompt_ids, job.max_tokens, temperature=job.temperature,
                                    top_p=job.top_p, top_k=job.top_k, seed=job.seed, draft=drafter,
                                    tree_size=job.tree_size if job.tree_size is not None
                                    else self.tree_size, typical=self.typical)
        stats = model.last_stats  # generate_ids made a fresh one for this generation
        detok, stopper = Detokenizer(model.tokenizer), StopMatcher(job.stop)
        count, finish = 0, None
        try:
            for token in tokens:
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                count += 1
                if token in model.stop_ids:
                    finish = "stop"
                    break
                text, hit = stopper.push(detok.add(token))
                if text:
                    job.post("text", text)
                if hit:
                    finish = "stop"
                    break
        finally:
            tokens.close()  # ends the generator (and its timing) right here
        if finish is None:
            rest, _ = stopper.push(detok.flush())
            rest += stopper.flush()
            if rest:
                job.post("text", rest)
            finish = "stop" if stats.finish_reason == "stop" else "length"
        return Outcome(finish, count, stats, name, queue_time)

"""The server's generation loop: one worker thread, continuous batching.

Requests wait in a FIFO queue for one of `max_batch` rows of a `BatchedDecoder`. Each step,
the worker

    1. lets go of requests that are finished, cancelled (the client left) or past their time
       limit: their rows are free at once;
    2. admits waiting requests into the free rows: each is prefilled alone and its first
       token goes out right away;
    3. advances every admitted request in ONE batched forward: a plain request by one token,
       one with a drafter by its accepted draft path + one (its tree verified in that forward).

Each request streams its text pieces back to the event loop through an asyncio queue
(`Job.post`). A request's tokens do not depend on who else is in the batch (see
`decoding/batched.py`).

Drafters: every request with one gets its own instance (drafters such as EAGLE and draft
models keep per-sequence state) and its own tree-size rule, and speculates inside the batch:
each step its tree goes into the one batched forward beside the other requests' roots and
trees (`BatchedDecoder.speculate`), and it gains its accepted path + bonus. A greedy request
that finds the server idle decodes alone, speculatively if it has a drafter (the model's own
engine and cache, the CLI's speed); when another request arrives it joins the batch at its
next step boundary (its cache copied into a row) and goes on there, still speculating if it
was: the same tokens either way. Seeded sampled requests decode plain: speculative sampling is lossless but draws
differently from plain sampling, and its draws depend on the tree sizes, which the batch
changes, so only plain decoding gives a seed the same sample whoever else is served (unseeded
sampled requests speculate: lossless, nothing to reproduce).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import queue
import sys
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

import torch

from ..api import Detokenizer
from ..decoding.batched import BatchCurve, BatchedDecoder, Sequence, share_tokens
from ..decoding.budget import MAX_TREE_SIZE
from ..decoding.engine import tree_sizer
from ..decoding.sampling import SamplingParams
from ..decoding.stats import GenerationStats
from ..drafters import DraftSpec
from ..errors import HastenError
from .compute import ComputeThread
from .metrics import Metrics


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


class ShuttingDown(Exception):
    """The server stopped before this request could finish."""


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    draft: str | None = None  # the drafter the request named
    drafter: object = None  # the model's instance for that spec: each request drafts with a copy
    tree_size: int | None = None
    stop: list[str] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    tenant: int = -1  # BitDelta tenant row route (-1: the base model)
    stream: bool = True  # False: the text is handed over once, at the end
    model_name: str = ""
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
    batch_size: int = 1  # the most rows this request shared a step with
    time_limit: bool = False  # ended by the per-request time limit
    requested_draft: str | None = None  # what the request asked for (seeded sampling: plain)

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
                "queue_time_s": round(self.queue_time, 4),
                "draft_requested": self.requested_draft,
                "max_batch_size": self.batch_size, "time_limit": self.time_limit}


@dataclass(eq=False)
class Running:
    """A job holding a batch row: its sequence and what turns its tokens into text."""
    job: Job
    seq: Sequence
    detok: Detokenizer
    stopper: StopMatcher
    stats: GenerationStats
    start: float
    queue_time: float
    count: int = 0
    batch_size: int = 1
    held: list[str] = field(default_factory=list)  # text of a non-streaming job, until it ends
    solo: object = None  # the speculative token stream while it decodes alone (no `seq`)
    drafted: bool = False  # decoded speculatively for a while
    tokens: list[int] = field(default_factory=list)  # delivered so far
    drafting: Drafting | None = None  # its drafter, in the batch

    def emit(self, text: str) -> None:
        """A stream gets each piece at once; a non-streaming answer gets one event at the end
        (per-token events would wake the event loop, and take the GIL, for nothing)."""
        if self.job.stream:
            self.job.post("text", text)
        else:
            self.held.append(text)

    def flush(self) -> None:
        if self.held:
            self.job.post("text", "".join(self.held))
            self.held.clear()


@dataclass(eq=False)
class Drafting:
    """A request's own drafter and tree-size rule, for its speculative steps in the batch."""
    drafter: object
    context: list[int]  # prompt + generated, the root last (what `propose` continues)
    max_size: int  # the request's (or server's) tree size; MAX_TREE_SIZE under the sizer
    sizer: object = None  # None: always max_size nodes
    curve: BatchCurve | None = None  # the sizer's cost curve, told the batch size each step


def own_drafter(template):
    """A drafter for one request: `fork()` where the drafter holds state a shallow copy would
    share (a draft model's cache), else a shallow copy (its `reset` rebinds its own state)."""
    fork = getattr(template, "fork", None)
    return fork() if fork is not None else copy.copy(template)


class Engine:
    """Owns the batched decoder and the worker thread that runs it."""

    def __init__(self, model, draft: DraftSpec = DraftSpec(), tree_size: int | None = None,
                 typical: bool = False, max_batch: int = 8, context: int | None = None,
                 request_timeout: float | None = None, backbone=None,
                 metrics: Metrics | None = None, compute: ComputeThread | None = None):
        self.model = model
        self.draft = draft  # the server's drafter and the options every request's drafter gets
        self.tree_size = tree_size
        self.typical = typical
        self.max_batch = max_batch
        self.request_timeout = request_timeout
        self.metrics = metrics or Metrics()
        backbone = backbone if backbone is not None else model.backbone
        if not hasattr(backbone, "blocks"):
            raise HastenError("hasten serve batches requests on the lean Llama runtime; this "
                              "model runs on the transformers adapter (use --runtime lean)")
        self.context = min(context or model.max_positions, model.max_positions)
        self.decoder = BatchedDecoder(backbone, max_batch, self.context)
        # BitDelta tenants: every forward routes each row to its tenant's delta (-1: the base).
        self.decoder.route_tenants = backbone is not model.backbone
        self.exact = backbone.exact  # rows independent of the batch (see decoding/batched.py)
        self.jobs: queue.Queue = queue.Queue()
        self.running: list[Running] = []
        self.served = 0
        self.finished: collections.deque[Outcome] = collections.deque(maxlen=64)
        self.solo: Running | None = None  # a lone greedy request, on the solo engine
        self._prefilling: Job | None = None  # taken from the queue, not yet running
        # The worker runs on `compute` (see server/compute.py: `hasten serve` passes the thread
        # that loaded the model), else on a thread of its own.
        self.compute = compute
        self._own_compute = compute is None
        self._worker: Future | None = None
        self._lock = threading.Lock()
        self._stopping = False

    @property
    def queued(self) -> int:
        return self.jobs.qsize()

    @property
    def active(self) -> int:
        """Requests holding a row, the one being prefilled included."""
        return len(self.running) + (self._prefilling is not None)

    def start(self) -> None:
        with self._lock:
            if self._worker is None or self._worker.done():
                self._stopping = False
                self.compute = self.compute or ComputeThread("hasten-engine")
                self._worker = self.compute.submit(self._work)

    def submit(self, job: Job) -> None:
        self.start()
        self.jobs.put(job)

    def cancel_queued(self, why: str = "the server is shutting down") -> None:
        """Refuse every job still waiting for a row."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.cancel()
                job.post("error", ShuttingDown(why))

    def cancel_running(self, why: str = "the server is shutting down") -> None:
        """End every generating job now with an error (posted from here, so a stream ends even
        while the worker is mid-step); the worker frees the rows at the step boundary."""
        for run in list(self.running):
            run.job.cancel()
            run.job.post("error", ShuttingDown(why))

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running and queued jobs and end the worker thread."""
        self._stopping = True
        self.cancel_queued()
        self.cancel_running()
        if self._worker is not None and not self._worker.done():
            self.jobs.put(None)  # wakes an idle worker
            wait([self._worker], timeout)
        self._worker = None
        if self._own_compute and self.compute is not None:
            self.compute.close()  # a later start makes a new one
            self.compute = None

    def spec(self, name: str | None) -> DraftSpec:
        """The drafter a request names (None: the server's), with the server's options."""
        return self.draft.named(name)

    def drafter(self, spec: DraftSpec):
        return self.model.drafter(spec)  # built once per spec, kept by the model

    # ---- the worker ---------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping:
            try:
                self._release_done()
                if self.solo is not None and not self.jobs.empty():
                    self._join_batch(self.solo)  # company arrived: the lone one decodes batched
                if self.solo is None and not self._admit():
                    return
                if self.solo is not None:
                    self._solo_step(self.solo)
                elif self.running:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                self._fail_all(e)

    def _admit(self) -> bool:
        """Prefill waiting jobs into free rows; waits for one when nothing runs. False: stop."""
        while self.decoder.free:
            try:
                job = self.jobs.get(block=not self.running)
            except queue.Empty:
                return True
            if job is None or self._stopping:
                return False
            if job.cancelled.is_set():  # the client left while waiting in the queue
                self._end_unstarted(job, "cancelled")
                continue
            self._prefilling = job
            try:
                self._start(job)
            except Exception as e:  # noqa: BLE001 - reported to the client; the server goes on
                job.post("error", e)
                self.metrics.requests.labels("error").inc()
                self.served += 1
            finally:
                self._prefilling = None
            if self.solo is not None:
                # A lone speculating request admits no company itself: whoever arrived during
                # its prefill waits for the loop to move it into the batch first (admitted now,
                # they sat in the batch unstepped until it finished).
                return True
        return True

    def _start(self, job: Job) -> None:
        start = time.perf_counter()
        params = SamplingParams(job.temperature, job.top_k, job.top_p)
        drafts = job.drafter is not None and (params.greedy or job.seed is None)
        job.drafter = own_drafter(job.drafter) if drafts else None  # None: this job decodes plain
        layers = getattr(job.drafter, "feature_layers", None) or ()
        if set(layers) - set(self.decoder.taps):  # kept from now on, for every batch row
            self.decoder.taps = tuple(sorted(set(self.decoder.taps) | set(layers)))
        if self._speculates_alone(job, params):  # plain as well: the CLI's own loop
            self._start_solo(job, start)
            return
        stats = GenerationStats(prompt_tokens=len(job.prompt_ids), exact=self.exact)
        generator = None if job.seed is None else torch.Generator().manual_seed(job.seed)
        seq = self.decoder.add(job.prompt_ids, params, generator, job.tenant)
        seq.typical = self.typical
        run = Running(job, seq, Detokenizer(self.model.tokenizer), StopMatcher(job.stop), stats,
                      start, start - job.created)
        if drafts:
            job.drafter.reset(list(job.prompt_ids), self.decoder.capacity)
            job.drafter.observe([seq.root], self._features(job.drafter, seq))  # as the solo engine
            self._draft_in_batch(run, list(job.prompt_ids) + [seq.root])
        self.running.append(run)
        stats.time_to_first_token = time.perf_counter() - start
        self.metrics.ttft.observe(time.perf_counter() - job.created)
        self.metrics.generated(1)
        self._deliver(run, seq.root)

    # ---- a lone greedy request: the solo engine (the CLI's loop) until company arrives --------

    def _speculates_alone(self, job: Job, params: SamplingParams) -> bool:
        """Alone and greedy, a request decodes on the solo engine, plain or speculative, as
        `hasten generate` does: a batch row of one costs more per step (its own loop, the LM
        head outside the compiled blocks). Greedy only: the solo engine's sampling would draw
        with its own tree sizes, the batch's with others (the tree-size rule sees the batch),
        so a sampled answer would depend on when others arrive; greedy gives the same tokens
        either way."""
        return (params.greedy and not self.running and self.jobs.empty()
                and not self.decoder.route_tenants)

    def _draft_in_batch(self, run: Running, context: list[int]) -> None:
        """From now on `run` speculates in the batch with its own drafter and tree-size rule."""
        job = run.job
        tree_size = job.tree_size if job.tree_size is not None else self.tree_size
        drafting = Drafting(job.drafter, context, MAX_TREE_SIZE if tree_size is None else tree_size)
        if tree_size is None:  # the solo engine's rule, over the cost curve the batch sees
            drafting.curve = BatchCurve(self.model.cost_curve(), self.decoder)
            drafting.sizer = tree_sizer(job.drafter, drafting.curve)
        run.drafting, run.drafted = drafting, True

    def _start_solo(self, job: Job, start: float) -> None:
        model = self.model
        tree_size = job.tree_size if job.tree_size is not None else self.tree_size
        tokens = model.generate_ids(job.prompt_ids, job.max_tokens, draft=job.drafter,
                                    tree_size=tree_size, typical=self.typical)
        stats = model.last_stats
        if job.drafter is None:  # plain: exact as a batch row is (it may join the batch)
            stats.exact = self.exact
        run = Running(job, None, Detokenizer(model.tokenizer), StopMatcher(job.stop),
                      stats, start, start - job.created, solo=tokens,
                      drafted=job.drafter is not None)
        self.running.append(run)
        self.solo = run
        self._solo_step(run)  # the prefill and the first token
        self.metrics.ttft.observe(time.perf_counter() - job.created)

    def _solo_step(self, run: Running) -> None:
        """The tokens of one speculative step (or of the prefill), delivered."""
        stats = run.stats
        while True:
            try:
                token = next(run.solo)
            except StopIteration:
                stats.finish_reason = stats.finish_reason or "length"
                return
            self.metrics.generated(1)
            self._deliver(run, token)
            if stats.finish_reason or run.job.cancelled.is_set():
                return
            if stats.new_tokens == 1 + sum(stats.accepted):  # all of this step's tokens are out
                if stats.accepted:
                    self.metrics.accepted.observe(stats.accepted[-1])
                return

    def _join_batch(self, run: Running) -> None:
        """Move the lone speculative request into the batch, at its step boundary: its
        committed cache is copied into a batch row; its drafter (fed every token so far) goes
        on drafting there, with a fresh tree-size rule. Its first batched step is plain where
        the drafter needs the target's last hidden state (Medusa), which `adopt` has not."""
        run.solo.close()
        run.seq = self.decoder.adopt(self.model.backbone, run.tokens, len(run.job.prompt_ids),
                                     tenant=run.job.tenant)
        run.seq.typical = self.typical
        run.solo, self.solo = None, None
        if run.job.drafter is not None:
            self._draft_in_batch(run, list(run.job.prompt_ids) + run.tokens)

    def _step(self) -> None:
        rows = len(self.running)
        for run in self.running:
            run.batch_size = max(run.batch_size, rows)
        t0 = time.perf_counter()
        trees = self._draft(rows)
        if trees:
            results = self.decoder.speculate(trees)
        else:  # every row plain: the plain step
            results = [(seq, [token]) for seq, token in self.decoder.step()]
        self.metrics.step([len(new) for _, new in results], time.perf_counter() - t0)
        by_seq = {id(run.seq): run for run in self.running}
        for seq, new in results:
            run = by_seq[id(seq)]
            run.stats.steps += 1
            run.stats.accepted.append(len(new))
            drafting = run.drafting
            if drafting is not None:
                tree = trees.get(seq)
                if drafting.sizer is not None:
                    drafting.sizer.update(tree.max_depth if tree else 0, len(new) - 1,
                                          tree.size if tree else 0)
                drafting.drafter.observe(new, self._features(drafting.drafter, seq))
                drafting.context += new
            for token in new:
                self._deliver(run, token)
                if run.stats.finish_reason:
                    break

    def _features(self, drafter, seq) -> torch.Tensor | None:
        """What `drafter.observe` reads of `seq`'s last committed positions: the outputs of its
        `feature_layers` (picked from the decoder's taps), or the last hidden states."""
        layers = getattr(drafter, "feature_layers", None) or ()
        if not layers or seq.taps is None:
            return None if layers else seq.hidden
        cols = [self.decoder.taps.index(i) for i in layers]
        return seq.taps.unflatten(-1, (len(self.decoder.taps), -1))[:, cols].flatten(-2)

    def _draft(self, rows: int) -> dict:
        """This step's tree of every drafting request. Sizes: each request's rule over the
        cost curve as a sequence of `rows` sees it (`BatchCurve`), within the room left in its
        row, and together within the step's token cap (`share_tokens`)."""
        drafting = [run for run in self.running if run.drafting is not None]
        if not drafting:
            return {}
        wanted = []
        for run in drafting:
            d = run.drafting
            if d.curve is not None:
                d.curve.rows = rows
            size = d.sizer.size if d.sizer is not None else d.max_size
            wanted.append(max(0, min(size, d.max_size, self.decoder.capacity - run.seq.length - 1)))
        trees = {}
        for run, size in zip(drafting, share_tokens(wanted, rows, self.decoder.max_step_tokens)):
            if size <= 0:
                continue
            d, seq = run.drafting, run.seq
            t0 = time.perf_counter()
            hidden = seq.hidden[-1] if seq.hidden is not None else None
            tree = d.drafter.propose(d.context, size, hidden).truncated(size)
            spent = time.perf_counter() - t0
            run.stats.draft_time += spent
            if d.sizer is not None:
                d.sizer.draft_cost.add(spent, tree.size)
            if tree.size:
                trees[seq] = tree
        return trees

    def _deliver(self, run: Running, token: int) -> None:
        """Turn one new token into text for the client; mark the run finished if it is."""
        job, stats = run.job, run.stats
        if job.cancelled.is_set():  # the client is gone: the token is never delivered
            return
        run.tokens.append(token)
        run.count += 1
        stats.new_tokens = run.count
        stats.total_time = time.perf_counter() - run.start
        if token in self.model.stop_ids:
            stats.finish_reason = "stop"
            return
        text, hit = run.stopper.push(run.detok.add(token))
        if text:
            run.emit(text)
        if hit:
            stats.finish_reason = "stop"
        elif run.count >= job.max_tokens or (run.seq is not None and
                                             run.seq.length + 1 > self.decoder.capacity):
            stats.finish_reason = "length"

    def _release_done(self) -> None:
        """Rows of finished, cancelled and overdue requests are freed before the next step."""
        now = time.perf_counter()
        for run in list(self.running):
            job, stats = run.job, run.stats
            overdue = (self.request_timeout is not None and not stats.finish_reason
                       and now - job.created > self.request_timeout)
            if not (stats.finish_reason or job.cancelled.is_set() or overdue):
                continue
            self._free(run)
            if job.cancelled.is_set():
                outcome = self._outcome(run, "cancelled")
            else:
                if stats.finish_reason == "length" or overdue:
                    rest, _ = run.stopper.push(run.detok.flush())
                    rest += run.stopper.flush()
                    if rest:
                        run.emit(rest)
                run.flush()
                outcome = self._outcome(run, "stop" if stats.finish_reason == "stop" else "length")
                outcome.time_limit = overdue
            job.outcome = outcome
            self.finished.append(outcome)
            self.metrics.requests.labels("time_limit" if overdue else outcome.finish_reason).inc()
            job.post("done", outcome)

    def _free(self, run: Running) -> None:
        self.running.remove(run)
        self.served += 1
        if run.solo is not None:
            run.solo.close()
            run.solo, self.solo = None, None
        if run.seq is not None:
            self.decoder.remove(run.seq)

    def _outcome(self, run: Running, finish: str) -> Outcome:
        draft = run.job.draft if run.drafted else "none"
        return Outcome(finish, run.count, run.stats, draft, run.queue_time, run.batch_size,
                       requested_draft=run.job.draft)

    def _end_unstarted(self, job: Job, finish: str) -> None:
        job.outcome = Outcome(finish, 0, GenerationStats(), "none", 0.0)
        self.finished.append(job.outcome)
        self.metrics.requests.labels(finish).inc()
        self.served += 1
        job.post("done", job.outcome)

    def _fail_all(self, e: Exception) -> None:
        print(f"hasten serve: a batched step failed: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        for run in list(self.running):
            self._free(run)
            self.metrics.requests.labels("error").inc()
            run.job.post("error", e)

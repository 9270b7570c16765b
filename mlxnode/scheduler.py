"""The serving loop: rank 0 decides every step, every rank carries the decision out.

Rank 0's `Scheduler` takes requests from the HTTP thread through a bounded queue, and before
each step of the model makes a `Decision`: which requests join the running batch (with their
token ids and sampling), which leave it (cancelled, or stopped by a stop string), whether to
run a readiness probe, whether to stop. The decision is broadcast (`distributed.broadcast_json`),
and every rank's `Executor` applies it to its own mlx-lm `BatchGenerator` and runs one step, so
the ranks can never disagree about what is running. All MLX work stays in the main thread.

When nothing runs, rank 0 waits on its queue for up to `HEARTBEAT_SECONDS` and then broadcasts
an idle decision anyway: the other ranks wait inside that collective, and each decision is a
watchdog beat, so idling never trips the step timeout while a hung peer still does. A request
that arrives meanwhile wakes rank 0 at once and joins at the next step.

A request's time to first token is mostly the prefill of its prompt, and on a CPU backend a
prompt token costs about one decode step. So each rank keeps the KV caches of the last
`PROMPT_CACHE_ENTRIES` finished requests, and a new request starts from the longest prefix it
shares with one of them (the chat template, an earlier turn of the conversation), prefilling
only the rest, as `mlx_lm.server` does. Every rank sees the same requests start and finish in
the same order, so every rank finds the same prefix; the decision's header carries a digest
of what each rank's cache did, so ranks whose caches drifted apart stop with an error.

Requests that end because of the model (end-of-sequence, `max_tokens`) leave every rank's
generator by themselves, at the same step. Everything else that ends a request early is decided
on rank 0 and leaves at the next step.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx

from . import distributed
from .generation import (
    EncodedPrompt,
    Start,
    Token,
    batch_generator,
    insert,
    seeded_sampler,
    step,
)
from .loading import ShardedModel
from .prompts import Prompt

logger = logging.getLogger(__name__)

# Longest wait for a request while nothing runs, before an idle decision keeps ranks in step.
HEARTBEAT_SECONDS = 1.0
# The probe is a request of its own; HTTP requests never get ids starting with this.
PROBE_PREFIX = "probe-"
# Finished requests whose KV caches a new request may start from (mlx_lm.server keeps 10).
# Counted in requests, not bytes: ranks hold different layers, so a byte limit would evict
# different entries on different ranks.
PROMPT_CACHE_ENTRIES = 4
# One server serves one model: the prompt cache's key for it.
_MODEL_KEY = "model"


class QueueFull(Exception):
    """The scheduler's queue is full; try again later."""


@dataclass(frozen=True)
class Job:
    """What every rank needs to run one request: its tokens and how to sample them."""

    id: str
    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Decision:
    """Rank 0's decision for one step, the same on every rank."""

    join: list[Job] = field(default_factory=list)
    leave: list[str] = field(default_factory=list)
    gather: bool = False  # gather every rank's peak memory after the step
    stop: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Decision:
        return cls(
            join=[Job(**job) for job in data["join"]],
            leave=list(data["leave"]),
            gather=bool(data["gather"]),
            stop=bool(data["stop"]),
        )


# -- events rank 0 sends each request's HTTP handler


@dataclass(frozen=True)
class Delta:
    """New text of a request (possibly empty: a token that completes no character yet)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The request is done: why, and its token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request cannot finish: the serving loop failed."""

    message: str


Event = Delta | Finished | Failed


@dataclass
class Request:
    """A request on rank 0: the job, its stop strings, and where its events go.

    `emit` is called from the main thread; it must hand the event over to the caller's
    thread (the HTTP server's event loop) without blocking.
    """

    job: Job
    emit: Callable[[Event], None]
    stop: Sequence[str] = ()
    submitted: float = field(default_factory=time.perf_counter)


class _Output:
    """A request's text so far, streamed out as deltas, cut at the first stop string.

    Text comes from mlx-lm's streaming detokenizer, as `mlxnode run` streams one prompt:
    each token costs the same however long the answer is.
    """

    def __init__(self, request: Request, tokenizer: Any):
        self.request = request
        self._detokenizer = tokenizer.detokenizer  # a fresh one per request
        self._text = ""
        self._sent = 0
        self.tokens = 0
        self.last_time: float | None = None
        # While streaming, hold back text that could still become a stop string.
        self._hold = max((len(s) for s in request.stop), default=1) - 1

    def add(self, token: Token) -> tuple[str, str | None]:
        """Record `token`: the text to send now, and the finish reason if it ends the request."""
        self.tokens += 1
        if token.finish_reason != "stop":
            self._detokenizer.add_token(token.id)
        if token.finish_reason is not None:
            self._detokenizer.finalize()
        # Only the new text and the stop string's length before it can hold a new match.
        start = max(len(self._text) - self._hold, 0)
        self._text += self._detokenizer.last_segment
        cut = _first_stop(self._text, self.request.stop, start)
        if cut is not None:
            return self._flush(self._text[:cut]), "stop"
        if token.finish_reason is not None:
            return self._flush(self._text), token.finish_reason
        return self._flush(self._text[: max(len(self._text) - self._hold, self._sent)]), None

    def _flush(self, text: str) -> str:
        delta, self._sent = text[self._sent :], max(self._sent, len(text))
        return delta


def _first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(found) if found else None


@dataclass
class Readiness:
    """The last readiness probe: a one-token generation that every rank takes part in."""

    loaded: bool = False
    started: float | None = None  # the probe in flight, if any
    stepping: float | None = None  # the step (decision and model step) in flight, if any
    done: float | None = None
    seconds: float | None = None

    def check(self, *, window: float, deadline: float, now: float) -> tuple[bool, str]:
        """(ready, why not) at `now`."""
        if not self.loaded:
            return False, "the model is loading"
        # A hung peer holds rank 0 inside a collective, where no new probe can start.
        if self.stepping is not None and now - self.stepping > deadline:
            return False, f"a step across the ranks has run for more than {deadline:g}s"
        if self.started is not None and now - self.started > deadline:
            return False, f"a probe generation has run for more than {deadline:g}s"
        if self.done is None or now - self.done > window:
            return False, f"no probe generation completed in the last {window:g}s"
        if self.seconds is not None and self.seconds > deadline:
            return False, f"the last probe generation took {self.seconds:.1f}s"
        return True, "ok"


class _Prefixes:
    """One rank's prompt cache: the KV caches finished requests left, by their tokens.

    `trail` is a digest of everything it did (kept, reused how much for which request),
    equal on every rank while their caches agree.
    """

    def __init__(self, entries: int):
        from mlx_lm.models.cache import LRUPromptCache

        self._lru = LRUPromptCache(max_size=entries)
        self.trail = 0
        self.reused = 0  # prompt tokens taken from the cache instead of prefilled

    def keep(self, start: Start) -> None:
        self._lru.insert_cache(_MODEL_KEY, start.tokens, start.cache)
        self._note(f"keep {len(start.tokens)}")

    def start(self, job: Job) -> tuple[list[int], Start | None]:
        """The tokens of `job` still to prefill, and the cache that holds those before them."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self._lru.fetch_nearest_cache(_MODEL_KEY, job.ids)
        if cache is not None and not rest:
            # All of it: the last token is prefilled again, for the first token's logits.
            if not can_trim_prompt_cache(cache):
                return job.ids, None
            trim_prompt_cache(cache, 1)
            rest = job.ids[-1:]
        if cache is None:
            return job.ids, None
        reused = len(job.ids) - len(rest)
        self.reused += reused
        self._note(f"{job.id} {reused}")
        return list(rest), Start(tokens=job.ids[:reused], cache=cache)

    def _note(self, what: str) -> None:
        self.trail = zlib.crc32(what.encode(), self.trail)


class Executor:
    """One rank's running batch: applies decisions to its generator and steps it.

    Args:
        sharded: This rank's shard.
        max_tokens: The default limit of a request (each job carries its own).
        max_batch: Requests that run at once.
        prompt_cache: Finished requests whose KV caches new ones may start from (0: none).
    """

    def __init__(
        self,
        sharded: ShardedModel,
        *,
        max_tokens: int,
        max_batch: int,
        prompt_cache: int = PROMPT_CACHE_ENTRIES,
    ):
        self._generator = batch_generator(sharded, max_tokens=max_tokens, max_batch=max_batch)
        self._uids: dict[int, str] = {}  # generator uid -> request id
        self._ids: dict[str, int] = {}
        self._prefixes = _Prefixes(prompt_cache) if prompt_cache > 0 else None

    @property
    def running(self) -> int:
        return len(self._uids)

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens so far taken from the prompt cache instead of prefilled."""
        return self._prefixes.reused if self._prefixes is not None else 0

    @property
    def trail(self) -> int:
        """A digest of what the prompt cache did, equal on every rank."""
        return self._prefixes.trail if self._prefixes is not None else 0

    def apply(self, decision: Decision) -> None:
        gone = [self._ids.pop(rid) for rid in decision.leave if rid in self._ids]
        if gone:
            self._generator.remove(gone)
            for uid in gone:
                del self._uids[uid]
        if decision.join:
            starts = [self._start(job) for job in decision.join]
            batch = [
                EncodedPrompt(prompt=Prompt(job.id, ""), ids=ids, max_tokens=job.max_tokens)
                for job, (ids, _) in zip(decision.join, starts, strict=True)
            ]
            samplers = [seeded_sampler(j.temperature, j.top_p, j.seed) for j in decision.join]
            uids = insert(self._generator, batch, samplers=samplers, starts=[s for _, s in starts])
            for uid, job in zip(uids, decision.join, strict=True):
                self._uids[uid] = job.id
                self._ids[job.id] = uid

    def _start(self, job: Job) -> tuple[list[int], Start | None]:
        # The probe must run the model for real: it never starts from a cache.
        if self._prefixes is None or job.id.startswith(PROBE_PREFIX):
            return job.ids, None
        return self._prefixes.start(job)

    def _finished(self, uid: int, start: Start) -> None:
        """Keep a finished request's KV cache for later ones (not the probe's: its prompt
        would only push out a request's)."""
        rid = self._uids.get(uid)
        if self._prefixes is not None and rid is not None and not rid.startswith(PROBE_PREFIX):
            self._prefixes.keep(start)

    def step(self) -> list[tuple[str, Token]]:
        """One step of the model: (request id, token) for each token it produced."""
        if not self._uids:
            return []
        produced = step(self._generator, on_finished=self._finished) or []
        out = []
        for token in produced:
            rid = self._uids[token.uid]
            if token.finish_reason is not None:
                del self._uids[token.uid]
                del self._ids[rid]
            out.append((rid, token))
        return out

    def close(self) -> None:
        self._generator.close()


class Scheduler:
    """Rank 0's side: the queue the HTTP thread fills, and each step's decision.

    `submit`, `cancel`, `stop`, `ready` and `queue_depth` may be called from any thread;
    everything else runs in the main thread, inside `serve`.

    Args:
        queue_size: Requests that may wait; `submit` raises QueueFull beyond.
        max_batch: Requests that run at once.
        ready_window: A probe generation must have completed this recently for `ready`.
        ready_deadline: The longest a probe may take.
        probe_ids: The probe's prompt (a few tokens).
        tokenizer: Turns tokens into text (the main thread's; not shared with another).
        heartbeat: The longest `decide` waits for a request while nothing runs.
        on_step: Called after every step with (queue depth, running requests, prompt
            tokens taken from the prompt cache so far).
        on_token: Called for every token of a request with (request, seconds since
            the previous token or since submission for the first, is first).
        on_finish: Called when a request finishes, with (request, Finished).
        on_memory: Called with every rank's {"rank", "host", "peak_memory_bytes"}.
    """

    def __init__(
        self,
        *,
        queue_size: int,
        max_batch: int,
        ready_window: float,
        ready_deadline: float,
        probe_ids: list[int],
        tokenizer: Any,
        heartbeat: float = HEARTBEAT_SECONDS,
        on_step: Callable[[int, int, int], None] | None = None,
        on_token: Callable[[Request, float, bool], None] | None = None,
        on_finish: Callable[[Request, Finished], None] | None = None,
        on_memory: Callable[[list[dict[str, Any]]], None] | None = None,
    ):
        self.max_batch = max_batch
        self.ready_window = ready_window
        self.ready_deadline = ready_deadline
        self._queue: queue.Queue[Request] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._tokenizer = tokenizer
        self._heartbeat = heartbeat
        self._live: set[str] = set()  # submitted and not finished: queued or running
        self._cancelled: set[str] = set()
        self._stopping = False
        self._readiness = Readiness()
        self._probe_ids = probe_ids
        self._probes = 0
        self._outputs: dict[str, _Output] = {}
        self._finishing: list[str] = []  # ended on rank 0, to leave the other ranks next step
        self._on_step = on_step or (lambda *_: None)
        self._on_token = on_token or (lambda *_: None)
        self._on_finish = on_finish or (lambda *_: None)
        self._on_memory = on_memory or (lambda *_: None)

    # -- any thread

    def submit(self, request: Request) -> None:
        """Queue `request`; it joins the batch at a coming step.

        Raises:
            QueueFull: too many requests are waiting already.
        """
        with self._lock:
            try:
                self._queue.put_nowait(request)
            except queue.Full:
                raise QueueFull from None
            self._live.add(request.job.id)

    def cancel(self, request_id: str) -> None:
        """Drop `request_id` (its client went away): it leaves the batch at the next step,
        or never joins it."""
        with self._lock:
            if request_id in self._live:
                self._cancelled.add(request_id)

    def stop(self) -> None:
        """End `serve` on every rank at the next step."""
        with self._lock:
            self._stopping = True

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def ready(self) -> tuple[bool, str]:
        """(ready, why not): loaded on every rank, and a recent probe made it in time."""
        with self._lock:
            return self._readiness.check(
                window=self.ready_window,
                deadline=self.ready_deadline,
                now=time.monotonic(),
            )

    # -- the main thread

    def loaded(self) -> None:
        with self._lock:
            self._readiness.loaded = True

    def decide(self, running: int) -> Decision:
        """The next step's decision; waits up to a heartbeat when there is nothing to do.

        Args:
            running: Requests in the executor's batch (the probe included).
        """
        idle = running == 0 and not self._finishing
        with self._lock:
            stopping = self._stopping
            leave = [rid for rid in self._cancelled if rid in self._outputs] + self._finishing
            self._finishing = []
            for rid in leave:
                self._forget(rid)
                self._outputs.pop(rid, None)
        # Every running request has an output (the probe has none, and a place of its own).
        room = self.max_batch - len(self._outputs)
        jobs = []
        for request in self._take(room, wait=self._heartbeat if idle else 0.0):
            with self._lock:
                gone = request.job.id in self._cancelled
                if gone:
                    self._forget(request.job.id)
            if gone:
                logger.info("request %s: the client went away before it started", request.job.id)
                continue
            self._outputs[request.job.id] = _Output(request, self._tokenizer)
            jobs.append(request.job)
        probe = self._probe()
        if probe is not None:
            jobs.append(probe)
        with self._lock:
            self._readiness.stepping = time.monotonic()
        return Decision(join=jobs, leave=leave, gather=probe is not None, stop=stopping)

    def _forget(self, request_id: str) -> None:
        """`request_id` is done; a cancel that comes now changes nothing. Hold the lock."""
        self._live.discard(request_id)
        self._cancelled.discard(request_id)

    def _take(self, n: int, *, wait: float) -> list[Request]:
        """Up to `n` requests off the queue, oldest first; block up to `wait` for the first."""
        taken: list[Request] = []
        try:
            if n > 0 and wait > 0:
                taken.append(self._queue.get(timeout=wait))
            while len(taken) < n:
                taken.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return taken

    def _probe(self) -> Job | None:
        """A probe job when one is due: half a window after the last, none in flight."""
        now = time.monotonic()
        with self._lock:
            r = self._readiness
            due = r.started is None and (r.done is None or now - r.done >= self.ready_window / 2)
            if not due:
                return None
            r.started = now
        self._probes += 1
        return Job(id=f"{PROBE_PREFIX}{self._probes}", ids=self._probe_ids, max_tokens=1)

    def after_step(
        self,
        produced: list[tuple[str, Token]],
        *,
        running: int,
        memory: list[dict[str, Any]] | None,
        cached: int = 0,
    ) -> None:
        """Deliver a step's tokens, and report the batch, the prompt tokens the prompt cache
        saved so far (`cached`) and (if gathered) every rank's memory."""
        with self._lock:
            self._readiness.stepping = None
        self._deliver(produced)
        if memory is not None:
            self._on_memory(memory)
        self._on_step(self.queue_depth, running, cached)

    def _deliver(self, produced: list[tuple[str, Token]]) -> None:
        """Hand each token's text to its request; finish the requests that ended."""
        for rid, token in produced:
            if rid.startswith(PROBE_PREFIX):
                self._probe_done()
                continue
            output = self._outputs.get(rid)
            if output is None:
                continue  # cancelled; it leaves at the next step
            request = output.request
            since = output.last_time if output.last_time is not None else request.submitted
            self._on_token(request, token.time - since, output.last_time is None)
            output.last_time = token.time
            text, finish_reason = output.add(token)
            if text:
                request.emit(Delta(text))
            if finish_reason is None:
                continue
            del self._outputs[rid]
            with self._lock:
                self._forget(rid)
            if token.finish_reason is None:
                self._finishing.append(rid)  # a stop string: the ranks still run it
            done = Finished(finish_reason, len(request.job.ids), output.tokens)
            self._on_finish(request, done)
            request.emit(done)

    def _probe_done(self) -> None:
        now = time.monotonic()
        with self._lock:
            r = self._readiness
            if r.started is not None:
                r.seconds, r.done, r.started = now - r.started, now, None

    def fail(self, message: str) -> None:
        """Tell every request, running or waiting, that it cannot finish."""
        with self._lock:
            self._readiness.loaded = False
            self._stopping = True
        queued = self._take(self._queue.maxsize, wait=0.0)
        for request in [o.request for o in self._outputs.values()] + queued:
            request.emit(Failed(message))
        self._outputs.clear()


def serve(
    sharded: ShardedModel,
    scheduler: Scheduler | None,
    *,
    max_tokens: int,
    max_batch: int,
    beat: Callable[[], None],
) -> None:
    """Serve until rank 0 decides to stop: every rank calls this, rank 0 with its scheduler.

    Args:
        sharded: This rank's shard.
        scheduler: Rank 0's scheduler; None on the other ranks.
        max_tokens: The default limit of a request (each job carries its own).
        max_batch: Requests that run at once (the same on every rank).
        beat: Called after every decision and step (the watchdog's beat).

    Raises:
        DistributedSetupError: a peer went away or fell out of step.
    """
    from mlx_lm.generate import generation_stream

    group = sharded.group
    many = group is not None and group.size() > 1
    executor = Executor(sharded, max_tokens=max_tokens, max_batch=max_batch + 1)
    if scheduler is not None:
        scheduler.loaded()
    try:
        with distributed.peer_errors(sharded.rank, "serving"):
            while True:
                decision = scheduler.decide(executor.running) if scheduler is not None else None
                if many:
                    # The step mlx-lm queued ahead holds collectives on the generation
                    # stream; the next decision's collective must not overtake them.
                    distributed.settle(generation_stream)
                    assert group is not None
                    shared = distributed.broadcast_json(
                        group,
                        decision.to_json() if decision is not None else None,
                        # Ranks whose prompt caches drifted apart fail here, out of step.
                        what=f"deciding the next serving step (prompt cache {executor.trail:x})",
                    )
                    decision = Decision.from_json(shared)
                assert decision is not None
                beat()
                if decision.stop:
                    return
                executor.apply(decision)
                produced = executor.step()
                beat()
                memory = (
                    _gather_memory(sharded, many, generation_stream) if decision.gather else None
                )
                if scheduler is not None:
                    scheduler.after_step(
                        produced,
                        running=executor.running,
                        memory=memory,
                        cached=executor.reused_tokens,
                    )
    finally:
        executor.close()


def _gather_memory(sharded: ShardedModel, many: bool, stream: Any) -> list[dict[str, Any]]:
    """Every rank's peak memory (a collective when there are several)."""
    mine = {
        "rank": sharded.rank,
        "host": socket.gethostname(),
        "peak_memory_bytes": int(mx.get_peak_memory()),
    }
    if not many:
        return [mine]
    distributed.settle(stream)
    assert sharded.group is not None
    return distributed.all_gather_json(sharded.group, mine, what="gathering peak memory")

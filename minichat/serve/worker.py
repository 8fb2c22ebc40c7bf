"""The batching scheduler: one background thread per model drives the engine's step API; asyncio handlers
get their tokens through per-request queues.

    worker = ModelWorker(name, engine, tokenizer, max_queue=64); worker.start()
    job = worker.submit(prompt_ids, GenOptions(...))       # raises Overloaded when the queue is full
    async for ev in job.events(): ...                       # Delta / Finish events, choice by choice
    job.cancel()                                            # e.g. the client disconnected

Continuous batching: the thread calls engine.step() in a loop; each step decodes one token for every running
sequence and prefills newly submitted ones, which join the running batch at the next step. So a request that
arrives while others are generating starts after at most one step, and all requests share each step's
matmuls. Text is decoded in the thread (engine.Detokenizer: whole UTF-8 characters, stop strings held back
and cut), so the event loop only forwards strings. The events of one step reach each event loop in one
loop.call_soon_threadsafe call (the only safe way into a loop from another thread): one wake-up per step,
not one per token (each wake-up of the loop's thread competes with the stepping thread for a core and the GIL).
(Deltas are not joined when a consumer falls behind: the output guard must see, and pass, the harmless start
of an answer before the part it flags.)
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from minichat.errors import MinichatError
from minichat.runtime import ThreadTuner
from minichat.serve.protocol import GenOptions

log = logging.getLogger("minichat.serve")


class Overloaded(MinichatError):
    """The model's queue is full; the client should retry later (HTTP 429)."""


@dataclass
class Delta:
    index: int  # choice
    text: str
    logprobs: list[dict] = field(default_factory=list)  # OpenAI chat logprob entries of the tokens in `text`


@dataclass
class Finish:
    index: int
    reason: str  # stop | length | cancelled | error
    completion_tokens: int
    error: str | None = None


# GPT-2's byte-level alphabet: each byte is shown as a printable character; this inverts it.
def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """The bytes and text of single tokens, for logprobs (a token may be part of a UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.hf = getattr(tokenizer, "tok", None)  # a Hugging Face tokenizers.Tokenizer for BPE
        self.byte_level = self.hf is not None and "ByteLevel" in type(getattr(self.hf, "decoder", None)).__name__
        self.dec = _byte_decoder() if self.byte_level else {}
        self.specials = set(getattr(tokenizer.meta, "specials", []))
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, tid: int) -> tuple[str, list[int]]:
        hit = self.cache.get(tid)
        if hit is not None:
            return hit
        b: bytes
        if self.byte_level:
            s = self.hf.id_to_token(tid) or ""
            if s in self.specials or any(c not in self.dec for c in s):
                b = s.encode("utf-8")
            else:
                b = bytes(self.dec[c] for c in s)
        else:
            b = self.tok.decode([tid]).encode("utf-8")
        out = (b.decode("utf-8", errors="replace"), list(b))
        if len(self.cache) < 200_000:
            self.cache[tid] = out
        return out

    def entry(self, tid: int, lp: float | None, top: list[tuple[int, float]] | None) -> dict:
        text, b = self(tid)
        e = {"token": text, "logprob": lp, "bytes": b, "top_logprobs": []}
        for t, l in top or []:
            tt, tb = self(t)
            e["top_logprobs"].append({"token": tt, "logprob": l, "bytes": tb})
        return e


class _Choice:
    def __init__(self, index: int, detok):
        self.index = index
        self.detok = detok
        self.request = None  # engine Request
        self.tokens = 0  # content tokens generated (the stop token not counted)
        self.pending_lp: list[dict] = []
        self.done = False
        self.reason: str | None = None  # the finish reason, once done


class Job:
    """One API request: n choices generated together, events delivered to the event loop that submitted it."""

    def __init__(self, worker: "ModelWorker", prompt_ids: list[int], opts: GenOptions,
                 loop: asyncio.AbstractEventLoop):
        from minichat.engine import Detokenizer

        self.worker, self.prompt_ids, self.opts, self.loop = worker, prompt_ids, opts, loop
        self._events: deque = deque()  # delivered, not yet consumed (touched on the event loop only)
        self._waiter: asyncio.Future | None = None
        self.choices = [_Choice(i, Detokenizer(worker.tokenizer, stop=opts.stop)) for i in range(opts.n)]
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self._open = opts.n
        self.cancelled = False
        self._done_lock = threading.Lock()
        self._done_callbacks: list[Callable[["Job"], None]] | None = []  # None once the job has ended

    def add_done_callback(self, fn: Callable[["Job"], None]) -> None:
        """Call fn(job) when the last choice has finished (in the worker thread), or now if it has."""
        with self._done_lock:
            if self._done_callbacks is not None:
                self._done_callbacks.append(fn)
                return
        fn(self)

    def _ended(self) -> None:  # worker thread
        with self._done_lock:
            callbacks, self._done_callbacks = self._done_callbacks or [], None
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # bookkeeping must never fail a reply
                log.exception("a request's done callback failed")

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    # --- called in the worker thread
    def _emit(self, ev: Any) -> None:
        self.worker._outbox.setdefault(self.loop, []).append((self, ev))

    # --- called on the event loop
    def _deliver(self, ev: Any) -> None:
        self._events.append(ev)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def events(self) -> AsyncIterator[Delta | Finish]:
        """Deltas and one Finish per choice; ends after the last Finish."""
        while self._open > 0:
            if not self._events:
                self._waiter = self.loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            ev = self._events.popleft()
            if isinstance(ev, Finish):
                self._open -= 1
            yield ev

    def cancel(self, index: int | None = None) -> None:
        """Stop all choices (or one); their Finish events say "cancelled" unless they had finished already."""
        if index is None:
            self.cancelled = True
        self.worker._cancel(self, index)


def _deliver_all(items: list[tuple[Job, Any]]) -> None:
    for job, ev in items:
        job._deliver(ev)


def _hand_on(outbox: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]]) -> None:
    """One call_soon_threadsafe per event loop with its events, in order."""
    for loop, items in outbox.items():
        try:
            loop.call_soon_threadsafe(_deliver_all, items)
        except RuntimeError:  # the loop is closed (server shutting down): nobody is listening any more
            pass


class ModelWorker:
    """Owns one Engine and the thread that steps it. All engine calls except submit/cancel happen there (and
    embeddings(), which reads only the model's own weights: ServedModel.embed)."""

    def __init__(self, name: str, engine, tokenizer, *, max_queue: int = 64, idle_wait: float = 0.5,
                 threads: int = 0, adaptive_threads: bool = True):
        self.name, self.engine, self.tokenizer = name, engine, tokenizer
        self.threads = threads  # torch intra-op threads of the stepping thread (0: that thread's default)
        self.adaptive_threads = adaptive_threads  # drop to one thread while that is faster (ThreadTuner)
        self.tuner: ThreadTuner | None = None
        self.max_queue = max_queue
        self.idle_wait = idle_wait
        self.token_text = TokenText(tokenizer)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._courier: threading.Thread | None = None  # carries each step's events to the event loops
        self._flushes = 0
        self._handoff: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._by_request: dict[int, tuple[Job, _Choice]] = {}
        self._cancels: list[tuple[Job, int | None]] = []
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]] = {}  # this step's events, by loop
        self.steps = 0
        self.step_seconds = 0.0  # time inside engine.step(): the rest of the thread's time is overhead or idle
        self.step_cpu_seconds = 0.0  # CPU time of this thread inside engine.step() (less than step_seconds when
        # the thread waits: for the GIL, or for a core other processes hold)
        self.tokens_out = 0
        self.finished: dict[str, int] = {}  # finish reason -> sequences
        self.observer: Callable[[Job], None] | None = None  # called in this thread when a job's last choice ends

    @property
    def context_len(self) -> int:
        return self.engine.max_seq_len

    def start(self) -> None:
        if self._thread is None:
            self._handoff = queue.SimpleQueue()
            self._courier = threading.Thread(target=self._carry, name=f"minichat-courier-{self.name}", daemon=True)
            self._courier.start()
            self._thread = threading.Thread(target=self._run, name=f"minichat-worker-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._courier is not None:
            self._handoff.put(None)
            self._courier.join(timeout)
            self._courier = None

    def _carry(self) -> None:
        """The courier thread: hands each step's events to their event loops, in order. Waking a loop
        (call_soon_threadsafe's socket write) drops the GIL, and the woken loop then holds it through its burst
        of writes: the courier waits for it, not the stepping thread (py-spy: 4.5% of that thread's time)."""
        while True:
            outbox = self._handoff.get()
            if outbox is None:
                return
            _hand_on(outbox)

    def stats(self) -> dict:
        return {"running": self.engine.num_running, "waiting": self.engine.num_waiting,
                "max_batch": self.engine.max_batch, "max_queue": self.max_queue, "steps": self.steps,
                "step_seconds": round(self.step_seconds, 3), "step_cpu_seconds": round(self.step_cpu_seconds, 3),
                "tokens_generated": self.tokens_out, "finished": dict(self.finished),
                # prompt tokens computed, and those whose keys and values came from the prefix cache instead
                "prefill_tokens": self.engine.prefill_tokens, "prefill_seconds": round(self.engine.prefill_seconds, 3),
                "prefix_cache_tokens": self.engine.prefix_cache.reused_tokens if self.engine.prefix_cache else 0,
                # the stepping thread's torch threads now, and how often ThreadTuner changed them
                "threads": self.tuner.threads() if self.tuner else self.threads or None,
                "thread_switches": self.tuner.switches if self.tuner else 0}

    # ------------------------------------------------------------------ submission (event loop side)
    def submit(self, prompt_ids: list[int], opts: GenOptions) -> Job:
        """Queue a request (n sequences). Raises Overloaded when the waiting queue is full, and the engine's
        ContextOverflowError / MinichatError for a prompt it cannot take."""
        from minichat.engine import SamplingParams

        if self._thread is None or self._stop.is_set():
            raise MinichatError(f"model {self.name!r} is not running")
        waiting = self.engine.num_waiting
        free = self.engine.max_batch - self.engine.num_running
        # room = free slots in the running batch + the waiting line; beyond that, refuse now rather than
        # queue unboundedly (each queued sequence also pins its prompt in memory)
        if waiting + opts.n > max(0, free) + self.max_queue:
            raise Overloaded(f"model {self.name!r} is at capacity ({self.engine.num_running} running, "
                             f"{waiting} waiting); retry shortly")
        job = Job(self, list(prompt_ids), opts, asyncio.get_running_loop())
        params = SamplingParams(
            max_tokens=opts.max_tokens, temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed,
            presence_penalty=opts.presence_penalty, frequency_penalty=opts.frequency_penalty,
            logprobs=opts.logprobs, top_logprobs=opts.top_logprobs, min_tokens=min(opts.min_tokens, opts.max_tokens),
            dry_multiplier=opts.dry_multiplier, dry_base=opts.dry_base, dry_allowed_length=opts.dry_allowed_length,
            logit_bias=opts.logit_bias, grammar=opts.grammar)
        params.validate()
        self.engine.check_prompt(job.prompt_ids)  # ContextOverflowError before anything is queued
        with self._lock:
            for c in job.choices:
                seed = None if opts.seed is None else opts.seed + c.index  # n samples must differ
                c.request = self.engine.submit(job.prompt_ids, params, seed=seed, index=c.index)
                self._by_request[c.request.id] = (job, c)
        self._wake.set()
        return job

    def _cancel(self, job: Job, index: int | None) -> None:
        with self._lock:
            self._cancels.append((job, index))
        self._wake.set()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        if self.threads:
            # OpenMP keeps one thread team per thread that starts parallel work; this thread's team should be
            # the only busy one (ModelRegistry.load builds engines with 1 thread for that reason)
            torch.set_num_threads(self.threads)
        if hasattr(self.engine, "before_compute"):
            self.engine.before_compute = self._flush
        n = torch.get_num_threads()
        if self.adaptive_threads and n > 1 and hasattr(self.engine, "thread_tuner"):
            self.tuner = self.engine.thread_tuner = ThreadTuner(n)
        while not self._stop.is_set():
            self._apply_cancels()
            if not self.engine.has_unfinished():
                self._flush()
                self._wake.wait(self.idle_wait)
                self._wake.clear()
                continue
            held, flushes = bool(self._outbox), self._flushes
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                events = self.engine.step()
            except Exception as e:  # a failed step must not kill the thread: fail its requests, keep serving
                log.exception("engine step failed")
                self._fail_all(f"generation failed: {e}")
                continue
            self.steps += 1
            self.step_seconds += time.perf_counter() - t0
            self.step_cpu_seconds += time.thread_time() - c0
            for ev in events:
                self._route(ev)
            # this step's events wait for the next step's compute hook, unless that step will not call it, or
            # events held for this step were not handed on (it took another path)
            if (held and self._flushes == flushes) or not getattr(self.engine, "calls_before_compute_next", bool)():
                self._flush()
        self._fail_all("the server is shutting down")
        self._flush()

    def _flush(self) -> None:
        """Hand the events gathered since the last flush to their event loops: one call per loop."""
        if not self._outbox:
            return
        self._flushes += 1
        outbox, self._outbox = self._outbox, {}
        if self._courier is not None:
            self._handoff.put(outbox)
        else:  # not started, or stopped: no courier
            _hand_on(outbox)

    def _apply_cancels(self) -> None:
        with self._lock:
            cancels, self._cancels = self._cancels, []
        for job, index in cancels:
            for c in job.choices:
                if (index is None or c.index == index) and not c.done and c.request is not None:
                    self.engine.cancel(c.request)
                    if c.request.finished:  # it was still waiting: the engine dropped it at once
                        self._close(job, c, "cancelled")

    def _route(self, ev) -> None:
        with self._lock:
            hit = self._by_request.get(ev.request.id)
        if hit is None:
            return
        job, c = hit
        if c.done:
            return
        if ev.token_id >= 0:
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
            self.tokens_out += 1
            is_stop_token = ev.finished and ev.finish_reason == "stop" and ev.request.stop_reason == ev.token_id
            if not is_stop_token:
                c.tokens += 1
                if job.opts.logprobs:
                    c.pending_lp.append(self.token_text.entry(ev.token_id, ev.logprob, ev.top_logprobs))
                text = c.detok.push(ev.token_id)
                if c.detok.stopped:  # a stop string: cut there and end this choice now
                    self._send(job, c, text)
                    if not ev.finished:
                        self.engine.cancel(ev.request)
                    self._close(job, c, "stop")
                    return
                if text:
                    self._send(job, c, text)
        if ev.finished:
            self._send(job, c, c.detok.flush())
            self._close(job, c, ev.finish_reason or "stop")

    def _send(self, job: Job, c: _Choice, text: str) -> None:
        if text or c.pending_lp:
            job._emit(Delta(c.index, text, c.pending_lp))
            c.pending_lp = []

    def _close(self, job: Job, c: _Choice, reason: str, error: str | None = None) -> None:
        if c.done:
            return
        c.done, c.reason = True, reason
        self.finished[reason] = self.finished.get(reason, 0) + 1
        with self._lock:
            if c.request is not None:
                self._by_request.pop(c.request.id, None)
        job._emit(Finish(c.index, reason, c.tokens, error))
        if all(ch.done for ch in job.choices):
            if self.observer is not None:
                try:
                    self.observer(job)
                except Exception:  # bookkeeping must never fail a reply
                    log.exception("request metrics failed")
            job._ended()

    def _fail_all(self, message: str) -> None:
        with self._lock:
            items = list(self._by_request.values())
        for job, c in items:
            if c.request is not None and not c.request.finished:
                try:
                    self.engine.cancel(c.request)
                except Exception:  # the engine is in a bad state; the requests are failed below anyway
                    pass
            self._close(job, c, "error", message)
        self._flush()
        # drop the cancelled rows so the next request starts clean
        try:
            if self.engine.has_unfinished():
                self.engine.step()
        except Exception:
            log.exception("engine could not drop failed requests")

"""A Moderator whose checks run in a child process: the same verdicts, off the caller's interpreter lock.

Why: a check is a few milliseconds of pure Python (normalisation, ~40 regular expressions, the hashed n-gram
scorer). In `minichat serve` the streaming guards of 32 streams run ~100 of them a second, and while one holds
the server's GIL the engine thread, which needs the GIL between every torch op of a decode step, waits: at 32
clients a decode step took ~70 ms with moderation against ~49 ms without. In a child process the checks cost
the same CPU but never stall the engine thread.

The child loads the same rules and scorer (same config file, same `learned` setting) and answers `check` and
`check_many`; everything else (settings, refusals, the audit log, stream guards) stays in this process, so the
audit file keeps a single writer. If the child dies, checks fall back to this process with a warning: a
moderation outage must not become a serving outage or an unmoderated reply.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import threading
from typing import Any, Iterable

from minichat.moderation.engine import ModerationResult, Moderator, StreamGuard

log = logging.getLogger(__name__)

_child: Moderator | None = None  # the moderator inside the child process (set by its initializer)


def _init(config_path: str | None, learned: bool) -> None:
    # (a lower priority for this process was tried: at 32 clients the checks then fell behind, streams waited
    # for their verdicts and the engine's batch shrank: 406 tok/s against 447 at the same priority)
    global _child
    _child = Moderator.load(config_path, learned=learned)


def _check(text: str, source: str) -> ModerationResult:
    return _child.check(text, source=source, audit=False)


def _check_many(texts: list[str], source: str) -> list[ModerationResult]:
    return _child.check_many(texts, source=source)  # the child's moderator has no audit log


class ModeratorProcess:
    """Moderator.check / check_many in a child process; every other attribute is the local Moderator's."""

    def __init__(self, local: Moderator, config_path: str | None = None):
        self.local = local
        self._lock = threading.Lock()
        ctx = multiprocessing.get_context("spawn")  # never fork a process whose torch threads are running
        self._pool: cf.ProcessPoolExecutor | None = cf.ProcessPoolExecutor(
            1, mp_context=ctx, initializer=_init, initargs=(config_path, local.scorer is not None))
        # start the child now (loading rules and scorer takes ~1 s), not on the first user's request
        self._pool.submit(_check, "", "input").result()

    def __getattr__(self, name: str) -> Any:  # settings, audit, refusal_for, categories, ...
        if name == "local":  # not set yet (__init__ failed): no recursion
            raise AttributeError(name)
        return getattr(self.local, name)

    def _remote(self, fn, *args):
        pool = self._pool
        if pool is not None:
            try:
                return pool.submit(fn, *args).result()
            except cf.process.BrokenProcessPool:
                with self._lock:
                    if self._pool is pool:
                        log.warning("the moderation process died; checking in the server process from now on")
                        self._pool = None
                        pool.shutdown(wait=False, cancel_futures=True)
        return None

    def check(self, text: str, *, source: str = "input", audit: bool = True) -> ModerationResult:
        text = self.local._coerce(text)  # bad input fails here, with the local moderator's message
        r = self._remote(_check, text, source)
        if r is None:
            return self.local.check(text, source=source, audit=audit)
        if audit and self.local.audit is not None:
            self.local.audit.write(r, text, source)
        return r

    def check_many(self, texts: Iterable[str], *, source: str = "input") -> list[ModerationResult]:
        if isinstance(texts, (str, bytes)):
            return self.local.check_many(texts, source=source)  # the local moderator's error
        items = [self.local._coerce(t) for t in texts]
        out = self._remote(_check_many, items, source)
        if out is None:
            return self.local.check_many(items, source=source)
        if self.local.audit is not None:
            for t, r in zip(items, out):
                self.local.audit.write(r, t, source)
        return out

    def stream_guard(self, source: str = "output") -> StreamGuard:
        return StreamGuard(self, source)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

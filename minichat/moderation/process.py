"""A Moderator whose checks run in a child process: the same verdicts, off the caller's interpreter lock.

Why: a check is a millisecond or two of pure Python (normalisation, ~40 regular expressions, the hashed n-gram
scorer). In `minichat serve` the streaming guards of 32 streams run ~100 of them a second, and while one holds
the server's GIL the engine thread, which needs the GIL between every torch op of a decode step, waits. In a
child process the checks cost the same CPU but never hold the server's GIL.

The plumbing is one pipe and one reader thread. An event loop sends its request from its own thread and awaits
a future that the reader resolves (acheck), so a check costs the server no thread hops; the child answers
every request waiting in the pipe as one batch (one learned-scorer call). A concurrent.futures process pool
with asyncio.to_thread around it cost five thread switches per check, and at 32 clients that plumbing alone
took ~13% of the tokens/s (bench/results/serve.md).

Stream guards ask the child to `screen` (Moderator.screen_many): a certainly clean text, most of them, comes
back as None, without running the exceptions or pickling a full result.

The child loads the same rules and scorer (same config file, same `learned` setting); settings, refusals,
the audit log (written here, by the reader thread or the caller) and stream guards stay in this process. If
the child dies or stops answering, checks fall back to this process with a warning: a moderation outage must
not become a serving outage or an unmoderated reply.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import multiprocessing
import threading
from typing import Any, Callable, Iterable

from minichat.errors import MinichatError
from minichat.moderation.engine import ModerationResult, Moderator, StreamGuard

log = logging.getLogger(__name__)


def _serve(conn, config_path: str | None, learned: bool) -> None:
    """The child: answer [(request id, op, texts), ...] batches with [(request id, results, error), ...];
    op "check" (Moderator.check_many) or "screen" (Moderator.screen_many: None for certainly clean texts)."""
    # (a lower priority for this process was tried: at 32 clients the checks then fell behind, streams waited
    # for their verdicts and the engine's batch shrank: 406 tok/s against 447 at the same priority)
    try:
        mod = Moderator.load(config_path, learned=learned)
        # the learned scorer imports scikit-learn's vectorisers on its first text (~0.6 s): pay that now, not in
        # the first user's stream
        mod.screen_many(["warm-up"])
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises a clear error
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            batch = [conn.recv()]
            while conn.poll():
                batch.append(conn.recv())
        except (EOFError, OSError):  # the server went away: exit quietly
            return
        if None in batch:  # close(): answer nothing more
            return
        replies = []
        for op in ("check", "screen"):
            part = [(rid, texts) for rid, o, texts in batch if o == op]
            if not part:
                continue
            try:
                flat = [t for _, texts in part for t in texts]  # one batch for the learned scorer
                results = mod.check_many(flat) if op == "check" else mod.screen_many(flat)  # no audit in the child
                k = 0
                for rid, texts in part:
                    replies.append((rid, results[k:k + len(texts)], None))
                    k += len(texts)
            except Exception as e:  # noqa: BLE001 - the parent checks these texts itself
                replies += [(rid, None, f"{type(e).__name__}: {e}") for rid, _ in part]
        conn.send(replies)


class ModeratorProcess:
    """Moderator.check / check_many / acheck / acheck_many in a child process; every other attribute is the
    local Moderator's."""

    def __init__(self, local: Moderator, config_path: str | None = None, *, timeout: float = 30.0,
                 start_timeout: float = 120.0):
        self.local = local
        self.timeout = timeout  # a check takes milliseconds; a child silent this long is treated as dead
        self._lock = threading.Lock()  # guards the pipe's send side, the pending table and _alive
        self._pending: dict[int, tuple[Callable, str | None, list[str]]] = {}
        self._next_id = 0
        ctx = multiprocessing.get_context("spawn")  # never fork a process whose torch threads are running
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, config_path, local.scorer is not None),
                                 name="minichat-moderation", daemon=True)
        self._proc.start()
        child.close()
        # wait for the child now (loading rules and scorer takes ~1 s), not on the first user's request
        if not self._conn.poll(start_timeout):
            self._proc.kill()
            raise MinichatError(f"the moderation process did not start within {start_timeout:.0f} s")
        try:
            kind, err = self._conn.recv()
        except EOFError:
            kind, err = "error", f"it exited with code {self._proc.join(5) or self._proc.exitcode}"
        if kind != "ready":
            raise MinichatError(f"the moderation process could not start: {err}")
        self._alive = True
        self._reader = threading.Thread(target=self._read, name="minichat-moderation-reader", daemon=True)
        self._reader.start()

    def __getattr__(self, name: str) -> Any:  # settings, audit, refusal_for, categories, ...
        if name == "local":  # not set yet (__init__ failed): no recursion
            raise AttributeError(name)
        return getattr(self.local, name)

    # ------------------------------------------------------------------ the pipe
    def _submit(self, texts: list[str], done: Callable[[list | None], None], audit: str | None,
                op: str = "check") -> bool:
        """Send one request; done(results or None) is called from the reader thread. False: no child."""
        with self._lock:
            if not self._alive:
                return False
            rid = self._next_id
            self._next_id += 1
            self._pending[rid] = (done, audit, texts)
            try:
                self._conn.send((rid, op, texts))
                return True
            except (OSError, ValueError):  # broken pipe: the child is gone
                self._pending.pop(rid, None)
        self._died("its pipe is broken")
        return False

    def _read(self) -> None:
        while True:
            try:
                replies = self._conn.recv()
            except (EOFError, OSError):
                self._died("it exited")
                return
            for rid, results, err in replies:
                with self._lock:
                    entry = self._pending.pop(rid, None)
                if entry is None:
                    continue
                done, audit, texts = entry
                try:
                    if err is not None:
                        log.warning("the moderation process failed on a check (%s); checking here", err)
                        results = None
                    elif audit is not None and self.local.audit is not None:  # ("check" only)
                        for t, r in zip(texts, results):  # written here, off the event loop
                            self.local.audit.write(r, t, audit)
                    done(results)
                except Exception:  # noqa: BLE001 - one caller's trouble must not stop the reader
                    log.exception("delivering a moderation result failed")

    def _died(self, why: str) -> None:
        with self._lock:
            if not self._alive:
                return
            self._alive = False
            pending, self._pending = self._pending, {}
        log.warning("the moderation process stopped (%s); checking in the server process from now on", why)
        if self._proc.is_alive():
            self._proc.kill()
        for done, _, _ in pending.values():
            done(None)  # their callers check locally

    def _call(self, texts: list[str], audit: str | None, op: str = "check") -> list | None:
        fut: cf.Future = cf.Future()
        if not self._submit(texts, fut.set_result, audit, op):
            return None
        try:
            return fut.result(self.timeout)
        except cf.TimeoutError:
            self._died(f"no answer within {self.timeout:.0f} s")
            return None

    async def _acall(self, texts: list[str], audit: str | None, op: str = "check") -> list | None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done(results):
            try:
                loop.call_soon_threadsafe(_resolve, fut, results)
            except RuntimeError:  # that loop is closed: nobody waits for this any more
                pass

        if not self._submit(texts, done, audit, op):
            return None
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            self._died(f"no answer within {self.timeout:.0f} s")
            return None

    # ------------------------------------------------------------------ the Moderator interface
    def check(self, text: str, *, source: str = "input", audit: bool = True) -> ModerationResult:
        text = self.local._coerce(text)  # bad input fails here, with the local moderator's message
        out = self._call([text], source if audit else None)
        return out[0] if out is not None else self.local.check(text, source=source, audit=audit)

    def check_many(self, texts: Iterable[str], *, source: str = "input") -> list[ModerationResult]:
        items = self._items(texts)
        out = self._call(items, source) if items else []
        return out if out is not None else self.local.check_many(items, source=source)

    async def acheck(self, text: str, *, source: str = "input", audit: bool = True) -> ModerationResult:
        text = self.local._coerce(text)
        out = await self._acall([text], source if audit else None)
        return out[0] if out is not None else await self.local.acheck(text, source=source, audit=audit)

    async def acheck_many(self, texts: Iterable[str], *, source: str = "input") -> list[ModerationResult]:
        items = self._items(texts)
        out = await self._acall(items, source) if items else []
        return out if out is not None else await self.local.acheck_many(items, source=source)

    def screen_many(self, texts: list[str]) -> list[ModerationResult | None]:
        items = self._items(texts)
        out = self._call(items, None, "screen") if items else []
        return out if out is not None else self.local.screen_many(items)

    async def ascreen(self, text: str) -> ModerationResult | None:
        text = self.local._coerce(text)
        out = await self._acall([text], None, "screen")
        return out[0] if out is not None else await self.local.ascreen(text)

    def _items(self, texts: Iterable[str]) -> list[str]:
        if isinstance(texts, (str, bytes)):
            self.local.check_many(texts)  # raises the local moderator's error
        return [self.local._coerce(t) for t in texts]

    def stream_guard(self, source: str = "output") -> StreamGuard:
        return StreamGuard(self, source)

    @property
    def alive(self) -> bool:
        return self._alive

    def close(self) -> None:
        with self._lock:
            was_alive, self._alive = self._alive, False
            pending, self._pending = self._pending, {}
            if was_alive:
                try:
                    self._conn.send(None)  # the child exits; the reader then reads EOF and stops
                except (OSError, ValueError):
                    pass
        for done, _, _ in pending.values():
            done(None)
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._reader.join(5)
        self._conn.close()


def _resolve(fut: asyncio.Future, results: list[ModerationResult] | None) -> None:
    if not fut.done():  # its awaiter may have been cancelled (client gone)
        fut.set_result(results)

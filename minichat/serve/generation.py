"""One generation with moderation around it, shared by the OpenAI endpoints and the web chat.

    verdict = await check_input(moderator, texts)        # InputVerdict: every result, and the flagged one
    async for ev in moderated_events(moderator, job, results):   # Delta / Moderated / Finish, choice by choice

The output guard reads each choice's text as it streams; once it flags, that choice is cancelled in the
engine, the flagged delta is withheld, a Moderated event carries the refusal, and its Finish says
"content_filter". When a choice ends, its whole text is checked once more (the guard only re-reads a
trailing window), which also gives the verdict reported in the response; when no verdict is reported (a stream
that did not ask for one) and the window holds the whole answer, the guard screening its last unread characters
decides the same thing for less. In "score" mode (a request's
moderation policy) verdicts are reported but nothing is blocked. Checks are awaited (`acheck`: in the child
process of a ModeratorProcess, or in a worker thread for an in-process Moderator): the learned scorer takes
milliseconds, and the event loop must keep serving other streams meanwhile; deltas that do not trigger a check
are fed inline (a hop per token cost more than the feed itself).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from minichat.serve.worker import Delta, Finish, Job

log = logging.getLogger("minichat.serve")


@dataclass
class Moderated:
    index: int
    result: Any  # minichat.moderation.ModerationResult
    refusal: str
    source: str  # input | output


@dataclass
class InputVerdict:
    results: list = field(default_factory=list)  # one per checked text
    flagged: Any | None = None  # the first flagged result


def summary(result: Any, source: str) -> dict:
    """A compact verdict (extra key on a choice; clients ignore keys they do not know)."""
    return {"source": source, "flagged": bool(result.flagged), "categories": list(result.flagged_categories),
            "rules": list(result.fired_rules)}


def results_block(results: list, model: str | None = None) -> dict:
    """OpenAI's moderated-completions shape: {"type": "moderation_results", "model", "results": [...]}."""
    from minichat.moderation.engine import MODEL_NAME

    return {"type": "moderation_results", "model": model or MODEL_NAME,
            "results": [{**r.to_openai(include_rules=True), "type": "moderation_result", "model": model or MODEL_NAME}
                        for r in results if r is not None]}


async def check_input(moderator, texts: list[str]) -> InputVerdict:
    texts = [t for t in texts if t]
    if moderator is None or not texts:
        return InputVerdict()
    results = await moderator.acheck_many(texts)
    return InputVerdict(results, next((r for r in results if r.flagged), None))


async def moderated_events(moderator, job: Job, verdicts: dict[int, Any] | None = None,
                           block: bool = True) -> AsyncIterator[Delta | Moderated | Finish]:
    """The job's events with output moderation applied; verdicts[i] receives each choice's final result.
    Without `verdicts` a clean answer may get no full result (only whether it is flagged is decided)."""
    guards = [moderator.stream_guard() for _ in job.choices] if (moderator is not None and block) else None
    texts = {c.index: "" for c in job.choices}
    flagged: dict[int, Moderated] = {}
    want_verdicts = verdicts is not None
    verdicts = {} if verdicts is None else verdicts
    try:
        async for ev in job.events():
            i = ev.index
            if isinstance(ev, Delta):
                if i in flagged:
                    continue  # generated before the cancel took effect: never shown
                texts[i] += ev.text
                if guards is not None and ev.text:
                    g = guards[i]
                    # most deltas only extend the guard's text; the few that trigger a check (milliseconds of
                    # rules and learned scorer) are awaited, so the loop keeps serving other streams meanwhile
                    hit = await g.afeed(ev.text)
                    if hit is not None:
                        flagged[i] = Moderated(i, hit, moderator.refusal_for(hit), "output")
                        verdicts[i] = hit
                        job.cancel(i)
                        yield flagged[i]
                        continue
                yield ev
            else:
                if moderator is not None and i not in flagged and ev.reason not in ("cancelled", "error"):
                    if (guards is not None and not want_verdicts and moderator.audit is None
                            and len(texts[i]) <= moderator.settings.stream_window):
                        # the guard's window holds the whole answer, so screening its unread tail decides as a
                        # full check would; nobody asked for the clean verdict's scores, and the client's next
                        # request waits for this one's last chunk (a full check costs ~20 ms p50 at 32 clients)
                        result = await guards[i].afinish()
                    else:
                        result = await moderator.acheck(texts[i], source="output")
                    if result is not None:
                        verdicts[i] = result
                    if result is not None and result.flagged and block:
                        flagged[i] = Moderated(i, result, moderator.refusal_for(result), "output")
                        yield flagged[i]
                if i in flagged:
                    ev = Finish(i, "content_filter", ev.completion_tokens, ev.error)
                yield ev
    finally:
        # the consumer went away (client disconnect) or failed: free the engine's rows now
        if any(not c.done for c in job.choices):
            job.cancel()


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request, job: Job):
    """Cancel `job` when the HTTP client goes away, even while nothing is being written to it."""

    async def watch():
        while True:
            msg = await request.receive()
            if msg.get("type") == "http.disconnect":
                job.cancel()
                return

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

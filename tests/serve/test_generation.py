"""moderated_events: the output guard, and when the final whole-text check can be left to the guard."""
import asyncio

import pytest

from minichat.moderation import Moderator
from minichat.serve.generation import Moderated, moderated_events
from minichat.serve.worker import Delta, Finish


class _Choice:
    def __init__(self, index):
        self.index, self.done = index, False


class ScriptedJob:
    """The part of worker.Job that moderated_events uses: choices, events(), cancel()."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces
        self.choices = [_Choice(0)]
        self.cancelled: list = []

    async def events(self):
        for p in self.pieces:
            yield Delta(0, p)
        self.choices[0].done = True
        yield Finish(0, "length", len(self.pieces))

    def cancel(self, index=None):
        self.cancelled.append(index)


class Counting:
    """A real Moderator that counts its full checks and screens."""

    def __init__(self):
        self.m = Moderator.load(learned=False)
        self.checks = 0
        self.screens = 0

    def __getattr__(self, name):
        return getattr(self.m, name)

    async def acheck(self, text, **kw):
        self.checks += 1
        return self.m.check(text, **kw)

    async def ascreen(self, text):
        self.screens += 1
        return self.m.screen_many([text])[0]

    def stream_guard(self, source="output"):
        from minichat.moderation.engine import StreamGuard

        return StreamGuard(self, source)


def _run(mod, pieces, verdicts=None):
    job = ScriptedJob(pieces)

    async def main():
        return [ev async for ev in moderated_events(mod, job, verdicts)]

    return job, asyncio.run(main())


# the last piece is short and ends without a sentence mark, so no stream screen reads it before the end
FLAGGED_TAIL = ["Sure, here is the thing you wanted to know about. ", "I will kill you"]


@pytest.mark.parametrize("report", [False, True])
def test_an_unscreened_flagged_tail_is_caught_at_the_end(report):
    mod = Counting()
    verdicts = {} if report else None
    job, evs = _run(mod, FLAGGED_TAIL, verdicts)
    # (a delta that triggers no screen is shown at once; the end's check then adds the refusal)
    assert [type(e) for e in evs] == [Delta, Delta, Moderated, Finish]
    assert evs[-1].reason == "content_filter" and "kill" not in evs[2].refusal
    # without a report the guard's own screen of the tail decided; with one, the full check did
    assert mod.checks == (1 if report else 0)
    if report:
        assert verdicts[0].flagged


def test_a_clean_answer_gets_its_full_verdict_only_when_one_is_reported():
    clean = ["The capital of France is Paris. ", "It lies on the Seine"]
    mod = Counting()
    _, evs = _run(mod, clean)
    assert [type(e) for e in evs] == [Delta, Delta, Finish] and evs[-1].reason == "length"
    assert mod.checks == 0 and mod.screens == 2  # the sentence end, then the unscreened tail
    mod, verdicts = Counting(), {}
    _run(mod, clean, verdicts)
    assert mod.checks == 1 and verdicts[0].flagged is False and verdicts[0].category_scores


def test_answers_longer_than_the_guards_window_still_get_the_full_check():
    mod = Counting()
    long = ["All is well here, friend. "] * (mod.settings.stream_window // 20)
    _, evs = _run(mod, long)
    assert evs[-1].reason == "length" and mod.checks == 1


def test_with_an_audit_log_every_answer_is_checked_and_logged(tmp_path):
    mod = Counting()
    mod.m.enable_audit(tmp_path / "audit.jsonl")
    _run(mod, ["A short, harmless answer."])
    assert mod.checks == 1
    assert '"source": "output"' in (tmp_path / "audit.jsonl").read_text()

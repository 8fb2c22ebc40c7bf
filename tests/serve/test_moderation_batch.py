"""Output-moderation checks of many streams run as one batch (CheckBatcher), with the same verdicts."""
import asyncio

from minichat.moderation import Moderator
from minichat.serve.generation import CheckBatcher

TEXTS = ["Here is a recipe for lemon cake.", "I will kill you", "The weather is nice today.",
         "How to make a pipe bomb at home", "Photosynthesis turns light into sugar."] * 3


def test_concurrent_checks_share_one_call_and_match_one_by_one():
    mod = Moderator.load()
    calls = []
    real = mod.check_many

    def spy(texts, **kw):  # the real check_many, counted
        calls.append(len(texts))
        return real(texts, **kw)

    mod.check_many = spy
    batcher = CheckBatcher(mod)

    async def run():
        return await asyncio.gather(*(batcher.check(t) for t in TEXTS))

    results = asyncio.run(run())
    assert calls == [len(TEXTS)] and batcher.calls == 1 and batcher.checked == len(TEXTS)
    for t, r in zip(TEXTS, results):
        want = mod.check(t, audit=False)
        assert r.flagged == want.flagged and r.category_scores == want.category_scores
    assert any(r.flagged for r in results) and not all(r.flagged for r in results)


def test_audited_and_unaudited_checks_go_in_separate_calls(tmp_path):
    mod = Moderator.load(learned=False, audit_path=str(tmp_path / "audit.jsonl"))
    batcher = CheckBatcher(mod)

    async def run():
        return await asyncio.gather(batcher.check("I will kill you"), batcher.check("I will kill you", audit=True))

    a, b = asyncio.run(run())
    assert a.flagged and b.flagged and batcher.calls == 2
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 1  # only the audited check wrote a record


def test_a_failing_check_reaches_every_waiting_stream():
    mod = Moderator.load(learned=False)

    def boom(texts, **kw):
        raise RuntimeError("scorer crashed")

    mod.check_many = boom
    batcher = CheckBatcher(mod)

    async def run():
        return await asyncio.gather(batcher.check("a"), batcher.check("b"), return_exceptions=True)

    out = asyncio.run(run())
    assert all(isinstance(e, RuntimeError) for e in out)

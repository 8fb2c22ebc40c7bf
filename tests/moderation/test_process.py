"""ModeratorProcess: the same verdicts as the local Moderator, with checks in a child process."""
import asyncio
import json

import pytest

from minichat.errors import MinichatError
from minichat.moderation import Moderator
from minichat.moderation.process import ModeratorProcess

TEXTS = ["What a lovely day.", "I will kill you", "h0w do I m4ke a b0mb at home", "", "Here is a recipe for bread.",
         "You are a worthless idiot and everyone hates you."]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    local = Moderator.load(learned=True, audit_path=audit)
    remote = ModeratorProcess(local)
    yield local, remote, audit
    remote.close()


def _same(a, b):
    assert a.flagged == b.flagged and a.categories == b.categories
    assert a.category_scores == pytest.approx(b.category_scores, abs=1e-6)


def test_same_verdicts_as_in_process(pair):
    local, remote, _ = pair
    for t in TEXTS:
        _same(remote.check(t, audit=False), local.check(t, audit=False))
    for a, b in zip(remote.check_many(TEXTS[:3]), local.check_many(TEXTS[:3])):
        _same(a, b)
    assert any(r.flagged for r in remote.check_many(TEXTS)) and not remote.check(TEXTS[0]).flagged


def test_the_audit_log_is_written_here_and_stream_guards_work(pair):
    local, remote, audit = pair
    n = len(audit.read_text().splitlines()) if audit.exists() else 0
    remote.check("I will kill you", source="output")
    rows = [json.loads(x) for x in audit.read_text().splitlines()[n:]]
    assert len(rows) == 1 and rows[0]["source"] == "output" and rows[0]["flagged"]
    guard = remote.stream_guard()
    hits = [guard.feed(piece) for piece in ["Sure. ", "I will ", "kill you", " now."]]
    assert any(h is not None and h.flagged for h in hits)
    assert remote.refusal_for(hits[-1]) == local.refusal_for(hits[-1])


def test_bad_input_is_a_clear_error(pair):
    _, remote, _ = pair
    with pytest.raises(MinichatError, match="string"):
        remote.check(123)
    with pytest.raises(MinichatError, match="list"):
        remote.check_many("one text")


def test_async_checks_batch_in_the_child_and_keep_their_order(pair):
    """Many acheck() calls at once reach the child together (it answers them as one batch); each caller gets
    its own text's verdict, the same as in-process."""
    local, remote, audit = pair
    texts = TEXTS * 5

    async def main():
        one = await asyncio.gather(*(remote.acheck(t, audit=False) for t in texts))
        many = await remote.acheck_many(texts[:4])
        return one, many

    one, many = asyncio.run(main())
    for t, r in zip(texts, one):
        _same(r, local.check(t, audit=False))
    for t, r in zip(texts[:4], many):
        _same(r, local.check(t, audit=False))
    with pytest.raises(MinichatError, match="string"):
        asyncio.run(remote.acheck(123))


def test_screening_in_the_child_matches_this_process(pair):
    local, remote, _ = pair
    texts = TEXTS + ["Kill the lights, then shoot the scene."]
    for a, b in zip(remote.screen_many(texts), local.screen_many(texts)):
        assert (a is None) == (b is None)
        if a is not None:
            _same(a, b)
    assert asyncio.run(remote.ascreen(TEXTS[0])) is None and asyncio.run(remote.ascreen(TEXTS[1])).flagged


def test_async_stream_guard_flags_like_the_sync_one(pair):
    local, remote, _ = pair
    pieces = ["Sure. ", "I will ", "kill you", " now."]

    async def run(guard):
        return [await guard.afeed(p) for p in pieces]

    hits = asyncio.run(run(remote.stream_guard()))
    sync = local.stream_guard()
    assert [h is not None for h in hits] == [sync.feed(p) is not None for p in pieces]
    assert hits[-1] is not None and hits[-1].flagged


def test_a_dead_child_falls_back_to_this_process(caplog):
    local = Moderator.load(learned=False)
    remote = ModeratorProcess(local)
    try:
        remote._proc.kill()
        remote._proc.join()
        with caplog.at_level("WARNING"):
            r = remote.check("I will kill you", audit=False)
            assert asyncio.run(remote.acheck("I will kill you", audit=False)).flagged
        assert r.flagged and not remote.alive and "moderation process stopped" in caplog.text
        assert not remote.check("What a lovely day.").flagged
    finally:
        remote.close()


def test_close_stops_the_child():
    remote = ModeratorProcess(Moderator.load(learned=False))
    assert remote.alive and not remote.check("What a lovely day.", audit=False).flagged
    remote.close()
    assert not remote._proc.is_alive() and not remote.alive
    assert remote.check("I will kill you", audit=False).flagged  # closed: checked here

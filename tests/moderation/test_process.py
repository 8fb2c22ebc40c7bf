"""ModeratorProcess: the same verdicts as the local Moderator, with checks in a child process."""
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


def test_a_dead_child_falls_back_to_this_process(caplog):
    local = Moderator.load(learned=False)
    remote = ModeratorProcess(local)
    try:
        for p in remote._pool._processes.values():
            p.kill()
            p.join()
        with caplog.at_level("WARNING"):
            r = remote.check("I will kill you", audit=False)
        assert r.flagged and remote._pool is None and "moderation process died" in caplog.text
        assert not remote.check("What a lovely day.").flagged
    finally:
        remote.close()

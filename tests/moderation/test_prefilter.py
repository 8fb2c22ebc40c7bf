"""The literal-prefix prefilter must never skip a pattern that matches (it may only skip certain misses)."""
import functools

import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minichat.moderation.engine import Moderator
from minichat.moderation.normalize import normalize
from minichat.moderation.prefilter import PrefixIndex, TextView, literal_prefixes, may_match


def test_prefixes_of_simple_patterns():
    p = literal_prefixes(r"\b(?:how (?:do|can) i|why) kill\b")
    assert p.anchored and p.strings == {"how do", "how ca", "why ki"}
    p = literal_prefixes(r"ab?c")  # an optional piece branches; no \b: substring search
    assert not p.anchored and p.strings == {"abc", "ac"}
    assert literal_prefixes(r"\b[1-3]x").strings == {"1x", "2x", "3x"}
    assert literal_prefixes(r"(?:\S+ ){0,2}kill") is None  # may start with anything
    assert literal_prefixes(r"(?i)kill") is None  # case-insensitive: not analysed
    assert literal_prefixes(r"(?:kill){e<=1}") is None  # regex-module fuzzy matching
    assert literal_prefixes(r"\p{L}+") is None  # regex-only syntax the stdlib parser rejects
    assert literal_prefixes(r"\b(?:a|\.b)").anchored is False  # "." is no word character: \b before it is no word start


def test_skips_only_certain_misses():
    p = literal_prefixes(r"\bhow (?:to|do) (?:\S+ ){0,2}?kill\b")
    for text, expect in [("tell me how to quietly kill it", True), ("how do", False), ("somehow to", False),
                         ("nothing here", False)]:
        assert bool(regex.search(r"\bhow (?:to|do) (?:\S+ ){0,2}?kill\b", text)) == expect
        if expect:
            assert may_match(p, TextView(text))
    assert not may_match(p, TextView("somehow to go"))  # "how to" occurs, but not at a word start
    assert may_match(None, TextView("anything"))


def test_a_later_required_word_rules_out_texts_the_first_one_lets_through():
    pat = r"\b(?:i|we) (?:\S+ ){0,2}?(?:kill|hurt)\b"
    p = literal_prefixes(pat)
    assert p.factors == {"kill", "hurt"}
    assert not may_match(p, TextView("i will help you"))  # "i " starts a word, but no verb of the pattern
    assert may_match(p, TextView("we will hurt them")) and regex.search(pat, "we will hurt them")
    assert literal_prefixes(r"(?:\S+ )?(?:kill|harm)").factors == {"kill", "harm"}  # no known start, a known word
    assert literal_prefixes(r"ab(?:cd)?") .factors is None  # nothing of 3 or more characters is required


@functools.lru_cache(maxsize=1)
def default_rules():
    return Moderator.load(None, learned=False).rules


_WORDS = ["how", "to", "do", "i", "kill", "make", "a", "bomb", "the", "women", "are", "kids", "you", "im",
          "going", "hurt", "write", "mean", "message", "17", "yo", "sex", "hate", "all", "shoot", "photo", "x"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_WORDS + [".", "?", "*", "k1ll", "a*b"]), min_size=1, max_size=14))
def test_default_rules_never_skip_a_match(words):
    # texts made of the rules' own words, so that matches happen; every match must pass the prefilter
    rules = default_rules()
    text = normalize(" ".join(words)).text
    view = TextView(text)
    for pat in list(rules.patterns.values()) + list(rules.exceptions.values()):
        if pat.regex.search(text):
            assert may_match(pat.prefixes, view), (pat.id, text)


def test_default_rules_are_mostly_prefiltered():
    rules = default_rules()
    pats = list(rules.patterns.values())
    assert sum(p.prefixes is not None for p in pats) >= len(pats) - 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_WORDS + [".", "?", "*", "k1ll", "a*b", "somehow", "abc"]), min_size=0, max_size=14))
def test_the_prefix_index_selects_what_may_match_selects(words):
    # the default rules, plus a rule with no known start, one found by substring search and one with factors
    rules = default_rules()
    extra = [("any", literal_prefixes(r"(?:\S+ ){0,2}kill")), ("sub", literal_prefixes(r"ab?c")),
             ("fac", literal_prefixes(r"\b(?:i|we) (?:\S+ ){0,2}?(?:kill|hurt)\b")), ("none", None)]
    items = [(p.id, p.prefixes) for p in list(rules.patterns.values()) + list(rules.exceptions.values())] + extra
    index = PrefixIndex(items)
    view = TextView(normalize(" ".join(words)).text)
    assert index.candidates(view) == {rid for rid, p in items if may_match(p, view)}

"""Literal prefixes of a regex: a cheap, exact test that a pattern cannot match a text.

Most rule patterns start with a long alternation of words (`\\b(?:how (?:do|can|...)|...)`), and the regex engine
tries that alternation at every position of the text: 10-35 µs per pattern on a 200-character answer, ~0.4 ms
for the 31 default patterns, which was 40% of a stream guard's check. `literal_prefixes(p)` derives, from the
pattern's syntax tree, a set of short strings (up to 6 characters) such that every match of `p` starts with one
of them; when none occurs in the text, the pattern cannot match and its search is skipped. A pattern that starts
with \\b and a word character can only match where a word starts, so its strings are looked up (set
intersections) among the text's word starts; others by substring search.

Sound by construction: zero-width items (\\b, lookarounds) are skipped (dropping a constraint only widens the
set), a repeat or set that cannot be spelled out ends a prefix early, and anything the analysis does not know
gives None ("always search"). Patterns are compiled by the `regex` module but parsed here with the standard
library's parser, whose syntax is the same for the common subset; a pattern using `regex`-only syntax either
fails to parse here (None) or is refused by `_UNSAFE` (fuzzy counts like `{e<=1}` parse as literal text).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import regex

try:  # Python 3.11+: the parser moved to re._parser; the names are the same
    import re._constants as _c
    import re._parser as _p
except ImportError:  # pragma: no cover - older Pythons
    import sre_constants as _c
    import sre_parse as _p

MAX_LEN = 6  # characters per prefix: long enough to be rare in text, short enough to keep the sets small
# more strings than this, and checking them costs about what the search they save costs (substring search
# is per string; word-start look-ups are set intersections, cheap at any size)
MAX_SET, MAX_SET_ANCHORED, MAX_FACTORS = 256, 4096, 64
_SET_SPELL = 10  # a character class of at most this many characters (e.g. [0-9]) is spelled out

_WORD = regex.compile(r"\w")
_WORD_START = regex.compile(r"\b\w")  # the same module and definitions as the patterns' own \b and \w
# `regex`-module syntax that the standard parser reads differently (fuzzy constraints such as {e<=1} and
# POSIX classes such as [[:alpha:]] parse as literal characters there): refuse rather than guess
_UNSAFE = ("{e", "{i", "{d", "{s", "[[:", "(?V1", "(?f", "(?r", "(?w")


def literal_prefixes(pattern: str) -> "Prefixes | None":
    """What every match of `pattern` starts with (and contains), or None when nothing certain is known."""
    if any(u in pattern for u in _UNSAFE):
        return None
    try:
        tree = _p.parse(pattern)
    except Exception:  # regex-only syntax (\\p{..}, \\m, ...) or anything else the stdlib parser rejects
        return None
    if tree.state.flags & (_c.SRE_FLAG_IGNORECASE | _c.SRE_FLAG_VERBOSE | _c.SRE_FLAG_LOCALE):
        return None
    items = list(tree)
    try:
        minimal = _minimal({s for s, _ in _seq(items)})
        factors = _factors(items)
    except _GiveUp:
        return None
    # \b before a word character: every match starts where a word starts, so only word starts need looking at
    lead = []
    for op, av in items:
        if op not in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
            break
        lead.append((op, av))
    anchored = bool(minimal) and (_c.AT, _c.AT_BOUNDARY) in lead and all(_WORD.match(m[0]) for m in minimal)
    if minimal is not None and len(minimal) > (MAX_SET_ANCHORED if anchored else MAX_SET):
        minimal = None
    if minimal is None and factors is None:
        return None
    return Prefixes(None if minimal is None else frozenset(minimal), anchored, factors)


def _minimal(strings: set[str]) -> list[str] | None:
    """The set without strings that start with another of it (same answer, fewer checks); None if it has ""."""
    if not strings or "" in strings:
        return None
    out: list[str] = []
    for s in sorted(strings, key=len):
        if not any(s.startswith(m) for m in out):
            out.append(s)
    return out


def _factors(items: list) -> frozenset[str] | None:
    """Strings one of which occurs in every match: the start of a piece every match contains (a later word of
    the pattern, often far rarer than its first, as "kill|hurt|..." after "i |we |..."). The most selective
    such set: longest shortest string, then fewest strings."""
    best, best_key = None, None
    for op, av in _mandatory(items):
        strings = _minimal({s for s, _ in _item(op, av)})
        if strings is None or len(strings) > MAX_FACTORS:
            continue
        key = (min(map(len, strings)), -len(strings))
        if key[0] >= 3 and (best_key is None or key > best_key):
            best, best_key = frozenset(strings), key
    return best


def _mandatory(items: list):
    """The pieces of a sequence that every match contains, looking inside groups and required repeats."""
    for op, av in items:
        if op is _c.SUBPATTERN:
            if not av[1] & (_c.SRE_FLAG_IGNORECASE | _c.SRE_FLAG_VERBOSE | _c.SRE_FLAG_LOCALE):
                yield from _mandatory(list(av[3]))
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)):
            if av[0] >= 1:
                yield from _mandatory(list(av[2]))
        elif op not in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
            yield op, av


@dataclass(frozen=True)
class Prefixes:
    strings: frozenset[str] | None  # every match starts with one of these (None: not known)
    anchored: bool  # ... at a word start (a \\b, then a word character)
    factors: frozenset[str] | None = None  # every match contains one of these (None: not known)

    def __post_init__(self):
        by_len: dict[int, set[str]] = {}
        for s in self.strings or ():
            by_len.setdefault(len(s), set()).add(s)
        object.__setattr__(self, "by_len", {n: frozenset(v) for n, v in by_len.items()})

    def may_match(self, text: "TextView") -> bool:
        """False only when no match is possible in the text."""
        t = text.text
        if self.strings is not None:  # first: at word starts it is a few set intersections
            if self.anchored:
                if all(strs.isdisjoint(text.word_starts(n)) for n, strs in self.by_len.items()):
                    return False
            elif not any(s in t for s in self.strings):
                return False
        return self.factors is None or any(f in t for f in self.factors)


class TextView:
    """A text and, computed on demand, the first n characters at each of its word starts (for anchored sets)."""

    def __init__(self, text: str):
        self.text = text
        self._starts: list[int] | None = None
        self._by_len: dict[int, set[str]] = {}

    def word_starts(self, n: int) -> set[str]:
        got = self._by_len.get(n)
        if got is None:
            if self._starts is None:
                self._starts = [m.start() for m in _WORD_START.finditer(self.text)]
            t = self.text
            got = self._by_len[n] = {t[i:i + n] for i in self._starts}
        return got


class PrefixIndex:
    """may_match() for many rules at once: which of them may match a text. Each anchored literal start of every
    rule goes into one set per length, so a text's word starts meet all rules in a few set intersections (in
    C) instead of a generator per rule: the default 31 patterns' check took ~60 of a screen's ~90 µs of rules.
    Rules without known anchored starts are checked one by one, as before."""

    def __init__(self, rules: Iterable[tuple[str, "Prefixes | None"]]):
        self.prefixes: dict[str, Prefixes | None] = {}
        self.single: list[str] = []  # checked by may_match() itself
        self.owners: dict[str, list[str]] = {}  # start string -> rule ids
        keys: dict[int, set[str]] = {}
        for rid, p in rules:
            self.prefixes[rid] = p
            if p is None or p.strings is None or not p.anchored:
                self.single.append(rid)
                continue
            for st in p.strings:
                self.owners.setdefault(st, []).append(rid)
                keys.setdefault(len(st), set()).add(st)
        self.keys = {n: frozenset(v) for n, v in keys.items()}

    def candidates(self, text: TextView) -> set[str]:
        """The ids of the rules for which may_match(prefixes, text) is True."""
        hit: set[str] = set()
        for n, keys in self.keys.items():
            for st in keys.intersection(text.word_starts(n)):
                hit.update(self.owners[st])
        t = text.text
        out = {r for r in hit if self.prefixes[r].factors is None or any(f in t for f in self.prefixes[r].factors)}
        out.update(r for r in self.single if may_match(self.prefixes[r], text))
        return out


def may_match(prefixes: "Prefixes | None", text: TextView) -> bool:
    """False only when `prefixes` prove that the pattern has no match in the text."""
    return True if prefixes is None else prefixes.may_match(text)


class _GiveUp(Exception):
    pass


# A result is a set of (text, open): `text` starts every match of the analysed piece; open means the piece is
# exactly that text, so what follows it may extend it; closed means the prefix stops there.
def _seq(items: list) -> set[tuple[str, bool]]:
    cur: set[tuple[str, bool]] = {("", True)}
    for op, av in items:
        if not any(o for _, o in cur):
            break
        piece = _item(op, av)
        nxt: set[tuple[str, bool]] = set()
        for s, o in cur:
            if not o:
                nxt.add((s, False))
                continue
            for t, to in piece:
                u = s + t
                if len(u) >= MAX_LEN:
                    nxt.add((u[:MAX_LEN], False))
                else:
                    nxt.add((u, to))
        if len(nxt) > 2 * MAX_SET_ANCHORED:
            raise _GiveUp
        cur = nxt
    return cur


def _item(op, av) -> set[tuple[str, bool]]:
    if op is _c.LITERAL:
        return {(chr(av), True)}
    if op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):  # zero-width: skipping a constraint only widens the set
        return {("", True)}
    if op is _c.SUBPATTERN:
        _group, add_flags, _del_flags, sub = av
        if add_flags & (_c.SRE_FLAG_IGNORECASE | _c.SRE_FLAG_VERBOSE | _c.SRE_FLAG_LOCALE):
            raise _GiveUp
        return _seq(list(sub))
    if op is getattr(_c, "ATOMIC_GROUP", None):
        return _seq(list(av))
    if op is _c.BRANCH:
        out: set[tuple[str, bool]] = set()
        for alt in av[1]:
            out |= _seq(list(alt))
        return out
    if op is _c.IN:
        chars = []
        for sop, sav in av:
            if sop is _c.LITERAL:
                chars.append(chr(sav))
            elif sop is _c.RANGE and sav[1] - sav[0] < _SET_SPELL:
                chars.extend(map(chr, range(sav[0], sav[1] + 1)))
            else:  # categories (\\w), negation, wide ranges: not spelled out
                return {("", False)}
        if len(chars) > _SET_SPELL:
            return {("", False)}
        return {(ch, True) for ch in chars}
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)):
        lo, hi, sub = av
        if hi == 1:  # one copy at most: it is the whole piece, so what follows may extend it
            once = _seq(list(sub))
            return once | {("", True)} if lo == 0 else once
        first = {(s, False) for s, _ in _seq(list(sub))}  # one copy, then stop: its start is certain
        return first | {("", True)} if lo == 0 else first
    # ANY, NOT_LITERAL, CATEGORY, GROUPREF, conditional groups, ...: nothing certain about the next character
    return {("", False)}

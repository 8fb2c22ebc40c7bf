"""Text normalisation against evasion, shared by the rules and the learned scorer.

Steps, in order: clean (lone surrogates -> U+FFFD, control characters -> space, invisible format characters such
as zero-width spaces and soft hyphens dropped); fold (compatibility forms such as fullwidth or mathematical
letters, accents stripped, case folded, common Cyrillic/Greek look-alike letters mapped to Latin); join spaced
or punctuated single letters ("k i l l", "k.i.l.l" -> "kill"); tokenise; undo leetspeak inside words that
also hold letters ("k1ll", "$hit", "@ss"); drop apostrophes ("i'm" -> "im"); shorten letters repeated three or more times ("kiiiill" -> "kill",
with a fully squeezed form "kil" kept for lexicon look-up).

Every regular expression here has a fixed-width repeated unit, so matching is linear in the text length.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

import regex

# Look-alike letters that NFKD does not fold (Cyrillic and Greek letters that render like Latin ones).
_CONFUSABLES = {
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w",
    "һ": "h", "ӏ": "l", "ɡ": "g", "ɑ": "a", "ı": "i", "ȷ": "j", "ο": "o", "α": "a", "β": "b", "ε": "e",
    "η": "n", "ι": "i", "κ": "k", "ν": "v", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ω": "w",
    "ѡ": "w", "ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "đ": "d", "ł": "l", "ħ": "h", "ŧ": "t",
    "\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'",
}
_CONFUSABLE_TABLE = str.maketrans(_CONFUSABLES)

# Leetspeak, applied only to tokens that also contain a letter (so "2024" and "1000" stay numbers).
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
                       "@": "a", "$": "s", "!": "i", "|": "l", "+": "t", "€": "e"})

# Runs of 3+ single characters separated by the same space or punctuation mark: "k i l l", "f.u.c.k", "d-e-a-d".
# The same mark throughout, and no apostrophe before the run, so contractions stay words: "i'm a" is not "ima".
_SPACED = regex.compile(r"(?<![\w@$'])[\w@$]([ .\-_*/,'])[\w@$](?:\1[\w@$])+(?![\w@$])")
# A word: letters/digits plus leet symbols and the masking characters * and #, apostrophes inside.
_TOKEN = regex.compile(r"[\w@$*#€|+!]+(?:'\w+)*|[.?;:]")
_RUN3 = regex.compile(r"(.)\1{2,}")
# Letters often doubled in English words ("cool", "kill", "mess", "coffee"): an elongated run of them shortens
# to two; any other letter's run shortens to one ("fuuuck" -> "fuck", "kiiiill" -> "kill").
_DOUBLED = set("eloftspmncgz")
_RUN2 = regex.compile(r"(.)\1+")
_LEET_CHARS = set("01345789@$!|+€")
# Tokens whose digits are numbers, not leetspeak: "13yo", "2nd", "4k", "10mg", "mp3", "x86", "covid19".
_KEEP_DIGITS = regex.compile(
    r"\d+(?:st|nd|rd|th|s|yo|yr|yrs|y|k|m|mg|ml|g|kg|lb|lbs|pm|am|px|gb|mb|tb|p|x|d|h|min|mins|hz|v|w)$"
    r"|[a-z]+\d+$")


@dataclass
class Normalized:
    """The normalised form of a text: `text` is tokens joined by single spaces (patterns run on it)."""

    text: str
    tokens: list[str]
    squeezed: list[str | None]  # all repeats collapsed, only where the token was elongated ("kiiill" -> "kil")
    offsets: list[int] = field(default_factory=list)  # start of each token in `text`
    changed: bool = False  # whether evasion-style rewriting (leet, spacing, repeats, confusables) happened


# ASCII's control characters (category Cc) except newline and tab, as clean() maps them
_ASCII_CONTROL = {c: " " for c in [*range(0, 9), *range(11, 32), 127]}


def clean(text: str) -> str:
    """Replace lone surrogates and control characters; drop invisible format characters."""
    if text.isascii():  # the common case, without a category look-up per character (ASCII has no Cf)
        return text.translate(_ASCII_CONTROL)
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cc":
            out.append(" " if ch not in "\n\t" else ch)
        elif cat == "Cf":
            continue  # zero-width space/joiner, soft hyphen, bidi marks: used to split words invisibly
        else:
            out.append(ch)
    return "".join(out)


def fold(text: str) -> str:
    """Compatibility-fold, strip accents, casefold and map look-alike letters."""
    if text.isascii():  # NFKD changes no ASCII character, and casefold() is lower() there
        return text.lower().translate(_CONFUSABLE_TABLE)
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return text.casefold().translate(_CONFUSABLE_TABLE)


def _join_spaced(m: regex.Match) -> str:
    s = m.group(0)
    return s[0::2]


def _deleet(tok: str) -> str:
    # Leading/trailing "!" and "+" are punctuation ("wow!"), not letters.
    core = tok.rstrip("!|+").lstrip("!|+")
    if not any(c.isalpha() for c in core) or _KEEP_DIGITS.match(core):
        return core
    if any(c in _LEET_CHARS for c in core):
        core = core.translate(_LEET)
    return core


def _token(raw: str) -> tuple[str, str | None, bool]:
    """One token's normal form, its fully squeezed form (if elongated) and whether rewriting happened."""
    if raw in ".?;:":
        return raw, None, False
    tok = _deleet(raw.replace("'", ""))  # "don't" -> "dont": rules never need to spell apostrophes
    changed = tok != raw
    sq = None
    if tok and _RUN3.search(tok):
        changed = True
        sq = _RUN2.sub(r"\1", tok)
        tok = _RUN3.sub(lambda m: m.group(1) * (2 if m.group(1) in _DOUBLED else 1), tok)
    return tok, sq, changed


# _token() of the tokens seen so far: answers repeat their words, and a stream guard re-reads its window
_TOKEN_CACHE: dict[str, tuple[str, str | None, bool]] = {}


def normalize(text: str) -> Normalized:
    """Normalise `text` (a str) for matching; see the module docstring."""
    folded = fold(clean(text))
    joined = _SPACED.sub(_join_spaced, folded)
    changed = joined != folded or folded != text.casefold()
    tokens: list[str] = []
    squeezed: list[str | None] = []
    for raw in _TOKEN.findall(joined):
        hit = _TOKEN_CACHE.get(raw)
        if hit is None:
            hit = _token(raw)
            if len(_TOKEN_CACHE) >= 100_000:  # bounded: a stream of random tokens must not grow it forever
                _TOKEN_CACHE.clear()
            _TOKEN_CACHE[raw] = hit
        tok, sq, tok_changed = hit
        if not tok:
            continue
        changed = changed or tok_changed
        tokens.append(tok)
        squeezed.append(sq)
    offsets = []
    pos = 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t) + 1
    return Normalized(" ".join(tokens), tokens, squeezed, offsets, changed)


def squeeze(word: str) -> str:
    """Collapse every run of a repeated character to one ("kill" -> "kil"), for elongation-proof look-up."""
    return _RUN2.sub(r"\1", word)

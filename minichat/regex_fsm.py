"""JSON Schema's `pattern` and `format` as a finite automaton, for constrained decoding (constrain.py).

The grammar needs a string's regex as a state it can hash, step one character at a time and ask whether it may
end. interegular compiles the pattern (Python's regex syntax, which JSON Schema's ECMA patterns share in the
common cases) to a deterministic automaton; its states are ints. A pattern without `^` or `$` may match anywhere
in the string, as JSON Schema's patterns do.
"""
from __future__ import annotations

import re
from collections import deque

from minichat.errors import MinichatError

MAX_REPEAT = 256  # a count such as {1000} unrolls into as many automaton states: a schema may not ask for more
MAX_PATTERN = 1000  # characters: the pattern is compiled while a request waits

# a calendar date: years 0001-9999, each month's days, 29 February in leap years only (pydantic rejects the rest)
_YEAR = r"(?:[1-9]\d{3}|0[1-9]\d\d|00[1-9]\d|000[1-9])"
_LEAP = r"(?:\d\d(?:0[48]|[2468][048]|[13579][26])|(?:[2468][048]|[13579][26]|0[48])00)"
_DATE = (rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
         rf"|02-(?:0[1-9]|1\d|2[0-8]))|{_LEAP}-02-29)")
_TIME = r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,9})?"
_ZONE = r"(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
# JSON Schema formats as anchored patterns
FORMATS = {
    "date": rf"^{_DATE}$",
    "time": rf"^{_TIME}{_ZONE}?$",
    "date-time": rf"^{_DATE}T{_TIME}{_ZONE}$",
    "uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    "email": r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63}){1,8}$",
    "ipv4": r"^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)$",
    "hostname": r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?){0,8}$",
}
_COUNT = re.compile(r"\{(\d*),?(\d*)\}")


class RegexError(MinichatError):
    """A pattern this automaton cannot follow."""


class Regex:
    """A pattern's automaton: `start`, step(state, char) -> state or None, accepts(state), chars_to_match(state)."""

    def __init__(self, pattern: str):
        import interegular

        if not isinstance(pattern, str):
            raise RegexError(f"a pattern must be a string, got {type(pattern).__name__}")
        if len(pattern) > MAX_PATTERN:
            raise RegexError(f"a pattern may have at most {MAX_PATTERN} characters, this one has {len(pattern)}")
        for m in _COUNT.finditer(pattern):
            if any(g and int(g) > MAX_REPEAT for g in m.groups()):
                raise RegexError(f"pattern {pattern!r}: a count over {MAX_REPEAT} ({m.group(0)})")
        body = pattern
        start_anchor = body.startswith("^")
        end_anchor = body.endswith("$") and not body.endswith("\\$")
        body = body[1 if start_anchor else 0: len(body) - 1 if end_anchor else len(body)]
        wrapped = ("" if start_anchor else ".*") + "(?:" + body + ")" + ("" if end_anchor else ".*")
        try:
            self.fsm = interegular.parse_pattern(wrapped).to_fsm()
        except Exception as e:  # interegular's own errors: unsupported or malformed syntax
            raise RegexError(f"pattern {pattern!r} is not supported: {e}") from None
        self.pattern = pattern
        self.start = self.fsm.initial
        self.dist = self._distances()

    def _distances(self) -> dict:
        """Per state, the fewest characters that still lead to a match (BFS over the reversed transitions): a
        string with a maxLength may only go where its pattern can still be met in what is left."""
        back: dict = {}
        for s, moves in self.fsm.map.items():
            for t in moves.values():
                back.setdefault(t, set()).add(s)
        dist = {s: 0 for s in self.fsm.finals}
        todo = deque(self.fsm.finals)
        while todo:
            t = todo.popleft()
            for s in back.get(t, ()):
                if s not in dist:
                    dist[s] = dist[t] + 1
                    todo.append(s)
        return dist

    def step(self, state: int, c: str) -> int | None:
        """The state after `c`, or None where no match can follow."""
        nxt = self.fsm.map.get(state, {}).get(self.fsm.alphabet[c])
        return nxt if nxt is not None and nxt in self.dist else None

    def accepts(self, state: int) -> bool:
        return state in self.fsm.finals

    def chars_to_match(self, state: int) -> float:
        return self.dist.get(state, float("inf"))

    def matches(self, text: str) -> bool:
        s: int | None = self.start
        for c in text:
            s = self.step(s, c)
            if s is None:
                return False
        return self.accepts(s)


def integer_range(lo: int | None, hi: int | None, max_digits: int = 24) -> str:
    """An anchored pattern of the JSON integers in [lo, hi] (None: unbounded on that side, up to max_digits
    digits): no leading zeros, no "-0"."""
    if lo is not None and hi is not None and lo > hi:
        raise RegexError(f"no integer lies in [{lo}, {hi}]")
    alts = []
    if hi is None or hi >= 0:  # the non-negative part
        alts.append(_uint_range(max(lo, 0) if lo is not None else 0, hi, max_digits))
    if lo is None or lo < 0:  # the negative part: "-" and a magnitude in [max(1, -hi), -lo]
        alts.append("-" + _uint_range(max(1, -hi) if hi is not None else 1, -lo if lo is not None else None,
                                      max_digits))
    return "^(?:" + "|".join(alts) + ")$"


def _uint_range(a: int, b: int | None, max_digits: int) -> str:
    """The decimal numbers in [a, b] (b None: any larger, up to max_digits digits), without leading zeros. The
    lengths strictly between a's and b's are one class each way (interegular's parser slows down sharply with many
    alternatives)."""
    sa = str(a)
    sb = str(b) if b is not None else None
    if sb is not None and len(sb) == len(sa):
        return "(?:" + _same_length(sa, sb) + ")"
    parts = [_same_length(sa, "9" * len(sa))]
    longest = len(sb) - 1 if sb is not None else max_digits  # the lengths taken whole
    if longest > len(sa):  # numbers of len(sa)+1 .. longest digits: any
        parts.append(r"[1-9]\d" + f"{{{len(sa)},{longest - 1}}}")
    if sb is not None:
        parts.append(_same_length("1" + "0" * (len(sb) - 1), sb))
    return "(?:" + "|".join(parts) + ")"


def _same_length(lo: str, hi: str) -> str:
    """The numbers of lo's length from lo to hi, digit by digit."""
    if lo == hi:
        return lo
    if len(lo) == 1:
        return f"[{lo}-{hi}]"
    if lo[0] == hi[0]:
        return lo[0] + "(?:" + _same_length(lo[1:], hi[1:]) + ")"
    rest = len(lo) - 1
    parts = [lo[0] + "(?:" + _same_length(lo[1:], "9" * rest) + ")"]
    if int(hi[0]) - int(lo[0]) > 1:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}]" + r"\d" + f"{{{rest}}}")
    parts.append(hi[0] + "(?:" + _same_length("0" * rest, hi[1:]) + ")")
    return "(?:" + "|".join(parts) + ")"

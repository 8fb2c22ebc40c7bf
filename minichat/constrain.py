"""Constrained decoding: the output must be JSON, optionally of a given JSON Schema (OpenAI's `response_format`).

The engine stays on token ids: a request may carry a grammar (`SamplingParams.grammar`), and at each step the
engine asks its state which token ids may come next, masks the others and tells the state which one it took.

    vocab = TokenVocab(tokenizer)                    # each token's text, once per tokenizer (~1 s for 49k tokens)
    g = JSONGrammar(vocab)                           # any JSON object ({"type": "json_object"})
    g = JSONGrammar(vocab, schema={...})             # a JSON Schema ({"type": "json_schema"})
    state = g.start(); state.allowed() -> (V,) bool; state.advance(token_id); state.can_end; state.finished

How. A character-level pushdown recogniser of JSON, extended by the schema (which keys an object may still take,
which type a value must have, enums, nested objects and arrays, `$ref`, `anyOf`). A parser state is a set of
alternatives (a schema's `anyOf` can leave several open), so states are hashable and their masks are cached.
The mask of a state is found by walking the token texts in sorted order, reusing the parse of the prefix shared
with the previous token and skipping every token that starts with a prefix already rejected: a walk over a trie
of the vocabulary, without building one. Inside a string most tokens are plain text, which leaves the state as
it was; those are one precomputed mask, and only tokens with a quote, a backslash or a control character are
walked. Whitespace between JSON tokens is a newline and an indent of at most MAX_WS characters (as in llama.cpp's
JSON grammar), none before the root value, a number has at most MAX_NUMBER characters, a free value nests at most
MAX_DEPTH deep, and no key comes twice in one object (each request's GrammarState reads the keys from its own
output, beside the shared states: see _Keys): a small model that cannot say what it wants must not pad, count,
nest or repeat a key forever.

Supported schema keywords: type (one or a list), properties, required, additionalProperties (true, false or a
schema; when absent, an object with properties takes no other keys and one without takes any), items, minItems,
maxItems, minLength, maxLength, pattern (regex_fsm.py, through interegular: a string under a pattern takes no
escapes), format (date and date-time with the real calendar, time, uuid, email, ipv4, hostname), enum, const,
anyOf / oneOf, $ref to #/$defs or #/definitions (recursion allowed), and minimum, maximum, exclusiveMinimum and
exclusiveMaximum: an integer's digits follow an automaton of its range; a number's digits are kept while some
completion still fits (exact decimal arithmetic, no exponent) and it ends only within its bounds. Other keywords
(description, title, other formats, multipleOf, ...) are accepted and not enforced. The root must be an object
or an array, so the end of the value is known without the end of the output.
"""
from __future__ import annotations

import bisect
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from minichat.errors import MinichatError
from minichat.regex_fsm import FORMATS, Regex, RegexError, integer_range

MAX_WS = 20  # whitespace between JSON tokens: one newline at most, first, then up to MAX_WS spaces or tabs
MAX_NUMBER = 24  # characters of one number (a model must not write digits forever)
MAX_DEPTH = 10  # arrays and objects a free value may open inside each other (OpenAI's structured outputs allow 10)
DIGITS = "0123456789"
HEX = "0123456789abcdefABCDEF"
_LAST = "\U0010ffff"  # sorts after every character: prefix + _LAST bounds all texts with that prefix

# parser modes (the first field of a state)
VAL, OBJ0, KEY, COLON, ARR0, AFTER, STR, KSTR, ESC, UHEX, NUM, LIT, ENUM, DONE, PRE, POST, NUMRE, NUMB = range(18)


class SchemaError(MinichatError):
    """A JSON Schema this grammar cannot follow (or not a schema at all)."""


@dataclass(frozen=True)
class _Node:
    kind: str  # any | object | array | string | number | integer | boolean | null | enum | anyof
    props: tuple = ()  # object: ((key, node id), ...)
    required: frozenset = frozenset()
    extra: int | None = None  # object: node id of the values of keys not among props (None: no such keys)
    items: int = 0  # array: node id of the items
    min_items: int = 0
    max_items: int | None = None
    literals: tuple = ()  # enum: the values as compact JSON texts
    alts: tuple = ()  # anyof: node ids
    lengths: tuple | None = None  # string: (minLength, maxLength or None) in characters (an escape counts one)
    pattern: int | None = None  # string: index of its Regex (pattern, or a known format) in the grammar's list
    bounds: tuple | None = None  # number: (minimum, exclusive?, maximum, exclusive?) as Fractions (None: no bound)


class _Compiler:
    """JSON Schema -> a table of _Node (ids are indices; `$ref` cycles point back by id)."""

    TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

    def __init__(self, root_schema: Any):
        self.root = root_schema
        self.nodes: list[_Node | None] = []
        self.regexes: list = []  # regex_fsm.Regex per pattern / format string node
        self.by_ref: dict[str, int] = {}

    def add(self, node: _Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def compile(self, s: Any, path: str = "#") -> int:
        if s is True or s == {}:
            return self.add(_Node("any"))
        if not isinstance(s, dict):
            raise SchemaError(f"{path}: a schema must be an object, got {type(s).__name__}")
        if "$ref" in s:
            return self.ref(s["$ref"], path)
        if "const" in s:
            return self.add(_Node("enum", literals=(self.literal(s["const"]),)))
        if "enum" in s:
            vals = s["enum"]
            if not isinstance(vals, list) or not vals:
                raise SchemaError(f"{path}.enum must be a non-empty list")
            return self.add(_Node("enum", literals=tuple(dict.fromkeys(self.literal(v) for v in vals))))
        for key in ("anyOf", "oneOf"):
            if key in s:
                subs = s[key]
                if not isinstance(subs, list) or not subs:
                    raise SchemaError(f"{path}.{key} must be a non-empty list")
                base = {k: v for k, v in s.items() if k != key}
                alts = tuple(self.compile({**base, **sub} if isinstance(sub, dict) else sub, f"{path}.{key}[{i}]")
                             for i, sub in enumerate(subs))
                return self.add(_Node("anyof", alts=alts))
        t = s.get("type")
        if isinstance(t, list):
            if not t:
                raise SchemaError(f"{path}.type must not be an empty list")
            alts = tuple(self.compile({**s, "type": x}, f"{path}.type[{i}]") for i, x in enumerate(t))
            return alts[0] if len(alts) == 1 else self.add(_Node("anyof", alts=alts))
        if t is None:
            if "properties" in s:
                t = "object"
            elif "items" in s:
                t = "array"
            else:
                return self.add(_Node("any"))
        if t not in self.TYPES:
            raise SchemaError(f"{path}.type: unknown type {t!r} (expected one of {', '.join(self.TYPES)})")
        if t == "object":
            props = s.get("properties") or {}
            if not isinstance(props, dict):
                raise SchemaError(f"{path}.properties must be an object")
            required = s.get("required") or []
            if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
                raise SchemaError(f"{path}.required must be a list of property names")
            missing = [k for k in required if k not in props]
            if missing and props:
                raise SchemaError(f"{path}.required names {missing[0]!r}, which is not among the properties")
            # keys not among the properties: allowed when additionalProperties is true or a schema, and in an
            # object that lists no properties unless it is false. Absent next to properties, none are allowed
            # (as llama.cpp's schema grammars do): a small model left free invents keys until max_tokens
            ap = s.get("additionalProperties")
            if ap is not None and ap is not True and ap is not False and not isinstance(ap, dict):
                raise SchemaError(f"{path}.additionalProperties must be true, false or a schema")
            i = self.add(None)  # placeholder: properties may refer back to this node through $ref
            if ap is False or (ap is None and props):
                extra = None
            else:
                extra = self.compile(True if ap is None else ap, f"{path}.additionalProperties")
            if not props and extra is None:  # no key at all: only {}
                self.nodes[i] = _Node("enum", literals=("{}",))
                return i
            self.nodes[i] = _Node("object", props=tuple((k, self.compile(v, f"{path}.properties.{k}"))
                                                        for k, v in props.items()),
                                  required=frozenset(required), extra=extra)
            return i
        if t == "array":
            lo, hi = s.get("minItems", 0), s.get("maxItems")
            if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
                raise SchemaError(f"{path}: minItems / maxItems must be integers with 0 <= minItems <= maxItems")
            i = self.add(None)
            self.nodes[i] = _Node("array", items=self.compile(s.get("items", True), f"{path}.items"),
                                  min_items=lo, max_items=hi)
            return i
        if t == "string":
            lengths = None
            if "minLength" in s or "maxLength" in s:
                lo, hi = s.get("minLength", 0), s.get("maxLength")
                if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
                    raise SchemaError(f"{path}: minLength / maxLength must be integers with 0 <= minLength <= "
                                      "maxLength")
                lengths = (lo, hi)
            pattern = None
            # a pattern, or else a format whose shape is known (date, time, date-time, uuid, email, ipv4, hostname);
            # other formats are not enforced
            text = s.get("pattern", FORMATS.get(s.get("format")) if isinstance(s.get("format"), str) else None)
            if text is not None:
                try:
                    self.regexes.append(Regex(text))
                except RegexError as e:
                    raise SchemaError(f"{path}.pattern: {e}") from None
                pattern = len(self.regexes) - 1
            if lengths is None and pattern is None:
                return self.add(_Node("string"))
            return self.add(_Node("string", lengths=lengths, pattern=pattern))
        bounds = [k for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in s]
        if t == "integer" and bounds:  # a range of integers as an automaton over its digits
            for k in bounds:
                if isinstance(s[k], bool) or not isinstance(s[k], (int, float)):
                    raise SchemaError(f"{path}.{k} must be a number")
            # the smallest and largest integers the bounds allow
            lows = [math.ceil(s[k]) for k in bounds if k == "minimum"] + \
                [math.floor(s[k]) + 1 for k in bounds if k == "exclusiveMinimum"]
            highs = [math.floor(s[k]) for k in bounds if k == "maximum"] + \
                [math.ceil(s[k]) - 1 for k in bounds if k == "exclusiveMaximum"]
            lo, hi = (max(lows) if lows else None), (min(highs) if highs else None)
            try:
                self.regexes.append(Regex(integer_range(lo, hi, MAX_NUMBER)))
            except RegexError as e:
                raise SchemaError(f"{path}: {e}") from None
            return self.add(_Node("integer", pattern=len(self.regexes) - 1))
        if t == "number" and bounds:  # a range of decimals: each prefix is kept while some completion fits
            from fractions import Fraction

            lo = hi = None
            lo_ex = hi_ex = False
            for k in bounds:
                v = s[k]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise SchemaError(f"{path}.{k} must be a finite number")
                f = Fraction(repr(v)) if isinstance(v, float) else Fraction(v)  # 0.1 as written, not its binary
                if k in ("minimum", "exclusiveMinimum") and (lo is None or f > lo or (f == lo and k[0] == "e")):
                    lo, lo_ex = f, k[0] == "e"
                if k in ("maximum", "exclusiveMaximum") and (hi is None or f < hi or (f == hi and k[0] == "e")):
                    hi, hi_ex = f, k[0] == "e"
            b = (lo, lo_ex, hi, hi_ex)
            if not (_number_fits(b, True, "", None, MAX_NUMBER - 1)
                    or any(_number_fits(b, False, d, None, MAX_NUMBER - 1) for d in DIGITS)):
                raise SchemaError(f"{path}: no number of at most {MAX_NUMBER} characters is within its bounds")
            return self.add(_Node("number", bounds=b))
        return self.add(_Node(t))

    def ref(self, ref: Any, path: str) -> int:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"{path}.$ref: only references inside the schema (#/...) are supported, got {ref!r}")
        if ref in self.by_ref:
            return self.by_ref[ref]
        target: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"{path}.$ref {ref!r} points at nothing")
            target = target[part]
        # an alternative of one: the id exists before its body, so the target may refer to itself
        i = self.add(None)
        self.by_ref[ref] = i
        self.nodes[i] = _Node("anyof", alts=(self.compile(target, ref),))
        return i

    @staticmethod
    def literal(v: Any) -> str:
        try:
            return json.dumps(v, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise SchemaError(f"enum / const value {v!r} is not JSON: {e}") from None


def _number_grids(ip: str, fp: str | None, left: int) -> list[tuple]:
    """The magnitudes a decimal can still reach from its digits so far (ip before the point, fp after it, or None
    before any point) with `left` more characters and no exponent: evenly spaced values, as (first, last, step)."""
    from fractions import Fraction

    if fp is not None:
        if fp == "" and left == 0:
            return []
        step = Fraction(1, 10 ** (len(fp) + left))
        a = int(ip) + Fraction(int(fp or "0"), 10 ** len(fp))
        return [(a, a + (10 ** left - 1) * step, step)]

    def after_int(lo: int, hi: int, frac: int) -> tuple:  # integers lo..hi-1, then a point and frac digits
        if frac >= 1:
            step = Fraction(1, 10 ** frac)
            return (Fraction(lo), hi - step, step)
        return (Fraction(lo), Fraction(hi - 1), Fraction(1))

    if ip == "":  # after a minus: the first digit is still to come
        if left == 0:
            return []
        out = [after_int(0, 1, left - 2)]  # "0" (then maybe ".ddd")
        out += [after_int(10 ** k, 10 ** (k + 1), left - 2 - k) for k in range(left)]  # 1-9 and k more digits
        return out
    if ip == "0":
        return [after_int(0, 1, left - 1)]
    p = int(ip)
    return [after_int(p * 10 ** k, (p + 1) * 10 ** k, left - 1 - k) for k in range(left + 1)]


def _number_fits(bounds: tuple, neg: bool, ip: str, fp: str | None, left: int) -> bool:
    """Whether some completion of the decimal so far lies within bounds = (lo, lo exclusive, hi, hi exclusive)."""
    lo, lo_ex, hi, hi_ex = bounds
    for a, b, g in _number_grids(ip, fp, left):
        if neg:
            a, b = -b, -a
        jmin, jmax = 0, (b - a) / g
        if lo is not None:
            t = (lo - a) / g
            jmin = max(jmin, math.ceil(t) + (1 if lo_ex and t == math.ceil(t) else 0))
        if hi is not None:
            t = (hi - a) / g
            jmax = min(jmax, math.floor(t) - (1 if hi_ex and t == math.floor(t) else 0))
        if jmin <= jmax:
            return True
    return False


def _number_within(bounds: tuple, neg: bool, ip: str, fp: str | None) -> bool:
    from fractions import Fraction

    v = int(ip) + (Fraction(int(fp), 10 ** len(fp)) if fp else 0)
    v = -v if neg else v
    lo, lo_ex, hi, hi_ex = bounds
    return (lo is None or v > lo or (v == lo and not lo_ex)) and (hi is None or v < hi or (v == hi and not hi_ex))


class TokenVocab:
    """Each token's text, sorted for the prefix walk; built once per tokenizer (grammars share it)."""

    def __init__(self, tokenizer, vocab_size: int | None = None):
        import numpy as np

        n = vocab_size or tokenizer.vocab_size
        special = set(tokenizer.special_ids)
        self.size = n
        self.text: list[str | None] = [None] * n
        for i in range(min(n, tokenizer.vocab_size)):
            if i in special:
                continue
            t = tokenizer.decode([i])
            # a token that is part of a UTF-8 character decodes to U+FFFD: it never joins a constrained output
            if t and "\ufffd" not in t:
                self.text[i] = t
        pairs = sorted((t, i) for i, t in enumerate(self.text) if t is not None)
        self.sorted_text = [t for t, _ in pairs]
        self.sorted_ids = [i for _, i in pairs]
        # inside a string: tokens of plain characters leave the parser where it was
        plain = [i for t, i in pairs if all(c not in '"\\' and c >= " " for c in t)]
        special_pairs = [(t, i) for t, i in pairs if not all(c not in '"\\' and c >= " " for c in t)]
        self.plain_ids = plain
        self.plain_len = np.array([len(t) if t is not None else 0 for t in self.text])  # characters per token
        self.special_text = [t for t, _ in special_pairs]
        self.special_ids_sorted = [i for _, i in special_pairs]
        self.two_quote_ids = [i for t, i in special_pairs if t.count('"') >= 2]  # may hold a whole key


class JSONGrammar:
    """Token masks that keep an output a JSON value (an object by default) of an optional schema."""

    def __init__(self, vocab: TokenVocab, schema: dict | None = None, cache_size: int = 2048, prefix: str = "",
                 suffix: str = "", repeat: str | None = None):
        """prefix / suffix: fixed text before and after the value (a tool call's <tool_call> tags); repeat: after
        a complete value (and its suffix) the output may end, or go on with this separator and another
        prefix + value + suffix (several tool calls in one reply)."""
        import numpy as np

        self.vocab = vocab
        comp = _Compiler(schema)
        self.any = comp.add(_Node("any"))
        self.free_obj = comp.add(_Node("object", extra=self.any))  # what an untyped "{" opens
        root = self.free_obj if schema is None else comp.compile(schema)
        self.nodes: list[_Node] = comp.nodes  # type: ignore[assignment]
        self.free_arr = comp.add(_Node("array", items=self.any))
        self.root = root
        self.regexes = comp.regexes
        starts = self._value_starts(root)
        if not starts or not starts <= {"{", "["}:
            raise SchemaError("the schema's root must be an object or an array (so the value's end is known)")
        self.prefix, self.suffix, self.repeat = prefix, suffix, repeat
        self.initial = frozenset([(PRE, prefix, root, ()) if prefix else (VAL, root, 0, ())])
        self._masks: OrderedDict = OrderedDict()
        self._hot: dict = {}
        self._empty: set = set()  # states whose mask allows no token
        self._steps: dict = {}
        self._cache_size = cache_size
        self._plain = np.zeros(vocab.size, dtype=bool)
        self._plain[vocab.plain_ids] = True

    def start(self) -> "GrammarState":
        return GrammarState(self)

    # ------------------------------------------------------------------ the recogniser
    def _value_starts(self, node: int, seen: frozenset = frozenset()) -> set[str]:
        n = self.nodes[node]
        if n.kind == "anyof":
            if node in seen:
                return set()
            return set().union(*(self._value_starts(a, seen | {node}) for a in n.alts))
        return {"object": {"{"}, "array": {"["}, "string": {'"'}, "boolean": {"t", "f"}, "null": {"n"},
                "number": {"-"} | set(DIGITS), "integer": {"-"} | set(DIGITS),
                "enum": {lit[0] for lit in n.literals},
                "any": {"{", "[", '"', "t", "f", "n", "-"} | set(DIGITS)}[n.kind]

    def step_set(self, states: frozenset, c: str) -> frozenset:
        key = (states, c)
        out = self._steps.get(key)
        if out is None:
            res: list = []
            for s in states:
                res.extend(self._step(s, c))
            out = frozenset(res)
            if len(self._steps) > 50_000:
                self._steps.clear()
            self._steps[key] = out
        return out

    def _complete(self, stack: tuple) -> tuple:
        """A value has ended: back to its container, or done at the root (after the suffix, if any)."""
        if stack:
            return (AFTER, None, 0, stack)
        if self.suffix:
            return (POST, self.suffix, 0, ())
        assert self.repeat is None, "repeat needs a suffix (the end of one value must be text)"
        return (DONE, None, 0, ())

    def _finish_value(self) -> list:
        """After a value's suffix: done, or (repeat) also the start of the next one."""
        done = (DONE, None, 0, ())
        if self.repeat is None:
            return [done]
        return [done, (PRE, self.repeat + self.prefix, self.root, ())]

    def _start_value(self, node: int, c: str, stack: tuple) -> list:
        n = self.nodes[node]
        k = n.kind
        if k == "anyof":
            out = []
            for a in n.alts:
                out.extend(self._start_value(a, c, stack))
            return out
        if k == "any":
            if c in "{[" and len(stack) >= MAX_DEPTH:
                return []
            if c == "{":
                return [(OBJ0, None, 0, stack + (("o", self.free_obj, frozenset(), self.any),))]
            if c == "[":
                return [(ARR0, None, 0, stack + (("a", self.free_arr, 0),))]
            if c == '"':
                return [(STR, None, 0, stack)]
            if c == "-" or c in DIGITS:
                return [self._num_start(c, False, stack)]
            lit = {"t": "rue", "f": "alse", "n": "ull"}.get(c)
            return [(LIT, lit, 0, stack)] if lit else []
        if k == "object":
            # the frame: ("o", node, keys used, the node of the value after the next colon)
            # an object without properties takes any key, so each value follows its additionalProperties
            return [(OBJ0, None, 0, stack + (("o", node, frozenset(), self.any if n.props else n.extra),))] \
                if c == "{" else []
        if k == "array":
            return [(ARR0, None, 0, stack + (("a", node, 0),))] if c == "[" else []
        if k == "string":
            if c != '"':
                return []
            if n.pattern is not None:  # a = ("re", regex index, its automaton's state, lengths)
                return [(STR, ("re", n.pattern, self.regexes[n.pattern].start, n.lengths), 0, stack)]
            return [(STR, n.lengths, 0, stack)]
        if k == "integer" and n.pattern is not None:  # (NUMRE, regex index, its automaton's state, stack)
            st = self.regexes[n.pattern].step(self.regexes[n.pattern].start, c)
            return [(NUMRE, n.pattern, st, stack)] if st is not None else []
        if k == "number" and n.bounds is not None:  # (NUMB, node, (negative?, digits, fraction digits, n), stack)
            if c == "-" or c in DIGITS:
                neg, ip = c == "-", "" if c == "-" else c
                if _number_fits(n.bounds, neg, ip, None, MAX_NUMBER - 1):
                    return [(NUMB, node, (neg, ip, None, 1), stack)]
            return []
        if k in ("number", "integer"):
            return [self._num_start(c, k == "integer", stack)] if (c == "-" or c in DIGITS) else []
        if k == "boolean":
            lit = {"t": "rue", "f": "alse"}.get(c)
            return [(LIT, lit, 0, stack)] if lit else []
        if k == "null":
            return [(LIT, "ull", 0, stack)] if c == "n" else []
        if k == "enum":
            cands = tuple(x for x in n.literals if x[0] == c)
            return self._enum_after(cands, 1, stack) if cands else []
        raise AssertionError(k)

    def _enum_after(self, cands: tuple, pos: int, stack: tuple) -> list:
        longer = tuple(x for x in cands if len(x) > pos)
        out = [(ENUM, longer, pos, stack)] if longer else []
        if len(longer) < len(cands):  # one literal is complete: the value may end here
            out.append(self._complete(stack))
        return out

    @staticmethod
    def _num_start(c: str, integer: bool, stack: tuple) -> tuple:
        return (NUM, integer, ("minus" if c == "-" else ("zero" if c == "0" else "int"), 1), stack)

    def _keys_left(self, frame: tuple) -> list[str]:
        n = self.nodes[frame[1]]
        return [k for k, _ in n.props if k not in frame[2]]

    def _key_start(self, frame: tuple, stack: tuple) -> list:
        n = self.nodes[frame[1]]
        if not n.props:  # any key: its text is not tracked
            return [(STR, "key", 0, stack)]
        return [(KSTR, "", 0, stack)] if (n.extra is not None or self._keys_left(frame)) else []

    def _extra_key_done(self, stack: tuple) -> tuple:
        """A key not among the properties has ended: its value follows the object's additionalProperties."""
        f = stack[-1]
        return (COLON, None, 0, stack[:-1] + (("o", f[1], f[2], self.nodes[f[1]].extra),))

    def _step(self, s: tuple, c: str) -> list:
        mode, a, b, stack = s
        if mode == STR:  # a: "key" (an object's free key), None (a value) or (min, max) length; b: length so far
            if isinstance(a, tuple) and a[0] == "re":  # under a pattern: no escapes (the automaton reads characters)
                _, rid, st, lengths = a
                if c == '"':
                    ok = self.regexes[rid].accepts(st) and (lengths is None or b >= lengths[0])
                    return [self._complete(stack)] if ok else []
                if c == "\\" or c < " " or (lengths is not None and lengths[1] is not None and b >= lengths[1]):
                    return []
                rx = self.regexes[rid]
                st = rx.step(st, c)
                if st is None or (lengths is not None and lengths[1] is not None
                                  and rx.chars_to_match(st) > lengths[1] - b - 1):  # the match must fit maxLength
                    return []
                return [(STR, ("re", rid, st, lengths), b + 1 if lengths is not None else 0, stack)]
            bounded = isinstance(a, tuple)
            if c == '"':
                if a == "key":
                    return [(COLON, None, 0, stack)]
                if a == "xkey":
                    return [self._extra_key_done(stack)]
                return [self._complete(stack)] if not bounded or b >= a[0] else []
            if bounded and a[1] is not None and b >= a[1]:
                return []
            if c == "\\":
                return [(ESC, a, b, stack)]
            if c < " ":
                return []
            return [(STR, a, b + 1, stack)] if bounded else [s]
        if mode == ESC:
            nxt = b + 1 if isinstance(a, tuple) else 0
            if c in '"\\/bfnrt':
                return [(STR, a, nxt, stack)]
            return [(UHEX, a, (4, nxt), stack)] if c == "u" else []
        if mode == UHEX:
            if c not in HEX:
                return []
            left, nxt = b
            return [(STR, a, nxt, stack)] if left == 1 else [(UHEX, a, (left - 1, nxt), stack)]
        if mode == KSTR:  # a key of a schema's object, while it is a prefix of one of its properties
            frame = stack[-1]
            n = self.nodes[frame[1]]
            left = self._keys_left(frame)
            if c == '"':
                if a in left:
                    node = dict(n.props)[a]
                    return [(COLON, None, 0, stack[:-1] + (("o", frame[1], frame[2] | {a}, node),))]
                # another key, if the object takes them; a property used already may not come twice
                return [self._extra_key_done(stack)] if n.extra is not None and a not in dict(n.props) else []
            if c < " ":
                return []
            if c == "\\":  # no property is matched with escapes: only another key can have one
                return [(ESC, "xkey", 0, stack)] if n.extra is not None else []
            key = a + c
            if any(k.startswith(key) for k in left):
                return [(KSTR, key, 0, stack)]
            if n.extra is None:
                return []
            # tracked while it could still become a used property (a duplicate), then a free key
            return [(KSTR, key, 0, stack)] if any(k.startswith(key) for k, _ in n.props) else [(STR, "xkey", 0, stack)]
        if mode == NUM:
            integer, (sub, n) = a, b
            nxt = None
            if c in DIGITS:
                nxt = {"minus": "zero" if c == "0" else "int", "zero": None, "int": "int", "dot": "frac",
                       "frac": "frac", "e": "exp", "esign": "exp", "exp": "exp"}[sub]
            elif c == "." and sub in ("zero", "int") and not integer:
                nxt = "dot"
            elif c in "eE" and sub in ("zero", "int", "frac") and not integer:
                nxt = "e"
            elif c in "+-" and sub == "e":
                nxt = "esign"
            if nxt is not None:
                return [(NUM, integer, (nxt, n + 1), stack)] if n < MAX_NUMBER else []
            if sub in ("zero", "int", "frac", "exp"):  # the number ended before this character
                return self._step(self._complete(stack), c)
            return []
        if mode == NUMB:  # a number within bounds: digits and a point while some completion still fits
            bounds = self.nodes[a].bounds
            neg, ip, fp, n = b
            nxt = None
            if c in DIGITS and n < MAX_NUMBER:
                if fp is not None:
                    nxt = (neg, ip, fp + c, n + 1)
                elif ip != "0":
                    nxt = (neg, ip + c, None, n + 1)
            elif c == "." and fp is None and ip != "" and n < MAX_NUMBER:
                nxt = (neg, ip, "", n + 1)
            if nxt is not None:
                return [(NUMB, a, nxt, stack)] if _number_fits(bounds, *nxt[:3], MAX_NUMBER - nxt[3]) else []
            # the number ended before this character: if it is complete and within its bounds
            if ip != "" and fp != "" and _number_within(bounds, neg, ip, fp):
                return self._step(self._complete(stack), c)
            return []
        if mode == NUMRE:  # an integer in a range: its digits follow the automaton
            rx = self.regexes[a]
            if c == "-" or c in DIGITS:
                st = rx.step(b, c)
                if st is not None:
                    return [(NUMRE, a, st, stack)]
            # the number ended before this character, if it is complete
            return self._step(self._complete(stack), c) if rx.accepts(b) else []
        if mode == LIT:
            if c != a[0]:
                return []
            return [(LIT, a[1:], 0, stack)] if len(a) > 1 else [self._complete(stack)]
        if mode == ENUM:
            out = []
            cands = tuple(x for x in a if x[b] == c)
            if cands:
                out = self._enum_after(cands, b + 1, stack)
            return out
        if mode == DONE:
            return []
        if mode == PRE:  # a = the prefix still to come, b = the root node
            if c != a[0]:
                return []
            return [(PRE, a[1:], b, stack)] if len(a) > 1 else [(VAL, b, 0, ())]
        if mode == POST:
            if c != a[0]:
                return []
            return [(POST, a[1:], 0, stack)] if len(a) > 1 else self._finish_value()
        # the modes between tokens take whitespace, as llama.cpp's JSON grammar does: a newline, then an indent
        # (not before the root: the output starts with its value)
        if c == "\n" or c == " " or c == "\t":
            ok = (b == 0) if c == "\n" else (b <= MAX_WS)
            return [(mode, a, b + 1, stack)] if ok and (stack or mode != VAL) else []
        if mode == VAL:
            return self._start_value(a, c, stack)
        frame = stack[-1] if stack else None
        if mode == OBJ0:
            if c == '"':
                return self._key_start(frame, stack)
            if c == "}" and self.nodes[frame[1]].required <= frame[2]:
                return [self._complete(stack[:-1])]
            return []
        if mode == KEY:
            return self._key_start(frame, stack) if c == '"' else []
        if mode == COLON:
            return [(VAL, frame[3], 0, stack)] if c == ":" else []
        if mode == ARR0:
            n = self.nodes[frame[1]]
            if c == "]" and n.min_items == 0:
                return [self._complete(stack[:-1])]
            if n.max_items == 0:
                return []
            return self._start_value(n.items, c, stack[:-1] + (("a", frame[1], 1),))
        if mode == AFTER:
            n = self.nodes[frame[1]]
            if frame[0] == "a":
                if c == "," and (n.max_items is None or frame[2] < n.max_items):
                    return [(VAL, n.items, 0, stack[:-1] + (("a", frame[1], frame[2] + 1),))]
                if c == "]" and frame[2] >= n.min_items:
                    return [self._complete(stack[:-1])]
                return []
            if c == ",":
                return [(KEY, None, 0, stack)] if (n.extra is not None or self._keys_left(frame)) else []
            if c == "}" and n.required <= frame[2]:
                return [self._complete(stack[:-1])]
            return []
        raise AssertionError(mode)

    # ------------------------------------------------------------------ masks
    def mask(self, states: frozenset):
        """(vocab.size,) bool tensor: the tokens whose whole text the parser accepts from `states`."""
        return ~self.rejected(states)

    def rejected(self, states: frozenset):
        """(vocab.size,) bool tensor: True where the parser rejects the token (what the engine masks). Cached per
        state as packed bits (6 KB for a 49k vocabulary, against 48 KB as bools), the last 64 used also
        unpacked. The tensor is shared: do not write to it."""
        import numpy as np
        import torch

        hot = self._hot.get(states)
        if hot is not None:
            return hot
        packed = self._masks.get(states)
        if packed is not None:
            self._masks.move_to_end(states)
        else:
            v = self.vocab
            only = next(iter(states)) if len(states) == 1 else None
            if only is not None and only[0] == STR and not (isinstance(only[1], tuple) and only[1][0] == "re"):
                # plain tokens keep a string a string; a bounded one takes those that fit in what is left
                m = self._plain.copy()
                a, b = only[1], only[2]
                if isinstance(a, tuple) and a[1] is not None:
                    m &= v.plain_len <= a[1] - b
                ids = self._walk(states, v.special_text, v.special_ids_sorted)
            else:
                m = np.zeros(v.size, dtype=bool)
                ids = self._walk(states, v.sorted_text, v.sorted_ids)
            m[ids] = True
            if not m.any():
                self._empty.add(states)
            packed = np.packbits(~m)
            self._masks[states] = packed
            if len(self._masks) > self._cache_size:
                self._masks.popitem(last=False)
        hot = torch.from_numpy(np.unpackbits(packed, count=self.vocab.size).view(bool))
        self._hot[states] = hot  # the few states a running request is in most, unpacked
        if len(self._hot) > 64:
            self._hot.pop(next(iter(self._hot)))
        return hot

    def allows_nothing(self, states: frozenset) -> bool:
        self.rejected(states)
        return not states or states in self._empty

    def _walk(self, start: frozenset, texts: list[str], ids: list[int]) -> list[int]:
        out: list[int] = []
        n = len(texts)
        i = 0
        prev = ""  # the text whose prefix states are in `at`
        at = [start]  # at[k]: the states after prev[:k]
        while i < n:
            t = texts[i]
            k, m = 0, min(len(prev), len(t))
            while k < m and prev[k] == t[k]:
                k += 1
            del at[k + 1:]
            s = at[k]
            j = k
            while j < len(t):
                s = self.step_set(s, t[j])
                if not s:
                    break
                at.append(s)
                j += 1
            if j == len(t):
                out.append(ids[i])
                prev = t
                i += 1
            else:  # t[:j + 1] is rejected: so is every token that starts with it
                i = bisect.bisect_left(texts, t[:j + 1] + _LAST, i + 1)
                prev = t[:j]
        return out


class _Keys:
    """The keys each open object has used, read from the output's characters beside the grammar's states (which
    leave a free key's text out, so that their masks stay shared): a key may not come twice in one object.
    JSON allows it, but a parser keeps only one of the values, and a small model repeats a key forever
    ("label": ..., "label": ...) where a used one is refused."""

    def __init__(self):
        self.stack: list = []  # per open container: a set of used keys (an object) or None (an array)
        self.expect_key = False  # the next string in this object is a key
        self.string: str | None = None  # the raw text of the key being written, "" while in a value string
        self.in_key = False
        self.esc = 0  # -1 right after a backslash, then the hex digits of \uXXXX still to come

    def copy(self) -> "_Keys":
        k = _Keys.__new__(_Keys)
        k.__dict__.update(self.__dict__)
        k.stack = [None if x is None else set(x) for x in self.stack]
        return k

    def feed(self, text: str) -> bool:
        """Read the output's next characters; True if they completed a key its object had used."""
        repeated = False
        for c in text:
            if self.string is not None:
                if self.esc == -1:  # the character after a backslash
                    self.esc = 4 if c == "u" else 0
                elif self.esc:  # a hex digit of \uXXXX
                    self.esc -= 1
                elif c == "\\":
                    self.esc = -1
                elif c == '"':
                    if self.in_key and self.stack and self.stack[-1] is not None:
                        repeated |= self.string in self.stack[-1]
                        self.stack[-1].add(self.string)
                    self.string, self.in_key = None, False
                    continue
                if self.in_key:
                    self.string += c
            elif c == '"':
                self.in_key = self.expect_key
                self.string, self.expect_key = "", False
            elif c in "{[":
                self.stack.append(set() if c == "{" else None)
                self.expect_key = c == "{"
            elif c in "}]":
                if self.stack:
                    self.stack.pop()
                self.expect_key = False
            elif c == ",":
                self.expect_key = bool(self.stack) and self.stack[-1] is not None
        return repeated

    def closing_used(self) -> list[str]:
        """Texts a token may not start with now: the rest of a used key of this object, then its closing quote."""
        if not self.in_key or self.esc or not self.stack or not self.stack[-1]:
            return []
        t = self.string
        return [u[len(t):] + '"' for u in self.stack[-1] if u.startswith(t)]

    def may_repeat(self) -> bool:
        """Outside a value's string, in an object that has used a key: a token with two quotes could name it."""
        return bool(self.stack) and bool(self.stack[-1]) and (self.string is None or self.in_key)


class GrammarState:
    """One request's place in its grammar."""

    def __init__(self, grammar: JSONGrammar):
        self.grammar = grammar
        self.states = grammar.initial
        self.keys = _Keys()

    unconstrained = False

    def allowed(self):
        """(vocabulary,) bool: the tokens that may come next (a new tensor)."""
        return ~self.rejected()

    def rejected(self):
        """(vocabulary,) bool: the tokens that may not come next (shared and cached: read only)."""
        base = self.grammar.rejected(self.states)
        v = self.grammar.vocab
        bad = []
        for p in self.keys.closing_used():  # the rest of a used key and its closing quote
            lo = bisect.bisect_left(v.sorted_text, p)
            bad += v.sorted_ids[lo:bisect.bisect_left(v.sorted_text, p + _LAST, lo)]
        if self.keys.may_repeat():  # tokens that open and close a key in one, if it could be a used one
            used = [k + '"' for u in self.keys.stack if u for k in u]
            bad += [i for i in v.two_quote_ids if any(k in v.text[i] for k in used)
                    and self.keys.copy().feed(v.text[i])]  # read on a copy, exactly
        if not bad:
            return base
        out = base.clone()  # only while a key could end as one its object has used: a copy, the cache is shared
        out[bad] = True
        return out

    @property
    def dead(self) -> bool:
        """No token may come next (a vocabulary without a character the grammar needs)."""
        return self.grammar.allows_nothing(self.states)

    @property
    def can_end(self) -> bool:
        return any(s[0] == DONE for s in self.states)

    @property
    def finished(self) -> bool:
        """The value is complete and nothing may follow it."""
        return bool(self.states) and all(s[0] == DONE for s in self.states)

    def advance(self, token_id: int) -> bool:
        """Take the token; False (and a dead state that allows nothing) when the grammar rejects it."""
        text = self.grammar.vocab.text[token_id] if 0 <= token_id < self.grammar.vocab.size else None
        return self.advance_text(text)

    def advance_text(self, text: str | None) -> bool:
        s = self.states if text is not None else frozenset()
        for c in text or "":
            s = self.grammar.step_set(s, c)
            if not s:
                break
        self.states = s
        if s:
            self.keys.feed(text)
        return bool(s)


def response_format_grammar(vocab: TokenVocab, response_format: dict | None) -> JSONGrammar | None:
    """OpenAI's response_format -> a grammar (None for plain text). Raises SchemaError on a bad format."""
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSONGrammar(vocab)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise SchemaError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        schema = spec.get("schema", {"type": "object"})
        return JSONGrammar(vocab, schema)
    raise SchemaError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


class TextOrGrammar:
    """Free text, unless the output begins with the grammar's prefix: then the grammar holds from there on (a
    tool call under tool_choice "auto": the model decides whether to call, and a call it begins is valid)."""

    def __init__(self, grammar: JSONGrammar):
        import torch

        if not grammar.prefix:
            raise ValueError("TextOrGrammar needs a grammar with a prefix that marks where it begins")
        self.grammar = grammar
        self.nothing = torch.zeros(grammar.vocab.size, dtype=torch.bool)  # rejects no token

    def start(self) -> "_TextOrGrammarState":
        return _TextOrGrammarState(self)


class _TextOrGrammarState:
    def __init__(self, owner: TextOrGrammar):
        self.owner = owner
        self.text = ""  # the output so far, while it may still become the prefix
        self.inner: GrammarState | None = None
        self.free = False

    def rejected(self):
        return self.inner.rejected() if self.inner is not None else self.owner.nothing

    @property
    def unconstrained(self) -> bool:
        """Text so far (not, or not yet, a call): no token is masked and the output may end."""
        return self.inner is None

    def allowed(self):
        return ~self.rejected()

    @property
    def can_end(self) -> bool:
        return self.inner.can_end if self.inner is not None else True

    @property
    def finished(self) -> bool:
        return self.inner.finished if self.inner is not None else False

    @property
    def dead(self) -> bool:
        return self.inner.dead if self.inner is not None else False

    def advance(self, token_id: int) -> bool:
        if self.inner is not None:
            return self.inner.advance(token_id)
        if self.free:
            return True
        g = self.owner.grammar
        self.text += (g.vocab.text[token_id] if 0 <= token_id < g.vocab.size else None) or "\ufffd"
        head = self.text.lstrip()
        if head.startswith(g.prefix):
            inner = g.start()
            if inner.advance_text(head):
                self.inner = inner
            else:
                self.free = True  # a call begun badly inside one token: it stays text
        elif not g.prefix.startswith(head):
            self.free = True
        return True

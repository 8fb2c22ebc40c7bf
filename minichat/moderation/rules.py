"""Rules as data: loading, validating, merging and matching the YAML/JSON rule files.

A rules file (see rules/default.yaml for the full commented example) has these top-level sections, all optional:

    categories:  {name: {threshold: 0.5, description: "..."}}   # thresholds; new names add custom categories
    vocab:       {name: [word or phrase, ...]}                   # word lists used as {name} inside regexes
    lexicons:    [{id, categories: {cat: weight}, terms: [...]}] # words/phrases, matched on normalised tokens
    patterns:    [{id, categories: {cat: weight}, regex: "..."}] # regexes over the normalised text
    exceptions:  [{id, regex, categories: [cat, ...], damp_learned: 0.2}]  # benign look-alikes
    refusals:    {category or "default": "refusal text"}
    disable:     [rule id, or "category:NAME"]                   # in a user file: switch rules/categories off
    settings:    {learned: true, learned_weight: 1.0, ...}        # see engine.Settings

Files are merged in order (the packaged default first, then the user's): an entry whose id already exists
replaces it, so users change a rule by re-declaring its id. Every error names the file and the line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import yaml

from minichat.errors import MinichatError
from minichat.moderation.categories import CATEGORIES
from minichat.moderation.normalize import Normalized, squeeze
from minichat.moderation.prefilter import PrefixIndex, TextView, literal_prefixes

_LINE = "__line__"
_VOCAB_REF = regex.compile(r"\{([a-z_][a-z0-9_]*)\}")


class RulesError(MinichatError):
    """A rules or moderation config file that does not parse or validate; the message names file and line."""


class _LineLoader(yaml.SafeLoader):
    """A safe YAML loader that remembers the line of every mapping, so validation errors can point at it."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = yaml.SafeLoader.construct_mapping(loader, node, deep=True)
    mapping[_LINE] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_rules_text(text: str, source: str) -> dict:
    """Parse YAML or JSON rules text; syntax errors become RulesError naming `source` and the line."""
    if source.endswith(".json"):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise RulesError(f"{source}, line {e.lineno}: invalid JSON: {e.msg}") from None
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else "?"
        raise RulesError(f"{source}, line {line}: does not parse: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise RulesError(f"{source}: does not parse: {e}") from None
    if data is None:
        return {_LINE: 1}
    if not isinstance(data, dict):
        raise RulesError(f"{source}, line 1: expected a mapping of sections at the top level")
    return data


def read_rules_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise RulesError(f"rules file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RulesError(f"rules file {p} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return parse_rules_text(text, str(p))


@dataclass
class Hit:
    """One rule that fired: its id, the categories it adds to with weights, and where in the normalised text."""

    rule: str
    kind: str  # "lexicon" | "pattern"
    weights: dict[str, float]
    span: tuple[int, int]
    match: str
    suppressed_by: str | None = None  # id of the exception that cleared this hit, if any

    def to_dict(self) -> dict:
        d = {"id": self.rule, "kind": self.kind, "categories": self.weights, "match": self.match}
        if self.suppressed_by:
            d["suppressed_by"] = self.suppressed_by
        return d


@dataclass
class _Lexicon:
    id: str
    weights: dict[str, float]
    terms: list[tuple[str, ...]]
    source: str


@dataclass
class _Pattern:
    id: str
    weights: dict[str, float]
    regex: Any
    source: str
    prefixes: Any = None  # prefilter.Prefixes: what every match starts with; None: unknown


@dataclass
class _Exception:
    id: str
    regex: Any
    categories: list[str] | None  # None = all categories
    damp_learned: float
    scope: str  # "span": clears hits overlapping the match; "text": clears hits anywhere in the text
    source: str
    prefixes: Any = None


@dataclass
class RuleSet:
    """The merged, compiled rules. Build with RuleSet.from_dicts([(data, source), ...])."""

    categories: dict[str, dict] = field(default_factory=dict)
    vocab: dict[str, list[str]] = field(default_factory=dict)
    lexicons: dict[str, _Lexicon] = field(default_factory=dict)
    patterns: dict[str, _Pattern] = field(default_factory=dict)
    exceptions: dict[str, _Exception] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    disabled: set[str] = field(default_factory=set)
    timeout: float = 0.5
    # compiled look-up tables
    _single: dict[str, list[str]] = field(default_factory=dict)
    _single_sq: dict[str, list[str]] = field(default_factory=dict)
    _multi: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    _by_len: dict[int, list[str]] = field(default_factory=dict)
    _max_n: int = 1
    _multi_first: set[str] = field(default_factory=set)
    _pattern_index: Any = None  # prefilter.PrefixIndex over the patterns (built by _index)
    _exception_index: Any = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dicts(cls, docs: list[tuple[dict, str]], timeout: float = 0.5) -> "RuleSet":
        rs = cls(timeout=timeout)
        rs.categories = {c: {"threshold": 0.5, "description": ""} for c in CATEGORIES}
        raw_patterns: dict[str, tuple[dict, str]] = {}
        raw_exceptions: dict[str, tuple[dict, str]] = {}
        for data, source in docs:
            rs._merge(data, source, raw_patterns, raw_exceptions)
        # Regexes are compiled after all vocab is known, so a user can extend a word list the defaults use.
        for rid, (item, where) in raw_patterns.items():
            rx = rs._compile(item, where)
            rs.patterns[rid] = _Pattern(rid, rs._weights(item, where), rx, where, literal_prefixes(rx.pattern))
        for rid, (item, where) in raw_exceptions.items():
            cats = item.get("categories")
            if cats is not None:
                if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
                    raise RulesError(f"{where}: exception {rid!r}: categories must be a list of category names")
                for c in cats:
                    rs._check_category(c, where)
            damp = item.get("damp_learned", 0.25)
            scope = item.get("scope", "span")
            if not isinstance(damp, (int, float)) or not 0 <= damp <= 1:
                raise RulesError(f"{where}: exception {rid!r}: damp_learned must be a number in [0, 1]")
            if scope not in ("span", "text"):
                raise RulesError(f"{where}: exception {rid!r}: scope must be 'span' or 'text'")
            rx = rs._compile(item, where)
            rs.exceptions[rid] = _Exception(rid, rx, cats, float(damp), scope, where, literal_prefixes(rx.pattern))
        rs._index()
        return rs

    def _check_category(self, cat: str, where: str) -> None:
        if cat not in self.categories:
            raise RulesError(f"{where}: unknown category {cat!r}; declare it under 'categories:' first "
                             f"(known: {', '.join(self.categories)})")

    def _weights(self, item: dict, where: str) -> dict[str, float]:
        cats = item.get("categories")
        if not isinstance(cats, dict) or not cats:
            raise RulesError(f"{where}: 'categories' must map category names to weights in [0, 1]")
        out = {}
        for c, w in cats.items():
            if c == _LINE:
                continue
            self._check_category(c, where)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1:
                raise RulesError(f"{where}: weight for {c!r} must be a number in [0, 1], got {w!r}")
            out[c] = float(w)
        return out

    def _compile(self, item: dict, where: str):
        pat = item.get("regex")
        if not isinstance(pat, str) or not pat:
            raise RulesError(f"{where}: 'regex' must be a non-empty string")

        def expand(m: regex.Match) -> str:
            name = m.group(1)
            if name not in self.vocab:
                raise RulesError(f"{where}: regex uses {{{name}}} but there is no vocab list {name!r}")
            return "(?:" + "|".join(self.vocab[name]) + ")"

        expanded = _VOCAB_REF.sub(expand, pat)
        try:
            return regex.compile(expanded)
        except regex.error as e:
            raise RulesError(f"{where}: invalid regex {pat!r}: {e}") from None

    def _merge(self, data: dict, source: str, raw_patterns: dict, raw_exceptions: dict) -> None:
        known = {"version", "categories", "vocab", "lexicons", "patterns", "exceptions", "refusals",
                 "disable", "settings", _LINE}
        for key in data:
            if key not in known:
                raise RulesError(f"{source}, line {data.get(_LINE, '?')}: unknown section {key!r}; "
                                 f"known: {', '.join(sorted(known - {_LINE}))}")

        def where(item: Any, default: Any = "?") -> str:
            line = item.get(_LINE, default) if isinstance(item, dict) else default
            return f"{source}, line {line}"

        top = data.get(_LINE, 1)
        cats = data.get("categories") or {}
        if not isinstance(cats, dict):
            raise RulesError(f"{where(data, top)}: 'categories' must be a mapping")
        for name, spec in cats.items():
            if name == _LINE:
                continue
            spec = spec if spec is not None else {}
            if not isinstance(spec, dict):
                raise RulesError(f"{where(cats)}: category {name!r} must be a mapping like {{threshold: 0.5}}")
            entry = self.categories.setdefault(name, {"threshold": 0.5, "description": ""})
            for k, v in spec.items():
                if k == _LINE:
                    continue
                if k == "threshold":
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                        raise RulesError(f"{where(spec)}: threshold of {name!r} must be in (0, 1], got {v!r}")
                    entry["threshold"] = float(v)
                elif k == "description":
                    entry["description"] = str(v)
                else:
                    raise RulesError(f"{where(spec)}: category {name!r}: unknown field {k!r} "
                                     "(known: threshold, description)")
        vocab = data.get("vocab") or {}
        if not isinstance(vocab, dict):
            raise RulesError(f"{where(data, top)}: 'vocab' must map names to lists of words")
        for name, words in vocab.items():
            if name == _LINE:
                continue
            if not isinstance(words, list) or not all(isinstance(w, (str, int)) for w in words):
                raise RulesError(f"{where(vocab)}: vocab {name!r} must be a list of words or regex pieces")
            self.vocab[name] = [str(w) for w in words]

        for section, store in (("lexicons", None), ("patterns", raw_patterns), ("exceptions", raw_exceptions)):
            items = data.get(section) or []
            if not isinstance(items, list):
                raise RulesError(f"{where(data, top)}: {section!r} must be a list of rules")
            for item in items:
                if not isinstance(item, dict):
                    raise RulesError(f"{source}: each entry of {section!r} must be a mapping with an 'id'")
                rid = item.get("id")
                if not isinstance(rid, str) or not rid:
                    raise RulesError(f"{where(item)}: every rule in {section!r} needs a string 'id'")
                if section == "lexicons":
                    terms = item.get("terms")
                    if not isinstance(terms, list) or not all(isinstance(t, str) and t.strip() for t in terms):
                        raise RulesError(f"{where(item)}: lexicon {rid!r}: 'terms' must be a list of words")
                    self.lexicons[rid] = _Lexicon(
                        rid, self._weights(item, where(item)),
                        [tuple(t.casefold().split()) for t in terms], where(item))
                else:
                    store[rid] = (item, where(item) + f" ({section[:-1]} {rid!r})")

        refusals = data.get("refusals") or {}
        if not isinstance(refusals, dict):
            raise RulesError(f"{where(data, top)}: 'refusals' must map category names to text")
        for cat, text in refusals.items():
            if cat == _LINE:
                continue
            if not isinstance(text, str) or not text.strip():
                raise RulesError(f"{where(refusals)}: refusal for {cat!r} must be non-empty text")
            self.refusals[cat] = text.strip()

        disable = data.get("disable") or []
        if not isinstance(disable, list) or not all(isinstance(d, str) for d in disable):
            raise RulesError(f"{where(data, top)}: 'disable' must be a list of rule ids or 'category:NAME'")
        self.disabled.update(disable)

        settings = data.get("settings") or {}
        if not isinstance(settings, dict):
            raise RulesError(f"{where(data, top)}: 'settings' must be a mapping")
        for k, v in settings.items():
            if k != _LINE:
                self.settings[k] = v
        self.settings.setdefault("_sources", []).append(source)

    def _index(self) -> None:
        for lex in self.lexicons.values():
            if lex.id in self.disabled:
                continue
            for term in lex.terms:
                if len(term) == 1:
                    self._single.setdefault(term[0], []).append(lex.id)
                    self._single_sq.setdefault(squeeze(term[0]), []).append(lex.id)
                    self._by_len.setdefault(len(term[0]), []).append(term[0])
                else:
                    self._multi.setdefault(term, []).append(lex.id)
                    self._max_n = max(self._max_n, len(term))
        self._multi_first = {term[0] for term in self._multi}  # a token that starts no term starts no n-gram hit
        self._pattern_index = PrefixIndex((p.id, p.prefixes) for p in self.patterns.values())
        self._exception_index = PrefixIndex((e.id, e.prefixes) for e in self.exceptions.values())

    # ---------------------------------------------------------------- matching
    @property
    def active_categories(self) -> list[str]:
        return [c for c in self.categories if f"category:{c}" not in self.disabled]

    def match(self, norm: Normalized) -> list[Hit]:
        """All lexicon and pattern hits on a normalised text, before exceptions."""
        hits: list[Hit] = []
        toks, offs = norm.tokens, norm.offsets
        for i, tok in enumerate(toks):
            ids = self._single.get(tok)
            if ids is None and norm.squeezed[i] is not None:
                ids = self._single_sq.get(norm.squeezed[i])
            if ids is None and ("*" in tok or "#" in tok) and sum(c.isalpha() for c in tok) >= 2:
                ids = self._wildcard(tok)
            if ids:
                for rid in ids:
                    hits.append(Hit(rid, "lexicon", self.lexicons[rid].weights,
                                    (offs[i], offs[i] + len(tok)), tok))
            if tok not in self._multi_first:
                continue
            for n in range(2, self._max_n + 1):
                if i + n > len(toks):
                    break
                gram = tuple(toks[i:i + n])
                ids = self._multi.get(gram)
                if ids:
                    end = offs[i + n - 1] + len(toks[i + n - 1])
                    for rid in ids:
                        hits.append(Hit(rid, "lexicon", self.lexicons[rid].weights, (offs[i], end), " ".join(gram)))
        text = norm.text
        view = TextView(text)
        maybe = self._pattern_index.candidates(view)
        for pat in self.patterns.values():
            if pat.id in self.disabled or pat.id not in maybe:
                continue
            try:
                for m in pat.regex.finditer(text, timeout=self.timeout):
                    hits.append(Hit(pat.id, "pattern", pat.weights, m.span(), m.group(0)))
                    break  # one hit per pattern is enough evidence and keeps the cost bounded
            except TimeoutError:
                raise MinichatError(f"moderation rule {pat.id!r} ({pat.source}) took longer than "
                                    f"{self.timeout}s on a {len(text)}-character text; simplify its regex") from None
        return hits

    def _wildcard(self, tok: str) -> list[str] | None:
        # "f*ck", "n#####": a masked word matches lexicon words of the same length, position by position.
        for word in self._by_len.get(len(tok), ()):
            if all(a == b or a in "*#" for a, b in zip(tok, word)):
                return self._single[word]
        return None

    def apply_exceptions(self, norm: Normalized, hits: list[Hit]) -> tuple[list[str], dict[str, float]]:
        """Mark hits cleared by exceptions; return the exception ids that fired and per-category learned damping."""
        fired: list[str] = []
        damp: dict[str, float] = {}
        view = TextView(norm.text)
        maybe = self._exception_index.candidates(view)
        for exc in self.exceptions.values():
            if exc.id in self.disabled or exc.id not in maybe:
                continue
            try:
                spans = [m.span() for m in exc.regex.finditer(norm.text, timeout=self.timeout)]
            except TimeoutError:
                raise MinichatError(f"moderation exception {exc.id!r} ({exc.source}) took longer than "
                                    f"{self.timeout}s; simplify its regex") from None
            if not spans:
                continue
            fired.append(exc.id)
            cats = exc.categories if exc.categories is not None else list(self.categories)
            for c in cats:
                damp[c] = min(damp.get(c, 1.0), exc.damp_learned)
            for h in hits:
                if h.suppressed_by or not any(c in cats for c in h.weights):
                    continue
                if exc.scope == "text" or any(s < h.span[1] and h.span[0] < e for s, e in spans):
                    h.suppressed_by = exc.id
        return fired, damp

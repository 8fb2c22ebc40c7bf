"""The moderator: rules + learned scorer -> per-category scores, flags, refusals, streaming guard, audit log."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from minichat.errors import MinichatError
from minichat.moderation.categories import CATEGORIES, PARENT
from minichat.moderation.normalize import normalize
from minichat.moderation.rules import RuleSet, RulesError, read_rules_file

MODEL_NAME = "minichat-moderation-1"
DEFAULT_MAX_BYTES = 1_000_000


@dataclass
class Settings:
    """Engine settings; a rules/config file may set them under `settings:`."""

    learned: bool = True  # use the learned scorer when its artefact is available
    learned_weight: float = 1.0  # scale of the learned score before it is combined with the rules
    model_path: str = ""  # a learned-scorer artefact (.npz); empty = the packaged one
    max_bytes: int = DEFAULT_MAX_BYTES  # texts of this many UTF-8 bytes or more are refused with an error
    regex_timeout: float = 0.5  # seconds one rule may spend on one text before it is reported as broken
    stream_window: int = 600  # characters of the tail the streaming guard re-checks
    stream_every: int = 24  # re-check after this many new characters (and at sentence ends)
    # a partial answer is stopped only when a flagged category's score clears its threshold by this much; the
    # finished answer is judged by the thresholds alone. Each re-check of a growing answer is one more chance
    # of a false flag, and a fragment of a sentence scores more extremely than the sentence: without a margin
    # the guard stopped 18% of the built-in model's replies to benign prompts (bench/results/moderation_chat.md)
    stream_margin: float = 0.3

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "Settings":
        s = cls()
        for k, v in d.items():
            if k.startswith("_"):
                continue
            if not hasattr(s, k):
                raise RulesError(f"{source}: unknown setting {k!r}; known: {', '.join(s.__dataclass_fields__)}")
            want = type(getattr(s, k))
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise RulesError(f"{source}: setting {k!r} must be a {want.__name__}, got {v!r}")
            setattr(s, k, v)
        if (s.max_bytes < 1 or s.stream_window < 50 or s.stream_every < 1 or s.regex_timeout <= 0
                or not 0.0 <= s.stream_margin < 1.0):
            raise RulesError(f"{source}: settings out of range (max_bytes >= 1, stream_window >= 50, "
                             "stream_every >= 1, regex_timeout > 0, 0 <= stream_margin < 1)")
        return s


@dataclass
class ModerationResult:
    """One text's verdict, shaped like one entry of OpenAI's `results` list (plus which rules fired)."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    rules: list[dict] = field(default_factory=list)  # hits: id, kind, categories, match, suppressed_by
    exceptions: list[str] = field(default_factory=list)  # exception ids that fired
    learned_scores: dict[str, float] = field(default_factory=dict)
    normalized_changed: bool = False  # evasion-style spelling was undone before matching

    @property
    def flagged_categories(self) -> list[str]:
        return [c for c, v in self.categories.items() if v]

    @property
    def fired_rules(self) -> list[str]:
        """Ids of rules that counted (not cleared by an exception)."""
        return [h["id"] for h in self.rules if not h.get("suppressed_by")]

    def top_category(self) -> str | None:
        flagged = self.flagged_categories
        if not flagged:
            return None
        return max(flagged, key=lambda c: self.category_scores[c])

    def to_openai(self, include_rules: bool = True) -> dict:
        """One element of OpenAI's moderation `results` list; `rule_hits` is an extra key clients ignore."""
        d: dict[str, Any] = {
            "flagged": self.flagged,
            "categories": dict(self.categories),
            "category_scores": {c: round(s, 6) for c, s in self.category_scores.items()},
            "category_applied_input_types": {c: ["text"] for c in self.categories},
        }
        if include_rules:
            d["rule_hits"] = self.rules
            d["exceptions"] = self.exceptions
        return d

    def to_dict(self) -> dict:
        d = self.to_openai(include_rules=True)
        del d["category_applied_input_types"]
        d["learned_scores"] = {c: round(s, 6) for c, s in self.learned_scores.items()}
        return d


def moderation_response(results: list[ModerationResult], model: str = MODEL_NAME) -> dict:
    """The full body of a `/v1/moderations` response for a list of results."""
    return {"id": f"modr-{uuid.uuid4().hex[:24]}", "model": model, "results": [r.to_openai() for r in results]}


class AuditLog:
    """Appends one JSON line per decision: time, source, flagged, categories, scores, rule ids, text hash.

    The text itself is left out unless include_text=True, so the log can be kept without storing user content.
    """

    def __init__(self, path: str | os.PathLike, include_text: bool = False):
        self.path = Path(path)
        self.include_text = include_text
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, result: ModerationResult, text: str, source: str = "input", **extra: Any) -> None:
        rec: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": source,
            "flagged": result.flagged,
            "flagged_categories": result.flagged_categories,
            "scores": {c: round(s, 4) for c, s in result.category_scores.items() if s >= 0.01},
            "rules": result.fired_rules,
            "suppressed": [h["id"] for h in result.rules if h.get("suppressed_by")],
            "exceptions": result.exceptions,
            "sha256": hashlib.sha256(text.encode("utf-8", "replace")).hexdigest(),
            "chars": len(text),
        }
        if self.include_text:
            rec["text"] = text
        rec.update(extra)
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:  # append-only log: one write per line
            f.write(line)


def _read_default_rules() -> list[tuple[dict, str]]:
    from minichat.moderation.rules import parse_rules_text

    folder = resources.files("minichat.moderation") / "rules"
    docs = []
    for name in sorted(p.name for p in folder.iterdir() if p.name.endswith((".yaml", ".yml", ".json"))):
        docs.append((parse_rules_text((folder / name).read_text(encoding="utf-8"), f"minichat/moderation/rules/{name}"),
                     f"minichat/moderation/rules/{name}"))
    return docs


class Moderator:
    """Rules + learned scorer. Build with Moderator.load(config_path=None)."""

    def __init__(self, rules: RuleSet, settings: Settings, scorer: Any | None = None,
                 audit: AuditLog | None = None):
        self.rules = rules
        self.settings = settings
        self.scorer = scorer
        self.audit = audit
        self.categories = rules.active_categories
        self.thresholds = {c: rules.categories[c]["threshold"] for c in self.categories}
        # screen_many()'s test on the learned scores as an array: each category's column in the scorer's output
        # (-1: the scorer has none), its threshold, and the (child, parent) pairs among the active categories
        cols = {c: i for i, c in enumerate(scorer.categories)} if scorer is not None else {}
        at = {c: i for i, c in enumerate(self.categories)}
        self._alone_cols = [cols.get(c, -1) for c in self.categories]
        self._alone_th = [self.thresholds[c] for c in self.categories]
        self._alone_pairs = [(at[ch], at[pa]) for ch, pa in PARENT.items() if ch in at and pa in at]

    @classmethod
    def load(cls, config_path: str | os.PathLike | None = None, *, learned: bool | None = None,
             audit_path: str | os.PathLike | None = None, include_text_in_audit: bool = False,
             use_defaults: bool = True) -> "Moderator":
        """Packaged rules (+ the user's config file, merged on top) and the packaged learned scorer."""
        docs = _read_default_rules() if use_defaults else []
        if config_path is not None:
            docs.append((read_rules_file(config_path), str(config_path)))
        settings_dict: dict = {}
        for data, _ in docs:
            s = data.get("settings") or {}
            if isinstance(s, dict):
                settings_dict.update({k: v for k, v in s.items() if k != "__line__"})
        settings = Settings.from_dict(settings_dict, str(config_path or "default rules"))
        rules = RuleSet.from_dicts(docs, timeout=settings.regex_timeout)
        if learned is not None:
            settings.learned = learned
        scorer = None
        if settings.learned:
            from minichat.moderation.learned import LearnedScorer

            scorer = LearnedScorer.load(settings.model_path or None)
        audit = AuditLog(audit_path, include_text_in_audit) if audit_path else None
        return cls(rules, settings, scorer, audit)

    def enable_audit(self, path: str | os.PathLike, include_text: bool = False) -> AuditLog:
        self.audit = AuditLog(path, include_text)
        return self.audit

    # ---------------------------------------------------------------- checking
    def _coerce(self, text: Any) -> str:
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                raise MinichatError(f"text is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if isinstance(text, (list, tuple)):
            raise MinichatError("check() takes one text; use check_many() for a list of texts")
        if not isinstance(text, str):
            raise MinichatError(f"text to moderate must be a string, got {type(text).__name__}")
        if len(text) * 4 >= self.settings.max_bytes or len(text) >= self.settings.max_bytes // 4:
            n = len(text.encode("utf-8", "surrogatepass"))
            if n >= self.settings.max_bytes:
                raise MinichatError(f"text is {n:,} bytes; the moderator takes texts under "
                                    f"{self.settings.max_bytes:,} bytes (settings.max_bytes); split it")
        return text

    def check(self, text: str, *, source: str = "input", audit: bool = True) -> ModerationResult:
        """Moderate one text (str, or UTF-8 bytes)."""
        text = self._coerce(text)
        norm = normalize(text)  # once, for the rules and the scorer both
        learned = self.scorer.score([text], [norm])[0] if self.scorer is not None else None
        result = self._decide(text, learned, norm)
        if audit and self.audit is not None:
            self.audit.write(result, text, source)
        return result

    def check_many(self, texts: Iterable[str], *, source: str = "input") -> list[ModerationResult]:
        """Moderate a list of texts; the learned scorer runs on them as one batch."""
        if isinstance(texts, (str, bytes)):
            raise MinichatError("check_many() takes a list of texts; use check() for one text")
        items = [self._coerce(t) for t in texts]
        norms, learned = self._featurize(items)
        out = []
        for t, l, n in zip(items, learned, norms):
            r = self._decide(t, l, n)
            if self.audit is not None:
                self.audit.write(r, t, source)
            out.append(r)
        return out

    def _featurize(self, items: list[str]) -> tuple[list, list]:
        """Each text normalized once (for the rules and the scorer), and the learned scores as one batch."""
        norms = [normalize(t) for t in items]
        learned = self.scorer.score(items, norms) if (self.scorer is not None and items) else [None] * len(items)
        return norms, learned

    def screen_many(self, texts: list[str]) -> list[ModerationResult | None]:
        """check_many() for callers that only act on flagged texts (stream guards): None where the text is
        certainly not flagged, else its full result (no audit). Certain: no rule hit, and the learned scores
        alone, before any exception's damping (which only lowers them), stay below every threshold; then the
        exceptions, ~20% of a check, need not run, and a process boundary carries None instead of a result."""
        items = [self._coerce(t) for t in texts]
        norms = [normalize(t) for t in items]
        probs = self.scorer.probabilities(items, norms) if (self.scorer is not None and items) else None
        out: list[ModerationResult | None] = []
        for i, (t, n) in enumerate(zip(items, norms)):
            hits = self.rules.match(n)
            if hits or (probs is not None and self._learned_alone_flags_row(probs[i])):
                learned = dict(zip(self.scorer.categories, map(float, probs[i]))) if probs is not None else None
                out.append(self._decide(t, learned, n, hits))
            else:
                out.append(None)
        return out

    def _learned_alone_flags_row(self, p) -> bool:
        """Whether the learned scores alone (one row of LearnedScorer.probabilities()), scaled by learned_weight
        and each parent raised to its children as _decide() does, reach a threshold. On the array, not on
        dictionaries: those took ~14 µs of a screen's ~210."""
        lw, row = self.settings.learned_weight, p.tolist()
        s = [min(1.0, max(0.0, row[j] * lw)) if j >= 0 else 0.0 for j in self._alone_cols]
        for ch, pa in self._alone_pairs:
            s[pa] = max(s[pa], s[ch])
        return any(x >= t for x, t in zip(s, self._alone_th))

    def _decide(self, text: str, learned: dict[str, float] | None, norm=None, hits=None) -> ModerationResult:
        norm = normalize(text) if norm is None else norm
        hits = self.rules.match(norm) if hits is None else hits
        fired_exc, damp = self.rules.apply_exceptions(norm, hits)
        active = set(self.categories)
        rule_score = {c: 0.0 for c in self.categories}
        keep = {c: 1.0 for c in self.categories}  # noisy-or: P(no evidence) per category
        for h in hits:
            if h.suppressed_by:
                continue
            for c, w in h.weights.items():
                if c in active:
                    keep[c] *= 1.0 - w
        for c in self.categories:
            rule_score[c] = 1.0 - keep[c]
        lw = self.settings.learned_weight
        learned = learned or {}
        scores = {}
        for c in self.categories:
            l = min(1.0, max(0.0, learned.get(c, 0.0) * lw * damp.get(c, 1.0)))
            scores[c] = 1.0 - (1.0 - rule_score[c]) * (1.0 - l)
        for child, parent in PARENT.items():
            if child in scores and parent in scores:
                scores[parent] = max(scores[parent], scores[child])
        cats = {c: scores[c] >= self.thresholds[c] for c in self.categories}
        return ModerationResult(
            flagged=any(cats.values()), categories=cats, category_scores=scores,
            rules=[h.to_dict() for h in hits], exceptions=fired_exc,
            learned_scores={c: v for c, v in learned.items() if c in active}, normalized_changed=norm.changed)

    # ---------------------------------------------------------------- policy
    def refusal_for(self, result: ModerationResult) -> str:
        """The configured refusal for the result's strongest flagged category ('default' if none is set)."""
        return refusal_for(result, self.rules.refusals)

    async def acheck(self, text: str, *, source: str = "input", audit: bool = True) -> ModerationResult:
        """check() for an event loop: the milliseconds of Python run in a worker thread."""
        return await asyncio.to_thread(self.check, text, source=source, audit=audit)

    async def acheck_many(self, texts: Iterable[str], *, source: str = "input") -> list[ModerationResult]:
        return await asyncio.to_thread(self.check_many, texts, source=source)

    async def ascreen(self, text: str) -> ModerationResult | None:
        """screen_many() of one text, for an event loop."""
        return (await asyncio.to_thread(self.screen_many, [text]))[0]

    def stream_guard(self, source: str = "output") -> "StreamGuard":
        return StreamGuard(self, source)


def refusal_for(result: ModerationResult, templates: dict[str, str] | None = None) -> str:
    """A category-appropriate refusal; `templates` maps category (or parent category, or 'default') to text."""
    if templates is None:
        templates = _default_refusals()
    cat = result.top_category()
    for key in (cat, PARENT.get(cat or "", ""), "default"):
        if key and key in templates:
            return templates[key]
    return "I can't help with that."


@functools.lru_cache(maxsize=1)
def _default_refusals() -> dict[str, str]:
    return dict(RuleSet.from_dicts(_read_default_rules()).refusals)


class StreamGuard:
    """Moderates a streamed answer as it grows; feed() returns a flagged result as soon as a flagged category's
    score clears its threshold by settings.stream_margin, and finish() judges the finished tail by the thresholds.

    Only a trailing window is re-checked, and only every `stream_every` characters or at a sentence end, so the
    cost per token stays small. Once flagged, the guard stays flagged and feed() keeps returning that result.
    """

    def __init__(self, moderator: Moderator, source: str = "output"):
        self.moderator = moderator
        self.source = source
        self.text = ""
        self.result: ModerationResult | None = None
        self._checked_upto = 0
        self._held = False  # a partial answer was flagged below the margin

    def feed(self, delta: str) -> ModerationResult | None:
        if self.result is not None:
            return self.result
        if not isinstance(delta, str):
            raise MinichatError(f"stream_guard.feed() takes text, got {type(delta).__name__}")
        due = self.due(delta)
        self.text += delta
        return self._check() if due else None

    async def afeed(self, delta: str) -> ModerationResult | None:
        """feed() for an event loop: a due check is awaited through the moderator's acheck()."""
        if self.result is not None or not isinstance(delta, str) or not self.due(delta):
            return self.feed(delta)
        self.text += delta
        return self._verdict(await self.moderator.ascreen(self._window()))

    def due(self, delta: str) -> bool:
        """Whether feed(delta) will run a check (the slow part), so a caller can run only those off its
        event loop and feed the other deltas inline."""
        if self.result is not None:
            return False
        new = len(self.text) + len(delta) - self._checked_upto
        return new >= self.moderator.settings.stream_every or bool(delta and delta.rstrip()[-1:] in ".!?\n")

    def finish(self) -> ModerationResult | None:
        """Check whatever was not checked yet (call when the stream ends); returns the flagged result or None.
        The finished answer's tail is judged without the partial answers' margin."""
        if self.result is None and (len(self.text) > self._checked_upto or self._held):
            return self._verdict(self.moderator.screen_many([self._window()])[0], final=True)
        return self.result

    async def afinish(self) -> ModerationResult | None:
        """finish() for an event loop."""
        if self.result is None and (len(self.text) > self._checked_upto or self._held):
            return self._verdict(await self.moderator.ascreen(self._window()), final=True)
        return self.result

    def _check(self) -> ModerationResult | None:
        return self._verdict(self.moderator.screen_many([self._window()])[0])

    def _window(self) -> str:
        self._checked_upto = len(self.text)
        return self.text[-self.moderator.settings.stream_window:]

    def _verdict(self, r: ModerationResult | None, final: bool = False) -> ModerationResult | None:
        if r is not None and r.flagged and not final:
            m = self.moderator.settings.stream_margin
            if not any(r.category_scores[c] >= self.moderator.thresholds[c] + m for c in r.flagged_categories):
                self._held = True  # flagged by the thresholds, not by the margin: finish() looks again
                return None
        if r is not None and r.flagged:
            self.result = r
            if self.moderator.audit is not None:
                self.moderator.audit.write(r, self.text, self.source, streamed_chars=len(self.text))
            return r
        return None

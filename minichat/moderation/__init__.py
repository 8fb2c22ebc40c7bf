"""Moderation: rules + a learned scorer over OpenAI's 13 omni-moderation categories, for the chat path.

Policy API (what the chat engine and the server call):

    from minichat.moderation import Moderator, moderation_response

    mod = Moderator.load(config_path=None)        # packaged rules (+ a user's YAML/JSON config merged on top)
    mod.enable_audit("runs/moderation.jsonl")     # optional: one JSON line per decision (no text by default)

    result = mod.check(user_text)                 # -> ModerationResult
    if result.flagged:
        reply = mod.refusal_for(result)           # category-appropriate refusal, configurable per category
    results = mod.check_many(texts)               # batch; the learned scorer runs once

    guard = mod.stream_guard()                    # moderate a streamed answer as it grows
    for delta in stream:
        hit = guard.feed(delta)                   # flagged ModerationResult as soon as the tail is flagged
        if hit: stop generation; show mod.refusal_for(hit)
    hit = guard.finish()                          # checks the unchecked rest at the end of the stream

    result.flagged, result.categories, result.category_scores     # OpenAI shape
    result.rules            # every rule hit: id, kind, categories, match, suppressed_by (an exception id)
    result.fired_rules      # ids of the hits that counted
    result.to_openai()      # one element of a /v1/moderations `results` list (plus `rule_hits`)
    moderation_response([result, ...])   # the whole /v1/moderations body: {id, model, results}

Bad input raises minichat.errors.MinichatError: non-text, a list passed to check(), texts of
settings.max_bytes (1,000,000) UTF-8 bytes or more, invalid UTF-8 bytes. Lone surrogates and control
characters are cleaned; an empty text is simply not flagged.

Rules live in minichat/moderation/rules/*.yaml (see default.yaml's header); a user's config file uses the same
sections and can add or replace rules by id, `disable:` rule ids or `category:NAME`, change thresholds, add
categories and change refusals. The learned scorer is trained with `python -m minichat.moderation.train`.
"""
from minichat.moderation.categories import CATEGORIES, EVAL_KEYS
from minichat.moderation.engine import (
    AuditLog,
    ModerationResult,
    Moderator,
    StreamGuard,
    moderation_response,
    refusal_for,
)
from minichat.moderation.rules import RulesError

__all__ = ["CATEGORIES", "EVAL_KEYS", "AuditLog", "ModerationResult", "Moderator", "StreamGuard",
           "moderation_response", "refusal_for", "RulesError"]

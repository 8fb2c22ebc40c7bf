"""The web chat's JSON API (under /api), backed by the store. The page itself is static/index.html.

    GET    /api/config                          models, defaults, whether moderation is on
    GET    /api/conversations                   the conversation list (newest first)
    POST   /api/conversations                   new conversation {title?, model?, system_prompt?, settings?}
    GET    /api/conversations/{id}              conversation + every message (a tree) + the shown path
    PATCH  /api/conversations/{id}              title, model, system_prompt, settings, current_leaf_id
    DELETE /api/conversations/{id}
    POST   /api/conversations/{id}/generate     {parent_id, content} (send / edit-and-resend) or {reply_to}
                                                (regenerate): server-sent events start, delta, moderation, done
    POST   /api/messages/{id}/feedback          {rating: 1 | -1 | null, comment?}
    POST   /api/comparisons                     {chosen_id, rejected_id}: the better of two regenerations

When an API key is configured, these need it too, and each key sees only its own conversations.
A reply stopped by the user (the page aborts the request) is kept as far as it got, marked "stopped".
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from minichat.serve.app import (SSE_HEADERS, Services, charge_tokens, rate_limit, read_json, record_moderation,
                                require_key, services, sse, submit)
from minichat.serve.generation import Moderated, check_input, moderated_events
from minichat.serve.protocol import APIError, GenOptions, bad_request, parse
from minichat.serve.worker import Delta, Finish

log = logging.getLogger("minichat.serve")
router = APIRouter(prefix="/api")


class ChatSettings(BaseModel):
    model_config = ConfigDict(extra="ignore")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    min_tokens: int | None = Field(default=None, ge=0)  # advanced: no end-of-turn before this many tokens
    dry_multiplier: float | None = Field(default=None, ge=0.0, le=10.0)  # DRY against loops; None: the server's


class NewConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str | None = Field(default=None, max_length=200)
    model: str | None = None
    system_prompt: str = ""
    settings: ChatSettings = Field(default_factory=ChatSettings)


class PatchConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str | None = Field(default=None, max_length=200)
    model: str | None = None
    system_prompt: str | None = None
    settings: ChatSettings | None = None
    current_leaf_id: str | None = None


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parent_id: str | None = None
    content: str | None = None
    reply_to: str | None = None
    model: str | None = None
    settings: ChatSettings | None = None


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rating: int | None = None
    comment: str | None = Field(default=None, max_length=10_000)


class ComparisonBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chosen_id: str
    rejected_id: str
    comment: str | None = None


# a conversation's sampling unless it sets its own; a model's recommended temperature / top_p (ServedModel.sampling:
# the built-in model's card's 0.2 / 0.9, which a blind judge preferred to 0.7 / 0.95, bench/results/chat.md)
# replace these
DEFAULTS = {"temperature": 0.7, "top_p": 0.95, "max_tokens": 512}


def _defaults(m) -> dict:
    return {**DEFAULTS, **m.sampling}


def _store(svc: Services):
    if svc.store is None:
        raise APIError(404, "this server keeps no store (store_url none), so the web chat is off")
    return svc.store


async def _call(fn, *args, **kwargs):
    return await asyncio.to_thread(fn, *args, **kwargs)


@router.get("/config")
async def config(svc: Services = Depends(services), owner: str | None = Depends(require_key)):
    return {"models": svc.models.names(), "default_model": svc.models.default,
            "defaults": _defaults(svc.models.get(svc.models.default)),
            "moderation": svc.moderator is not None, "auth": bool(owner)}


@router.get("/conversations")
async def list_conversations(limit: int = 100, offset: int = 0, svc: Services = Depends(services),
                             owner: str | None = Depends(require_key)):
    if not 1 <= limit <= 1000 or offset < 0:
        raise bad_request("limit must be 1..1000 and offset >= 0", param="limit")
    return {"object": "list", "data": await _call(_store(svc).list_conversations, owner=owner, limit=limit,
                                                  offset=offset, source="web")}


@router.post("/conversations")
async def create_conversation(request: Request, svc: Services = Depends(services),
                              owner: str | None = Depends(require_key)):
    b: NewConversation = parse(NewConversation, await read_json(request))
    model = svc.models.get(b.model).name if b.model else svc.models.default
    return await _call(_store(svc).create_conversation, title=b.title, model=model, system_prompt=b.system_prompt,
                       settings=b.settings.model_dump(exclude_none=True), source="web", owner=owner)


@router.get("/conversations/{cid}")
async def get_conversation(cid: str, svc: Services = Depends(services), owner: str | None = Depends(require_key)):
    return await _call(_store(svc).get_conversation, cid, owner=owner)


@router.patch("/conversations/{cid}")
async def patch_conversation(cid: str, request: Request, svc: Services = Depends(services),
                             owner: str | None = Depends(require_key)):
    b: PatchConversation = parse(PatchConversation, await read_json(request))
    fields: dict[str, Any] = b.model_dump(exclude_unset=True)
    if "settings" in fields and b.settings is not None:
        fields["settings"] = b.settings.model_dump(exclude_none=True)
    if fields.get("model"):
        svc.models.get(fields["model"])
    return await _call(_store(svc).update_conversation, cid, owner=owner, **fields)


@router.delete("/conversations/{cid}")
async def delete_conversation(cid: str, svc: Services = Depends(services), owner: str | None = Depends(require_key)):
    await _call(_store(svc).delete_conversation, cid, owner=owner)
    return {"id": cid, "deleted": True}


@router.post("/messages/{mid}/feedback")
async def feedback(mid: str, request: Request, svc: Services = Depends(services),
                   owner: str | None = Depends(require_key)):
    b: FeedbackBody = parse(FeedbackBody, await read_json(request))
    st = _store(svc)
    msg = await _call(st.get_message, mid)
    await _call(st.get_conversation, msg["conversation_id"], owner=owner)  # 404 unless it is this owner's
    return await _call(st.set_feedback, mid, rating=b.rating, comment=b.comment, user=owner or "")


@router.post("/comparisons")
async def comparison(request: Request, svc: Services = Depends(services), owner: str | None = Depends(require_key)):
    b: ComparisonBody = parse(ComparisonBody, await read_json(request))
    st = _store(svc)
    msg = await _call(st.get_message, b.chosen_id)
    await _call(st.get_conversation, msg["conversation_id"], owner=owner)
    return await _call(st.add_comparison, b.chosen_id, b.rejected_id, user=owner or "", comment=b.comment)


def fit_history(m, messages: list[dict], reserve: int) -> tuple[list[int], int]:
    """Prompt ids of the conversation, dropping the oldest turns (never the system prompt or the newest user
    message) until it leaves `reserve` tokens for the answer; returns (ids, messages dropped)."""
    system = [x for x in messages if x["role"] in ("system", "developer")]
    rest = [x for x in messages if x["role"] not in ("system", "developer")]
    dropped = 0
    while True:
        ids = m.render_chat(system + rest)
        if len(ids) + reserve <= m.context_len or len(rest) <= 1:
            break
        rest = rest[1:]
        dropped += 1
        while len(rest) > 1 and rest[0]["role"] != "user":  # a turn starts with the user
            rest = rest[1:]
            dropped += 1
    m.check_fits(ids)
    return ids, dropped


@router.post("/conversations/{cid}/generate")
async def generate(cid: str, request: Request, svc: Services = Depends(services),
                   owner: str | None = Depends(rate_limit)):
    b: GenerateBody = parse(GenerateBody, await read_json(request))
    st = _store(svc)
    conv = await _call(st.get_conversation, cid, owner=owner)
    by_id = {x["id"]: x for x in conv["messages"]}
    m = svc.models.get(b.model or conv["model"] or svc.models.default)
    settings = {**_defaults(m), **conv["settings"], **(b.settings.model_dump(exclude_none=True) if b.settings else {})}

    if b.content is not None:  # send, or edit and resend (a sibling of the edited message)
        if not b.content.strip():
            raise bad_request("the message is empty", param="content")
        if b.parent_id is not None and b.parent_id not in by_id:
            raise APIError(404, f"no message {b.parent_id!r} in this conversation", param="parent_id")
        base = await _call(st.thread, b.parent_id) if b.parent_id else []
        new_user = b.content
        reply_parent = None
    elif b.reply_to is not None:  # regenerate: another answer to an existing user message
        if by_id.get(b.reply_to, {}).get("role") != "user":
            raise APIError(404, f"no user message {b.reply_to!r} in this conversation", param="reply_to")
        base = await _call(st.thread, b.reply_to)
        new_user = None
        reply_parent = b.reply_to
    else:
        raise bad_request("give either content (with parent_id) or reply_to", param="content")

    history = [{"role": x["role"], "content": x["content"]} for x in base if not x.get("moderated")]
    if new_user is not None:
        history.append({"role": "user", "content": new_user})
    system = conv["system_prompt"]
    messages = ([{"role": "system", "content": system}] if system else []) + history
    reserve = min(int(settings.get("max_tokens") or 512), max(1, m.context_len // 4))
    prompt_ids, dropped = fit_history(m, messages, reserve)
    opts = GenOptions(max_tokens=max(1, min(int(settings.get("max_tokens") or 512), m.context_len - len(prompt_ids))),
                      temperature=float(settings.get("temperature", 0.7)), top_p=float(settings.get("top_p", 0.95)),
                      seed=settings.get("seed"), presence_penalty=float(settings.get("presence_penalty") or 0.0),
                      frequency_penalty=float(settings.get("frequency_penalty") or 0.0),
                      min_tokens=int(settings.get("min_tokens") or 0),
                      dry_multiplier=float(svc.cfg.dry_multiplier if settings.get("dry_multiplier") is None
                                           else settings["dry_multiplier"]))
    to_check = [new_user if new_user is not None else history[-1]["content"]] + ([system] if system else [])
    flagged = (await check_input(svc.moderator, to_check)).flagged
    job = None if flagged is not None else submit(svc, m, prompt_ids, opts)  # a 429 here stores nothing
    charge_tokens(request, len(prompt_ids), [job] if job is not None else [])

    def start_rows():
        user_msg = None
        parent = reply_parent
        if new_user is not None:
            user_msg = st.add_message(cid, role="user", content=new_user, parent_id=b.parent_id, owner=owner)
            parent = user_msg["id"]
        a = st.add_message(cid, role="assistant", content="", parent_id=parent, owner=owner, model=m.name,
                           settings=settings, prompt_tokens=len(prompt_ids))
        return user_msg, a

    try:
        user_msg, assistant = await _call(start_rows)
    except BaseException:
        if job is not None:
            job.cancel()
        raise

    async def events():
        text, tokens, finish, moderated = "", 0, None, None
        done = False
        try:
            yield sse({"type": "start", "user_message": user_msg, "assistant_message": assistant,
                       "dropped_messages": dropped})
            if flagged is not None:
                moderated = Moderated(0, flagged, svc.moderator.refusal_for(flagged), "input")
                text, finish = moderated.refusal, "content_filter"
            else:
                async for ev in moderated_events(svc.moderator, job):
                    if isinstance(ev, Delta):
                        text += ev.text
                        yield sse({"type": "delta", "content": ev.text})
                    elif isinstance(ev, Moderated):
                        moderated, text = ev, ev.refusal
                    elif isinstance(ev, Finish):
                        tokens, finish = ev.completion_tokens, ev.reason
                        if ev.reason == "error":
                            yield sse({"type": "error", "error": {"message": ev.error or "generation failed"}})
            if moderated is not None:
                await _call(record_moderation, svc, moderated,
                            "refused" if moderated.source == "input" else "replaced",
                            conversation_id=cid, message_id=assistant["id"])
                yield sse({"type": "moderation", "message_id": assistant["id"], "source": moderated.source,
                           "categories": list(moderated.result.flagged_categories), "refusal": moderated.refusal})
            final = await _call(st.update_message, assistant["id"], content=text, finish_reason=finish,
                                completion_tokens=tokens, moderated=moderated is not None)
            if moderated is not None:
                final["moderation"] = {"source": moderated.source,
                                       "categories": list(moderated.result.flagged_categories)}
            done = True
            conv_now = await _call(st.update_conversation, cid, owner=owner)  # bumps updated_at
            yield sse({"type": "done", "message": final, "conversation": conv_now})
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                # the page stopped the reply (or the client vanished): keep what was generated so far
                if job is not None and any(not c.done for c in job.choices):
                    job.cancel()
                try:
                    st.update_message(assistant["id"], content=text, finish_reason="stopped", completion_tokens=tokens)
                except Exception:
                    log.exception("could not save a stopped reply")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

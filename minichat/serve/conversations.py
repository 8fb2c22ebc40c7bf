"""OpenAI's Conversations API, and `conversation` in the Responses API.

    conv = client.conversations.create(items=[{"type": "message", "role": "user", "content": "I am Ada."}])
    r = client.responses.create(model="smollm2", conversation=conv.id, input="What is my name?")
    client.conversations.items.list(conv.id)        # the first message, this input, and r's output

A conversation is a list of Responses items (messages, function calls and their outputs) that belongs to the API
key that made it. A response created with `conversation` sees the conversation's items before its own input,
and its input and output items are then appended, so the next response continues from there (the Agents SDK's
sessions work this way). Items can also be added, read and deleted directly. Kept in the store (table
`api_conversations`) or, without one, in memory. Appends to one conversation are serialised within the server.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request

from minichat.serve.kept import MemoryRows
from minichat.serve.protocol import APIError, bad_request
from minichat.serve.responses import input_messages, page

MAX_ITEMS_PER_CALL = 20  # OpenAI's limit on items given at once
_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def _not_found(conv_id: str) -> APIError:
    return APIError(404, f"Conversation with id '{conv_id}' not found.", code="not_found")


def normalize_items(items: str | list[dict], param: str = "items") -> list[dict]:
    """Input items as stored: checked as the Responses API reads them, with ids, statuses and content parts."""
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    if not isinstance(items, list):
        raise bad_request(f"{param} must be a list of items", param=param)
    try:
        input_messages(items)  # the same checks (and errors) as a response's input
    except APIError as e:
        e.param = param
        raise
    out = []
    for it in items:
        it = dict(it)
        kind = it.setdefault("type", "message")
        it.setdefault("id", f"{_PREFIX[kind]}_{uuid.uuid4().hex}")
        if kind == "message":
            if isinstance(it.get("content"), str):
                part = "output_text" if it["role"] == "assistant" else "input_text"
                it["content"] = [{"type": part, "text": it["content"]}]
            it.setdefault("status", "completed")
        elif kind == "function_call":
            it.setdefault("status", "completed")
        out.append(it)
    return out


class ConversationStore:
    """Conversations per owner: in the server's store, or in memory without one."""

    def __init__(self, store=None):
        self.db = store
        self._mem = MemoryRows()  # (owner, body, items)
        self._appending: dict[str, asyncio.Lock] = {}

    async def put(self, body: dict, items: list[dict], owner: str | None) -> None:
        if self.db is not None:
            await asyncio.to_thread(self.db.put_api_conversation, body, items, owner)
        else:
            self._mem.put(body["id"], owner, body, items)

    async def get(self, conv_id: str, owner: str | None, param: str | None = None) -> tuple[dict, list[dict]]:
        from minichat.serve.store import NotFound

        found = None
        if self.db is not None:
            with contextlib.suppress(NotFound):
                found = await asyncio.to_thread(self.db.get_api_conversation, conv_id, owner)
        else:
            found = self._mem.get(conv_id, owner)
        if found is None:
            if param is not None:
                raise bad_request(f"Conversation with id '{conv_id}' not found.", param=param)
            raise _not_found(conv_id)
        return found

    async def delete(self, conv_id: str, owner: str | None) -> None:
        await self.get(conv_id, owner)
        if self.db is not None:
            await asyncio.to_thread(self.db.delete_api_conversation, conv_id, owner)
        else:
            self._mem.pop(conv_id)

    async def append(self, conv_id: str, owner: str | None, items: list[dict]) -> None:
        lock = self._appending.setdefault(conv_id, asyncio.Lock())
        async with lock:  # two responses finishing at once must not lose each other's items
            body, have = await self.get(conv_id, owner)
            await self.put(body, have + items, owner)


def conversation_id(value: Any) -> str | None:
    """The Responses API's `conversation`: an id, or {"id": ...}."""
    if value is None:
        return None
    cid = value.get("id") if isinstance(value, dict) else value
    if not isinstance(cid, str) or not cid:
        raise bad_request("conversation must be a conversation id or {\"id\": ...}", param="conversation")
    return cid


def router(convs: ConversationStore, owner_dep) -> APIRouter:
    r = APIRouter()

    def check_metadata(meta: Any) -> dict:
        if meta is None:
            return {}
        if not isinstance(meta, dict) or len(meta) > 16 or not all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in meta.items()):
            raise bad_request("metadata must be at most 16 string keys (64 characters) and string values (512)",
                              param="metadata")
        return meta

    async def body_of(request: Request) -> dict:
        from minichat.serve.app import read_json

        b = await read_json(request) if await request.body() else {}
        if not isinstance(b, dict):
            raise bad_request("the request body must be a JSON object")
        return b

    def limited(items: Any, param: str) -> list[dict]:
        if isinstance(items, list) and len(items) > MAX_ITEMS_PER_CALL:
            raise bad_request(f"at most {MAX_ITEMS_PER_CALL} items at once", param=param)
        return normalize_items(items, param)

    @r.post("/v1/conversations")
    async def create(request: Request, owner: str | None = Depends(owner_dep)):
        b = await body_of(request)
        items = limited(b.get("items") or [], "items")
        body = {"id": f"conv_{uuid.uuid4().hex}", "object": "conversation", "created_at": int(time.time()),
                "metadata": check_metadata(b.get("metadata"))}
        await convs.put(body, items, owner)
        return body

    @r.get("/v1/conversations/{conv_id}")
    async def get(conv_id: str, owner: str | None = Depends(owner_dep)):
        return (await convs.get(conv_id, owner))[0]

    @r.post("/v1/conversations/{conv_id}")
    async def update(conv_id: str, request: Request, owner: str | None = Depends(owner_dep)):
        b = await body_of(request)
        body, items = await convs.get(conv_id, owner)
        body["metadata"] = check_metadata(b.get("metadata"))
        await convs.put(body, items, owner)
        return body

    @r.delete("/v1/conversations/{conv_id}")
    async def delete(conv_id: str, owner: str | None = Depends(owner_dep)):
        await convs.delete(conv_id, owner)
        return {"id": conv_id, "object": "conversation.deleted", "deleted": True}

    @r.get("/v1/conversations/{conv_id}/items")
    async def list_items(conv_id: str, limit: int = 20, after: str | None = None, order: str = "desc",
                         owner: str | None = Depends(owner_dep)):
        return page((await convs.get(conv_id, owner))[1], order, limit, after)

    @r.post("/v1/conversations/{conv_id}/items")
    async def add_items(conv_id: str, request: Request, owner: str | None = Depends(owner_dep)):
        b = await body_of(request)
        if "items" not in b:
            raise bad_request("items is required", param="items", code="missing_required_parameter")
        items = limited(b["items"], "items")
        await convs.get(conv_id, owner)
        await convs.append(conv_id, owner, items)
        return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None, "has_more": False}

    @r.get("/v1/conversations/{conv_id}/items/{item_id}")
    async def get_item(conv_id: str, item_id: str, owner: str | None = Depends(owner_dep)):
        for it in (await convs.get(conv_id, owner))[1]:
            if it.get("id") == item_id:
                return it
        raise APIError(404, f"Item with id '{item_id}' not found.", code="not_found")

    @r.delete("/v1/conversations/{conv_id}/items/{item_id}")
    async def delete_item(conv_id: str, item_id: str, owner: str | None = Depends(owner_dep)):
        body, items = await convs.get(conv_id, owner)
        kept = [it for it in items if it.get("id") != item_id]
        if len(kept) == len(items):
            raise APIError(404, f"Item with id '{item_id}' not found.", code="not_found")
        await convs.put(body, kept, owner)
        return body

    return r

"""OpenAI's Responses API (POST /v1/responses) on top of the chat path.

A request is translated into a chat-completions request (`chat_request`): `instructions` become the system
message, `input` (a string, or message / function_call / function_call_output items) the conversation,
`previous_response_id` puts a stored response's conversation first, function `tools` and `tool_choice` are
rewritten in chat's nesting, `text.format` becomes `response_format` and `max_output_tokens`
`max_completion_tokens`; `truncation: "auto"` drops the oldest turns to fit the context window. The chat path
then renders, checks, generates and moderates as for
/v1/chat/completions, and `response_object` / `stream` give the answer in the Responses shape: output items
(a message with `output_text`, or a `refusal` part; `function_call` items), `status` "completed" or
"incomplete" with `incomplete_details.reason` "max_output_tokens" or "content_filter", and usage in
input / output tokens. Streaming sends the typed events (response.created, response.output_text.delta, ...,
response.completed) with sequence numbers.

Responses are kept (unless `store: false`), per API key, for `previous_response_id`, GET / DELETE
/v1/responses/{id} and GET /v1/responses/{id}/input_items: in the server's store (table `responses`), or in
memory without one (the last MAX_STORED).
"""
from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, AsyncIterator, Literal

from pydantic import ConfigDict, Field

from minichat import toolcall as tools
from minichat.serve.kept import MemoryRows
from minichat.serve.protocol import APIError, ChatCompletionRequest, _Req, bad_request, now, parse
from minichat.serve.worker import Delta, Finish

MAX_STORED = 1000
TEXT_PARTS = ("input_text", "output_text", "text")
# chat-completions parameter names a translated request's errors may name -> the Responses API's names
PARAM_NAMES = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format",
               "messages": "input", "tool_call_id": "input"}


class ResponsesRequest(_Req):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[dict] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | dict | None = None  # a Conversations API id: its items come before the input
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    tools: list[dict] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict | None = None
    stream: bool | None = False
    store: bool | None = True
    metadata: dict | None = None
    truncation: Literal["auto", "disabled"] | None = "disabled"  # auto: drop the oldest turns to fit the context


def parse_request(body: Any) -> ResponsesRequest:
    rr = parse(ResponsesRequest, body)
    if rr.input is None and rr.previous_response_id is None:
        raise bad_request("input is required", param="input", code="missing_required_parameter")
    if isinstance(rr.input, str) and not rr.input:
        raise bad_request("input must not be empty", param="input")
    return rr


def _text_of(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"input[{i}].content must be a string or a list of parts", param="input")
    out = []
    for p in content:
        if isinstance(p, dict) and p.get("type") == "refusal" and isinstance(p.get("refusal"), str):
            out.append(p["refusal"])  # an earlier answer's refusal, sent back as history
            continue
        if not isinstance(p, dict) or p.get("type") not in TEXT_PARTS or not isinstance(p.get("text"), str):
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise bad_request(f"input[{i}]: only text content parts are supported, got {kind!r}", param="input")
        out.append(p["text"])
    return "".join(out)


def input_messages(items: str | list[dict] | None) -> list[dict]:
    """The Responses `input` as chat messages: consecutive function_call items join one assistant message."""
    if items is None:
        return []
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    for i, it in enumerate(items):
        kind = it.get("type", "message") if isinstance(it, dict) else None
        if kind == "message":
            role = it.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(f"input[{i}].role must be user, assistant, system or developer, got {role!r}",
                                  param="input")
            out.append({"role": role, "content": _text_of(it.get("content"), i)})
        elif kind == "function_call":
            if not isinstance(it.get("name"), str) or not isinstance(it.get("call_id"), str):
                raise bad_request(f"input[{i}]: a function_call needs name and call_id", param="input")
            call = {"id": it["call_id"], "type": "function",
                    "function": {"name": it["name"], "arguments": it.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and not out[-1]["content"]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(it.get("call_id"), str):
                raise bad_request(f"input[{i}]: a function_call_output needs call_id", param="input")
            output = it.get("output")
            out.append({"role": "tool", "tool_call_id": it["call_id"],
                        "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise bad_request(f"input[{i}]: items of type {kind!r} are not supported (message, function_call, "
                              "function_call_output)", param="input")
    return out


def _chat_tools(rr: ResponsesRequest) -> tuple[list[dict] | None, Any]:
    """Responses' flat function tools and tool_choice -> chat's nested ones."""
    if not rr.tools:
        return None, rr.tool_choice
    out = []
    for i, t in enumerate(rr.tools):
        if t.get("type") != "function":
            raise bad_request(f"tools[{i}]: only function tools are supported, got {t.get('type')!r}", param="tools")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
        out.append({"type": "function", "function": fn})
    choice = rr.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return out, choice


def _response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request("text.format.type must be text, json_object or json_schema", param="text.format")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": spec}


def chat_request(rr: ResponsesRequest, history: list[dict]) -> ChatCompletionRequest:
    messages = ([{"role": "system", "content": rr.instructions}] if rr.instructions else []) + \
        history + input_messages(rr.input)
    chat_tools, choice = _chat_tools(rr)
    body = {"model": rr.model, "messages": messages, "max_completion_tokens": rr.max_output_tokens,
            "temperature": rr.temperature, "top_p": rr.top_p, "tools": chat_tools, "tool_choice": choice,
            "parallel_tool_calls": rr.parallel_tool_calls, "response_format": _response_format(rr.text)}
    # minichat's sampling extensions pass through (seed, dry_multiplier, min_tokens, ...)
    for k in ("seed", "dry_multiplier", "dry_base", "dry_allowed_length", "min_tokens", "presence_penalty",
              "frequency_penalty", "stop", "moderation"):
        if getattr(rr, k, None) is not None:
            body[k] = getattr(rr, k)
    try:
        return parse(ChatCompletionRequest, {k: v for k, v in body.items() if v is not None})
    except APIError as e:
        raise renamed(e) from None


def renamed(e: APIError) -> APIError:
    """An error of the chat path with the Responses API's parameter name."""
    if e.param is not None:
        e.param = PARAM_NAMES.get(e.param.split(".")[0], e.param)
    return e


# ---------------------------------------------------------------------------------------------- output

def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def output_items(choice: dict) -> list[dict]:
    """A finished chat choice as Responses output items."""
    if choice.get("tool_calls"):
        return [{"type": "function_call", "id": _item_id("fc"), "call_id": c["id"], "name": c["function"]["name"],
                 "arguments": c["function"]["arguments"], "status": "completed"} for c in choice["tool_calls"]]
    if choice["finish"] == "content_filter":
        part = {"type": "refusal", "refusal": choice["text"]}
    else:
        part = {"type": "output_text", "text": choice["text"], "annotations": []}
    status = "incomplete" if choice["finish"] in ("length", "content_filter") else "completed"
    return [{"type": "message", "id": _item_id("msg"), "status": status, "role": "assistant", "content": [part]}]


def _status(finish: str | None) -> tuple[str, dict | None]:
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


def _base(run, rr: ResponsesRequest, created: int) -> dict:
    """The fields a response repeats from its request."""
    return {"id": run.rid, "object": "response", "created_at": created, "model": run.m.name,
            "instructions": rr.instructions, "max_output_tokens": rr.max_output_tokens,
            "temperature": run.opts.temperature, "top_p": run.opts.top_p, "tools": rr.tools or [],
            "tool_choice": rr.tool_choice if rr.tool_choice is not None else ("auto" if rr.tools else "none"),
            "parallel_tool_calls": rr.parallel_tool_calls is not False, "text": rr.text or {"format": {"type": "text"}},
            "previous_response_id": rr.previous_response_id, "store": rr.store is not False,
            "conversation": {"id": rr.conversation if isinstance(rr.conversation, str) else rr.conversation.get("id")}
            if rr.conversation else None,
            "metadata": rr.metadata or {}, "error": None, "reasoning": {"effort": None, "summary": None},
            "truncation": rr.truncation or "disabled", "user": getattr(rr, "user", None)}


def response_object(run, rr: ResponsesRequest, choice: dict, completion_tokens: int,
                    created: int | None = None, items: list[dict] | None = None) -> dict:
    status, details = _status(choice["finish"])
    return {**_base(run, rr, created or now()), "status": status, "incomplete_details": details,
            "output": items if items is not None else output_items(choice),
            "usage": _usage(len(run.prompt_ids), completion_tokens)}


def _assistant_messages(choice: dict) -> list[dict]:
    """A response's answer as chat messages, to continue from it with previous_response_id."""
    if choice.get("tool_calls"):
        return [{"role": "assistant", "content": None, "tool_calls": choice["tool_calls"]}]
    return [{"role": "assistant", "content": choice["text"]}]


def input_items(body: dict, conversation: list[dict]) -> list[dict]:
    """A stored response's input as Responses items (what the model saw before its answer, without the
    instructions, which the response carries in its own field)."""
    convo = conversation[:-1]  # the last message is the response's own answer
    if convo and body.get("instructions") and convo[0] == {"role": "system", "content": body["instructions"]}:
        convo = convo[1:]
    items, base = [], body["id"].removeprefix("resp_")
    for k, m in enumerate(convo):
        iid = f"{base}_{k}"
        if m["role"] == "tool":
            items.append({"type": "function_call_output", "id": f"fco_{iid}", "call_id": m.get("tool_call_id"),
                          "output": m.get("content") or ""})
        elif m.get("tool_calls"):
            items += [{"type": "function_call", "id": f"fc_{iid}_{j}", "call_id": c.get("id"),
                       "name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}",
                       "status": "completed"} for j, c in enumerate(m["tool_calls"])]
        else:
            kind = "output_text" if m["role"] == "assistant" else "input_text"
            part = {"type": kind, "text": m.get("content") or ""}
            if kind == "output_text":
                part["annotations"] = []
            items.append({"type": "message", "id": f"msg_{iid}", "role": m["role"], "status": "completed",
                          "content": [part]})
    return items


def page(items: list[dict], order: str, limit: int, after: str | None, max_limit: int = 100) -> dict:
    """OpenAI's list object over items (oldest first): newest first unless order is asc, `limit` of them after
    the item `after`."""
    if order not in ("asc", "desc"):
        raise bad_request("order must be asc or desc", param="order")
    if not 1 <= limit <= max_limit:
        raise bad_request(f"limit must be in 1..{max_limit}", param="limit")
    seq = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [x["id"] for x in seq]
        if after not in ids:
            raise bad_request(f"no item {after!r} in this list", param="after")
        seq = seq[ids.index(after) + 1:]
    data = seq[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(seq) > limit}


class ResponseStore:
    """Responses kept for previous_response_id and GET / DELETE /v1/responses/{id}, each visible only to the API
    key that made it: in the server's store (SQLite or PostgreSQL, table `responses`) when it has one, else in
    memory (the last `limit`, lost on restart)."""

    def __init__(self, store=None, limit: int = MAX_STORED):
        self.db = store
        self._mem = MemoryRows(limit)

    async def put(self, body: dict, messages_in: list[dict], choice: dict, owner: str | None) -> None:
        convo = list(messages_in) + _assistant_messages(choice)
        if self.db is not None:
            await asyncio.to_thread(self.db.put_response, body, convo, owner)
            return
        self._mem.put(body["id"], owner, body, convo)

    async def _find(self, rid: str, owner: str | None, param: str | None = None) -> tuple[dict, list[dict]]:
        from minichat.serve.store import NotFound

        found = None
        if self.db is not None:
            try:
                found = await asyncio.to_thread(self.db.get_response, rid, owner)
            except NotFound:
                pass
        else:
            found = self._mem.get(rid, owner)
        if found is None:
            if param is not None:
                raise bad_request(f"Previous response with id '{rid}' not found.", param=param)
            raise APIError(404, f"Response with id '{rid}' not found.", code="not_found")
        return found

    async def history(self, rid: str, owner: str | None) -> list[dict]:
        """The stored conversation up to and including that response's answer (its system message left out:
        instructions are not carried over, as OpenAI's are not)."""
        return [m for m in (await self._find(rid, owner, "previous_response_id"))[1] if m["role"] != "system"]

    async def get(self, rid: str, owner: str | None) -> dict:
        return (await self._find(rid, owner))[0]

    async def inputs(self, rid: str, owner: str | None) -> list[dict]:
        return input_items(*await self._find(rid, owner))

    async def delete(self, rid: str, owner: str | None) -> None:
        await self._find(rid, owner)
        if self.db is not None:
            await asyncio.to_thread(self.db.delete_response, rid, owner)
            return
        self._mem.pop(rid)


# ---------------------------------------------------------------------------------------------- streaming

class _Events:
    def __init__(self):
        self.n = 0

    def __call__(self, kind: str, **fields) -> str:
        obj = {"type": kind, "sequence_number": self.n, **fields}
        self.n += 1
        return f"event: {kind}\ndata: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream(svc, run, rr: ResponsesRequest, request, saved: ResponseStore | None, owner: str | None,
                 events: AsyncIterator, on_moderated=None, on_done=None) -> AsyncIterator[str]:
    """The Responses event stream of a run: text as it comes (a reply that may still become a tool call is held
    back, and its calls are sent whole); a reply flagged while streaming gets a refusal part after the text
    already sent, and `on_moderated` (async) records the verdict."""
    ev = _Events()
    created = now()
    yield ev("response.created", response={**_base(run, rr, created), "status": "in_progress",
                                           "incomplete_details": None, "output": [], "usage": None})
    yield ev("response.in_progress", response={**_base(run, rr, created), "status": "in_progress",
                                               "incomplete_details": None, "output": [], "usage": None})
    msg_id = _item_id("msg")
    text, held, refusal = "", "" if run.functions else None, None
    started = False
    finish, tokens = None, 0

    def open_message():
        return [ev("response.output_item.added", output_index=0,
                   item={"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}),
                ev("response.content_part.added", item_id=msg_id, output_index=0, content_index=0,
                   part={"type": "output_text", "text": "", "annotations": []})]

    if run.refusal is not None:
        refusal, finish = run.refusal.refusal, "content_filter"
    async for e in events:
        if isinstance(e, Delta):
            piece = e.text
            if held is not None:
                held += piece
                if tools.may_be_call(held):
                    continue
                piece, held = held, None  # plain text after all
            if not started:
                started = True
                for x in open_message():
                    yield x
            text += piece
            if piece:
                yield ev("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0, delta=piece)
        elif isinstance(e, Finish):
            if e.reason == "error":
                yield ev("error", code="server_error", message=e.error or "generation failed", param=None)
                return
            finish, tokens = e.reason, e.completion_tokens
        else:  # Moderated: the output was flagged
            refusal, finish = e.refusal, "content_filter"
            if on_moderated is not None:
                await on_moderated(e)  # the audit record, as for chat completions
    choice = {"text": text, "finish": finish}
    calls = None
    if held is not None and finish in ("stop", "length"):
        calls = tools.parse_calls(held, run.functions, cut=finish == "length")
        if calls:
            choice["tool_calls"] = calls
        else:  # not a call after all: the held text is the reply
            if not started:
                started = True
                for x in open_message():
                    yield x
            if held:
                yield ev("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0, delta=held)
            text += held
            choice["text"] = text
    items: list[dict] = []
    if calls:
        for k, c in enumerate(calls):
            item = {"type": "function_call", "id": _item_id("fc"), "call_id": c["id"], "name": c["function"]["name"],
                    "arguments": "", "status": "in_progress"}
            yield ev("response.output_item.added", output_index=k, item=item)
            args = c["function"]["arguments"]
            yield ev("response.function_call_arguments.delta", item_id=item["id"], output_index=k, delta=args)
            yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=k, arguments=args)
            item = {**item, "arguments": args, "status": "completed"}
            yield ev("response.output_item.done", output_index=k, item=item)
            items.append(item)
    else:
        status = "incomplete" if finish in ("length", "content_filter") else "completed"
        parts = []
        if started:
            part = {"type": "output_text", "text": text, "annotations": []}
            yield ev("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=text)
            yield ev("response.content_part.done", item_id=msg_id, output_index=0, content_index=0, part=part)
            parts.append(part)
        elif refusal is None:  # an empty reply: still one message with an empty text part
            for x in open_message():
                yield x
            part = {"type": "output_text", "text": "", "annotations": []}
            yield ev("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text="")
            yield ev("response.content_part.done", item_id=msg_id, output_index=0, content_index=0, part=part)
            parts.append(part)
            started = True
        if refusal is not None:
            if not started:
                yield ev("response.output_item.added", output_index=0, item={
                    "type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []})
            k = len(parts)
            yield ev("response.content_part.added", item_id=msg_id, output_index=0, content_index=k,
                     part={"type": "refusal", "refusal": ""})
            yield ev("response.refusal.delta", item_id=msg_id, output_index=0, content_index=k, delta=refusal)
            yield ev("response.refusal.done", item_id=msg_id, output_index=0, content_index=k, refusal=refusal)
            part = {"type": "refusal", "refusal": refusal}
            yield ev("response.content_part.done", item_id=msg_id, output_index=0, content_index=k, part=part)
            parts.append(part)
            choice["text"] = refusal if not text else text + "\n\n" + refusal
        item = {"type": "message", "id": msg_id, "status": status, "role": "assistant", "content": parts}
        yield ev("response.output_item.done", output_index=0, item=item)
        items.append(item)
    body = response_object(run, rr, choice, tokens, created, items)
    if saved is not None:
        await saved.put(body, run.messages_in, choice, owner)
    if on_done is not None:  # e.g. the conversation gets the input and output items
        await on_done(body)
    yield ev("response.completed" if body["status"] == "completed" else "response.incomplete", response=body)

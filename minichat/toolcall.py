"""Tool calling: OpenAI's `tools` and `tool_choice` in ChatML, for the server's prompts and for SFT data.

The tools are described in the system message, and calls and their results are written in the ChatML
convention of Hermes and Qwen2.5 (a model fine-tuned on that convention calls tools as it learned):

    system:    ... # Tools ... <tools>{"type": "function", "function": {...}}</tools> ... <tool_call> ...
    assistant: <tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>
    user:      <tool_response>\\n{"temp": 21}\\n</tool_response>

The reply is sampled under a grammar (minichat.constrain): with tool_choice "required" or a named function, a
call of one of the tools (its name and arguments of its `parameters` schema) is the only possible reply; with
"auto" the reply is free text unless it begins "<tool_call>", and then it must be a valid call; "none" leaves
the tools out. A reply of calls becomes `message.tool_calls` with finish_reason "tool_calls": one call, or
several, one per line, unless the request sets parallel_tool_calls to false.

SFT rows may carry the same fields (`{"tools": [...], "messages": [... tool_calls ..., {"role": "tool"}]}`):
they are rendered by the same prompt_messages, so a model fine-tuned on them sees at serving time the prompts
it was trained on.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from minichat.constrain import JSONGrammar, SchemaError, TextOrGrammar, TokenVocab

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_BLOCK = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


class ToolError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_tools(tools: list[Any] | None, tool_choice: Any) -> list[dict]:
    """The function definitions of `tools`, validated; and `tool_choice` checked against them."""
    out = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ToolError("tools", f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        f = t["function"]
        if not isinstance(f.get("name"), str) or not _NAME.match(f["name"]):
            raise ToolError("tools", f"tools[{i}].function.name must be 1-64 letters, digits, _ or -")
        params = f.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise ToolError("tools", f"tools[{i}].function.parameters must be the JSON Schema of an object")
        out.append(f)
    names = [f["name"] for f in out]
    if len(set(names)) != len(names):
        raise ToolError("tools", "tool names must be unique")
    if tool_choice is None or tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not out:
            raise ToolError("tool_choice", "tool_choice \"required\" needs tools")
        return out
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in names:
            raise ToolError("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
        return out
    raise ToolError("tool_choice", "tool_choice must be \"none\", \"auto\", \"required\" or "
                                   "{\"type\": \"function\", \"function\": {\"name\": ...}}")


def check_message(m: dict) -> None:
    """A chat message's tool fields: tool_calls only on an assistant message, each naming a function; a tool
    message answers a call (raises ToolError)."""
    calls = m.get("tool_calls")
    if calls and m.get("role") != "assistant":
        raise ToolError("tool_calls", "only assistant messages carry tool_calls")
    for c in calls or []:
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ToolError("tool_calls", "each tool call needs function.name and function.arguments")


def call_schema(functions: list[dict]) -> dict:
    """The JSON Schema of one call of any of these functions."""
    alts = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
             "properties": {"name": {"const": f["name"]},
                            # no parameters: the call takes none (a free object would let the model invent some)
                            "arguments": f.get("parameters") or {"const": {}}}} for f in functions]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def grammar(vocab: TokenVocab, functions: list[dict], tool_choice: Any, parallel: bool = True):
    """The grammar of the reply, or None (tool_choice "none", or no tools). parallel: one call or more, each
    in its own tags on a new line (OpenAI's parallel_tool_calls, true unless a request says false)."""
    if not functions or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        functions = [f for f in functions if f["name"] == tool_choice["function"]["name"]]
    try:
        g = JSONGrammar(vocab, call_schema(functions), prefix=OPEN, suffix=CLOSE, repeat="\n" if parallel else None)
    except SchemaError as e:
        raise ToolError("tools", f"a tool's parameters: {e}") from None
    return g if tool_choice == "required" or isinstance(tool_choice, dict) else TextOrGrammar(g)


def system_block(functions: list[dict]) -> str:
    lines = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return ("# Tools\n\nYou may call one or more of these functions to answer the user. Their signatures are within "
            f"<tools></tools> XML tags:\n<tools>\n{lines}\n</tools>\n\nTo call a function, reply with a JSON "
            "object of its name and arguments within <tool_call></tool_call> XML tags:\n"
            "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")


def prompt_messages(messages: list[dict], functions: list[dict], tool_choice: Any,
                    default_system: str | None) -> list[dict]:
    """Chat messages as the model reads them: tool calls and results in text, the tools in the system message.
    `messages` are request messages as dicts (role, content, and tool_calls / tool_call_id where given)."""
    out = []
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                f = c.get("function") or {}
                try:
                    args = json.loads(f.get("arguments") or "{}")
                except ValueError:
                    args = f.get("arguments")
                calls.append(OPEN + json.dumps({"name": f.get("name"), "arguments": args}, ensure_ascii=False) + CLOSE)
            text = (m.get("content") or "")
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + "\n".join(calls)})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    if functions and tool_choice != "none":
        block = system_block(functions)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": out[0]["content"] + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": ((default_system + "\n\n") if default_system else "") + block})
    return out


def parse_calls(text: str, functions: list[dict], cut: bool = False) -> list[dict] | None:
    """OpenAI tool calls from a reply made only of calls, else None. cut: the reply ended at max_tokens; its
    complete calls count, and what follows them may only be the start of another call (dropped). A small model
    often adds a second call (a repeat of the first) and runs out of tokens in it."""
    blocks = _BLOCK.findall(text)
    end = _last_end(text)
    tail = text[end:].strip()
    if not blocks or _BLOCK.sub("", text[:end]).strip() or (tail and not (cut and may_be_call(tail))):
        return None
    names = {f["name"] for f in functions}
    calls = []
    for b in blocks:
        try:
            call = json.loads(b)
        except ValueError:
            return None
        if not isinstance(call, dict) or call.get("name") not in names:
            return None
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}})
    return calls


def _last_end(text: str) -> int:
    ends = [m.end() for m in _BLOCK.finditer(text)]
    return ends[-1] if ends else 0


def may_be_call(text: str) -> bool:
    """Whether a reply that has begun so may still turn out to be a call (streaming holds it back meanwhile)."""
    head = text.lstrip()
    return head.startswith("<tool_call>") or "<tool_call>".startswith(head)

"""The OpenAI wire format: request validation, error bodies, and response/chunk shapes.

Requests are validated with pydantic; any problem becomes HTTP 400 with OpenAI's error body and `param`
naming the offending field, so OpenAI clients raise BadRequestError (never a retried 5xx).
Unknown request fields are ignored (clients send extras such as `user` or `metadata`), but fields that
would silently change the meaning of a request (legacy `functions`, non-text content parts) are refused.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

MAX_STOP = 4  # as OpenAI: up to four stop sequences
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error to send as OpenAI's body {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class ParamError(ValueError):
    """Raised inside a model validator to name the field at fault (pydantic gives those errors no location)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as a 400 whose `param` is the dotted field path (e.g. messages.0.role)."""
    err = e.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ParamError):
        return bad_request(str(cause), param=cause.param, code="invalid_value")
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    # pydantic puts the union member tried into loc (e.g. 'str', 'list[...]'); keep only real field names
    loc = [p for p in loc if not any(ch in p for ch in "[]") and p not in ("str", "int", "list", "function-after")]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return bad_request(f"{param}: {msg}" if param else msg, param=param,
                       code="invalid_value" if err.get("type") != "missing" else "missing_required_parameter")


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _tool_fields(self):
        from minichat.toolcall import ToolError, check_message

        if self.role == "tool" and not self.tool_call_id:
            raise ParamError("tool_call_id", "a message with role \"tool\" needs tool_call_id")
        try:
            check_message({"role": self.role, "tool_calls": self.tool_calls})
        except ToolError as e:
            raise ParamError(e.param, str(e)) from None
        return self

    def as_dict(self) -> dict:
        d = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            d["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            d["tool_call_id"] = self.tool_call_id
        return d

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list):
            for p in v:
                if p.type != "text" or p.text is None:
                    raise ValueError(f"only text content parts are supported, got type {p.type!r}")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ModerationPolicyPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    mode: Literal["score", "block"] = "block"


class ModerationPolicy(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: ModerationPolicyPart | None = None
    output: ModerationPolicyPart | None = None


class ModerationParam(BaseModel):
    """OpenAI's moderated-completions request field: {"model", "policy": {"input": {"mode"}, "output": {"mode"}}}.
    "block" (the default) replaces flagged text with a refusal; "score" only reports the verdicts."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    policy: ModerationPolicy | None = None

    def mode(self, part: str) -> str:
        p = getattr(self.policy, part, None) if self.policy else None
        return p.mode if p is not None else "block"


class _Sampling(_Req):
    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    moderation: ModerationParam | None = None
    min_tokens: int | None = Field(default=None, ge=0)  # vLLM's extension: no end-of-turn before this many
    # llama.cpp server's DRY extension (minichat.engine.dry_penalty); chat completions default to the server's
    # dry_multiplier, 0 turns it off
    dry_multiplier: float | None = Field(default=None, ge=0.0, le=10.0)
    dry_base: float | None = Field(default=None, gt=1.0, le=4.0)
    dry_allowed_length: int | None = Field(default=None, ge=1)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return None
        items = [v] if isinstance(v, str) else list(v)
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(items)}")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty")
        return items

    @model_validator(mode="after")
    def _common(self):
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "stream_options is only allowed when stream is true")
        if self.logit_bias:
            for k, v in self.logit_bias.items():
                if not k.strip().lstrip("-").isdigit():
                    raise ParamError("logit_bias", f"logit_bias keys must be token ids, got {k!r}")
                if not -100.0 <= v <= 100.0:
                    raise ParamError("logit_bias", f"logit_bias values must be in [-100, 100], got {v}")
        return self

    def token_bias(self) -> dict[int, float] | None:
        return {int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias else None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None  # "none" | "auto" (the default with tools) | "required" | {"type": "function", ...}
    parallel_tool_calls: bool | None = None  # false: at most one call per reply
    functions: list[Any] | None = None
    response_format: dict | None = None
    _functions: list = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.functions:
            raise ParamError("functions", "the legacy functions field is not supported: use tools")
        from minichat.toolcall import ToolError, check_tools

        try:
            self._functions = check_tools(self.tools, self.tool_choice)
        except ToolError as e:
            raise ParamError(e.param, str(e)) from None
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind not in ("text", "json_object", "json_schema"):
                raise ParamError("response_format", "response_format type must be text, json_object or json_schema")
            spec = rf.get("json_schema")
            if kind == "json_schema" and (not isinstance(spec, dict) or not isinstance(spec.get("name"), str)
                                          or not isinstance(spec.get("schema", {}), dict)):
                raise ParamError("response_format", "a json_schema response_format needs json_schema.name and "
                                                    "json_schema.schema (an object)")
            if kind != "text" and self._functions and self.tool_choice != "none":
                raise ParamError("response_format", "a JSON response_format together with tools is not supported")
        return self

    @property
    def functions_in_use(self) -> list[dict]:
        """The tools' function definitions when the reply may call one (not with tool_choice "none")."""
        return self._functions if self.tool_choice != "none" else []


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # the legacy endpoint's default, as OpenAI's
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion(self):
        if self.suffix:
            raise ParamError("suffix", "suffix (fill-in-the-middle) is not supported by this server")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ParamError("best_of", "best_of other than n is not supported by this server")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ParamError("prompt", "prompt must not be empty")
        return self


class ModerationRequest(_Req):
    input: str | list[str]
    model: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("input must not be an empty list")
        return v


class TokenizeRequest(_Req):
    """vLLM's /tokenize: a prompt as is, or chat messages as the template renders them."""
    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("prompt", "give either prompt or messages")
        if self.messages is not None and not self.messages:
            raise ParamError("messages", "messages must not be empty")
        return self


class DetokenizeRequest(_Req):
    model: str = Field(min_length=1)
    tokens: list[int]


MAX_EMBEDDING_INPUTS = 2048  # texts per request, as OpenAI's limit


class EmbeddingRequest(_Req):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("input must not be an empty list")
        items = [v] if isinstance(v, str) or isinstance(v[0], int) else v
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input may hold at most {MAX_EMBEDDING_INPUTS} texts, got {len(items)}")
        for i, x in enumerate(items):
            if not x:  # OpenAI refuses an empty string too: it has no tokens to embed
                raise ValueError(f"input {i} is empty")
        return v


def parse(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    return req


# ---------------------------------------------------------------------------------------------- options

@dataclass
class GenOptions:
    """What one generation request asks for, independent of the wire format (the worker maps it to the engine)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    min_tokens: int = 0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    logit_bias: dict[int, float] | None = None
    grammar: Any = None  # minichat.constrain.JSONGrammar for response_format json_object / json_schema


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def install_error_handlers(app, log) -> None:
    """Every error of a FastAPI app in OpenAI's shape, with the right status; a client's mistake is never a 500.
    Shared by the API server and the standalone labeling app."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from minichat.errors import MinichatError

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(MinichatError)
    async def _minichat_error(request: Request, e: MinichatError):
        # raised by lower layers (engine, tokenizer, moderation, store) about what the client sent
        from minichat.serve.store import NotFound

        status = 404 if isinstance(e, NotFound) else 400
        return JSONResponse(APIError(status, str(e)).body(), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"Unknown route {request.method} {request.url.path}.", 405: "Method not allowed."}.get(
            e.status_code, str(e.detail))
        return JSONResponse(APIError(e.status_code, msg).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        return JSONResponse(APIError(400, f"{param}: {err.get('msg', 'invalid')}", param=param).body(), 400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(APIError(500, "The server had an error while processing your request.",
                                     type="server_error").body(), status_code=500)

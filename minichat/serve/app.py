"""`minichat serve`: the OpenAI-compatible HTTP API, the web chat page, and the conversation store.

Endpoints: POST /v1/chat/completions, POST /v1/responses (+ GET / DELETE /v1/responses/{id} and GET
/v1/responses/{id}/input_items; responses.py), /v1/conversations (conversations.py), POST /v1/completions,
POST /v1/embeddings, GET /v1/models, GET /v1/models/{id}, POST /v1/moderations, /v1/files and /v1/batches
(batches.py), /v1/fine_tuning/jobs (finetune.py), POST /tokenize and /detokenize (vLLM's), GET /health,
GET /metrics (metrics.py); the web chat at / (static page) with its JSON API under /api.
Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 invalid parameters or a
context overflow, 401 bad API key, 404 unknown model or route, 429 overloaded or over a rate limit (with
Retry-After).
A client's mistake is never answered with a 5xx (OpenAI clients retry those).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from minichat import toolcall as tools
from minichat.constrain import JSONGrammar
from minichat.errors import MinichatError
from minichat.serve.config import ServeConfig
from minichat.serve.generation import (
    Moderated, cancel_on_disconnect, check_input, moderated_events, results_block, summary,
)
from minichat.serve.models import ModelRegistry, ServedModel
from minichat.serve.protocol import (
    APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, GenOptions,
    ModerationRequest, TokenizeRequest, bad_request, install_error_handlers, new_id, now, parse, usage,
)
from minichat.serve.worker import Delta, Job, Overloaded

log = logging.getLogger("minichat.serve")
STATIC = Path(__file__).with_name("static")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Services:
    cfg: ServeConfig
    models: ModelRegistry
    store: Any | None = None  # minichat.serve.store.Store
    moderator: Any | None = None  # minichat.moderation.Moderator
    started: float = 0.0
    metrics: Any | None = None  # minichat.serve.metrics.ServerMetrics (None: --metrics false)
    limiter: Any | None = None  # minichat.serve.ratelimit.RateLimiter (None: no rate limits)

    @property
    def fingerprint(self) -> str:
        from minichat import __version__

        return f"minichat-{__version__}"


# ---------------------------------------------------------------------------------------------- helpers

# Dependencies are `async def` although they never wait: FastAPI runs a plain `def` dependency in a worker
# thread, a thread hop per request for microseconds of work.
async def services(request: Request) -> Services:
    return request.app.state.services


async def require_key(request: Request) -> str | None:
    """Bearer API key check (when keys are configured); returns a short fingerprint of the key (the store's
    owner of web conversations), or None when the server has no keys."""
    from minichat.serve.batches import internal_request

    internal, owner = internal_request(request)
    if internal:  # a batch line, sent by the app's own runner for the batch's owner
        request.state.internal = True
        return owner
    keys = request.app.state.api_keys
    if not keys:
        return None
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    for k in keys:
        if token and hmac.compare_digest(token.encode(), k.encode()):
            return hashlib.sha256(k.encode()).hexdigest()[:16]
    raise APIError(401, "Incorrect API key provided." if token else
                   "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                   code="invalid_api_key")


async def rate_limit(request: Request, owner: str | None = Depends(require_key)) -> str | None:
    """require_key, then one request from the caller's rate-limit bucket (429 when empty); returns the owner."""
    lim = request.app.state.services.limiter
    if lim is not None and not getattr(request.state, "internal", False):  # a batch's lines are not limited
        key = owner or f"ip:{request.client.host if request.client else 'unknown'}"
        lim.admit(key)
        request.state.ratelimit_key = key
    return owner


def charge_tokens(request: Request, prompt_tokens: int, jobs: list[Job] = ()) -> None:
    """Charge the caller's token bucket: the prompt now, each job's generated tokens when it ends."""
    lim = request.app.state.services.limiter
    key = getattr(request.state, "ratelimit_key", None)
    if lim is None or key is None:
        return
    lim.charge(key, prompt_tokens)
    for job in jobs:
        job.add_done_callback(lambda j: lim.charge(key, sum(c.tokens for c in j.choices)))


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None


def submit(svc: Services, m: ServedModel, prompt_ids: list[int], opts: GenOptions) -> Job:
    from minichat.engine import ContextOverflowError

    try:
        return m.worker.submit(prompt_ids, opts)
    except Overloaded as e:
        raise APIError(429, str(e), type="requests", code="rate_limit_exceeded",
                       headers={"Retry-After": str(svc.cfg.retry_after)}) from None
    except ContextOverflowError as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _opts(svc: Services, m: ServedModel, prompt_len: int, *, max_tokens: int | None, default_max: int,
          req, logprobs: bool, top_logprobs: int, dry_default: float = 0.0) -> GenOptions:
    n = req.n or 1
    if n > svc.cfg.max_n:
        raise bad_request(f"n must be at most {svc.cfg.max_n} on this server, got {n}", param="n")
    room = m.context_len - prompt_len
    mt = min(max_tokens if max_tokens is not None else default_max, room)
    return GenOptions(
        max_tokens=max(1, mt),
        temperature=m.sampling.get("temperature", 1.0) if req.temperature is None else req.temperature,
        top_p=m.sampling.get("top_p", 1.0) if req.top_p is None else req.top_p, n=n, stop=list(req.stop or []),
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        logprobs=logprobs, top_logprobs=top_logprobs, min_tokens=req.min_tokens or 0,
        dry_multiplier=dry_default if req.dry_multiplier is None else req.dry_multiplier, logit_bias=req.token_bias(),
        **{k: getattr(req, k) for k in ("dry_base", "dry_allowed_length") if getattr(req, k) is not None})


def _top_p_ok(req) -> None:
    # the engine samples from a non-empty nucleus only; OpenAI accepts 0 and treats it as greedy-like
    if req.top_p is not None and req.top_p == 0.0:
        req.top_p = 1e-6


def record_moderation(svc: Services, mod: Moderated, action: str, *, request_id: str | None = None,
                      conversation_id: str | None = None, message_id: str | None = None) -> None:
    """Count a flagged verdict, and keep it in the store (blocking: call from a thread when on the event loop)."""
    _count_moderation(svc, mod, action)
    if svc.store is None:
        return
    r = mod.result
    try:
        svc.store.record_moderation(source=mod.source, flagged=True, action=action,
                                    categories=r.flagged_categories,
                                    scores={c: round(s, 4) for c, s in r.category_scores.items() if s >= 0.01},
                                    rules=r.fired_rules, request_id=request_id, conversation_id=conversation_id,
                                    message_id=message_id)
    except Exception:  # bookkeeping must not fail the reply
        log.exception("could not record a moderation decision")


def _count_moderation(svc: Services, mod: Moderated, action: str) -> None:
    if svc.metrics is not None:
        r = mod.result
        svc.metrics.moderated(mod.source, action, list(r.flagged_categories) if r is not None else [])


async def _record_moderation(svc: Services, mod: Moderated, request_id: str, action: str) -> None:
    if svc.store is not None:
        await asyncio.to_thread(record_moderation, svc, mod, action, request_id=request_id)
    else:
        _count_moderation(svc, mod, action)


# ---------------------------------------------------------------------------------------------- app

def create_app(cfg: ServeConfig, models: ModelRegistry, store=None, moderator=None) -> FastAPI:
    svc = Services(cfg, models, store, moderator)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.started = time.time()
        models.start()
        try:
            await batch_runner.resume()
            await tuner.start()
            yield
        finally:
            await tuner.stop()
            await batch_runner.stop()
            models.stop()

    app = FastAPI(title="minichat", version=svc.fingerprint, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.services = svc
    if cfg.rate_limit_rpm or cfg.rate_limit_tpm:
        from minichat.serve.ratelimit import RateLimiter, RateLimitHeaders

        svc.limiter = RateLimiter(cfg.rate_limit_rpm, cfg.rate_limit_tpm)
        app.add_middleware(RateLimitHeaders, limiter=svc.limiter)
    if cfg.metrics:
        from minichat.serve.metrics import CONTENT_TYPE, HTTPCounter, ServerMetrics

        svc.metrics = ServerMetrics(lambda: {n: m.worker for n, m in models.models.items()})

        def observe(m) -> None:
            m.worker.observer = lambda job, name=m.name: svc.metrics.job_done(job, name)

        for m in models.models.values():
            observe(m)
        models.on_add.append(observe)
        app.add_middleware(HTTPCounter, metrics=svc.metrics)

        @app.get("/metrics", include_in_schema=False)
        async def metrics():
            return Response(svc.metrics.render(), media_type=CONTENT_TYPE)
    app.state.api_keys = cfg.all_api_keys()

    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in cfg.cors_origins,
                           expose_headers=["Retry-After", *(f"x-ratelimit-{a}-{b}" for a in ("limit", "remaining", "reset")
                                                            for b in ("requests", "tokens"))])

    install_error_handlers(app, log)  # errors, all in OpenAI's shape

    from minichat.serve import batches as batch_api

    batch_files = batch_api.BatchFiles(store)
    batch_runner = batch_api.BatchRunner(app, batch_files,  # half the rows by default: live requests keep short steps
                                         cfg.batch_concurrency or max(1, cfg.engine.max_batch // 2), cfg.batch_max_lines)
    app.state.batch_runner = batch_runner
    app.include_router(batch_api.router(batch_files, batch_runner, require_key, cfg.max_file_mb * 2**20))
    from minichat.serve import finetune as ft_api

    ft_jobs = ft_api.JobStore(store)
    tuner = ft_api.FineTuner(ft_jobs, batch_files, models, cfg.engine,
                             Path(cfg.fine_tune_dir).expanduser() if cfg.fine_tune_dir else ft_api.default_dir(),
                             cfg.fine_tune_threads)
    app.include_router(ft_api.router(ft_jobs, tuner, batch_files, models, require_key))

    # ---------------------------------------------------------------- plain endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok", "uptime_s": round(time.time() - svc.started, 1),
                "models": {n: m.worker.stats() for n, m in models.models.items()},
                "moderation": moderator is not None, "store": store is not None}

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def list_models():
        return {"object": "list", "data": [m.info() for m in models.models.values()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_key)])
    async def get_model(model_id: str):
        return models.get(model_id).info()

    @app.post("/v1/moderations", dependencies=[Depends(rate_limit)])
    async def moderations(request: Request):
        req = parse(ModerationRequest, await read_json(request))
        if moderator is None:
            raise APIError(404, "moderation is turned off on this server", code="moderation_disabled")
        from minichat.moderation import moderation_response

        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        results = await moderator.acheck_many(texts, source="api")
        return moderation_response(results)

    @app.post("/v1/embeddings", dependencies=[Depends(rate_limit)])
    async def embeddings(request: Request):
        req: EmbeddingRequest = parse(EmbeddingRequest, await read_json(request))
        m = models.get(req.model)
        seqs = _prompts(m, req.input, param="input")
        for ids in seqs:
            if len(ids) >= m.context_len:
                raise bad_request(f"This model's maximum context length is {m.context_len} tokens, but an input has "
                                  f"{len(ids)} tokens; shorten the input.", param="input",
                                  code="context_length_exceeded")
        width = m.worker.engine.cfg.d_model
        if req.dimensions is not None and req.dimensions > width:
            raise bad_request(f"dimensions must be at most this model's {width}", param="dimensions")
        charge_tokens(request, sum(map(len, seqs)))
        vecs = await asyncio.to_thread(m.embed, seqs, cfg.embedding_pooling)
        if req.dimensions is not None:  # shortened as OpenAI's text-embedding-3 allow: the first ones, renormed
            import torch

            vecs = torch.nn.functional.normalize(vecs[:, :req.dimensions], dim=-1)
        data = []
        for i, v in enumerate(vecs.numpy()):
            if req.encoding_format == "base64":  # little-endian float32, as the openai client decodes it
                emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
            else:
                emb = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(map(len, seqs))
        return {"object": "list", "data": data, "model": m.name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/tokenize", dependencies=[Depends(require_key)])
    async def tokenize(request: Request):
        """vLLM's token counting: a prompt's ids, or the ids of chat messages as the model's template renders them."""
        req: TokenizeRequest = parse(TokenizeRequest, await read_json(request))
        m = models.get(req.model)
        if req.messages is not None:
            try:
                ids, _ = m.tokenizer.render_chat([x.as_dict() for x in req.messages],
                                                 add_generation_prompt=req.add_generation_prompt)
            except MinichatError as e:
                raise bad_request(str(e), param="messages") from None
        else:
            ids = m.encode(req.prompt)
        return {"count": len(ids), "max_model_len": m.context_len, "tokens": ids}

    @app.post("/detokenize", dependencies=[Depends(require_key)])
    async def detokenize(request: Request):
        req: DetokenizeRequest = parse(DetokenizeRequest, await read_json(request))
        m = models.get(req.model)
        V = m.tokenizer.vocab_size
        if any(not 0 <= t < V for t in req.tokens):
            raise bad_request(f"token ids must be in 0..{V - 1}", param="tokens")
        return {"prompt": m.tokenizer.decode(req.tokens)}

    # ---------------------------------------------------------------- chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, owner: str | None = Depends(rate_limit)):
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(request))
        run = await _start_chat(svc, req, new_id("chatcmpl"))
        charge_tokens(request, len(run.prompt_ids), [run.job] if run.job is not None else [])
        m, rid, opts, structured = run.m, run.rid, run.opts, run.structured
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        if run.refusal is not None:
            mod = run.refusal
            report = _report(run.verdict, {}, 0)
            if req.stream:
                return StreamingResponse(
                    _refusal_stream(svc, m, rid, opts.n, mod, len(run.prompt_ids), include_usage,
                                    report if run.policy is not None else None, structured),
                    media_type="text/event-stream", headers=SSE_HEADERS)
            return _chat_body(svc, m, rid, [{"text": mod.refusal, "finish": "content_filter", "logprobs": None,
                                             "refused": structured, "moderation": summary(mod.result, "input")}
                                            for _ in range(opts.n)],
                              len(run.prompt_ids), 0, report)
        if req.stream:
            return StreamingResponse(
                _chat_stream(svc, m, rid, run.job, include_usage, request, run.messages, owner, run.verdict,
                             run.block_out, send_report=run.policy is not None, functions=run.functions,
                             structured=structured),
                media_type="text/event-stream", headers=SSE_HEADERS)
        choices, completion_tokens, verdicts = await _run_to_end(svc, run, request)
        if cfg.store_api_conversations:
            await _store_api_exchange(svc, m, run.messages, choices, owner, opts)
        return _chat_body(svc, m, rid, choices, len(run.prompt_ids), completion_tokens,
                          _report(run.verdict, verdicts, opts.n))

    # ---------------------------------------------------------------- responses (OpenAI's newer API)
    from minichat.serve import responses as resp_api

    saved = resp_api.ResponseStore(store)

    from minichat.serve import conversations as conv_api

    convs = conv_api.ConversationStore(store)
    app.include_router(conv_api.router(convs, require_key))

    @app.post("/v1/responses")
    async def create_response(request: Request, owner: str | None = Depends(rate_limit)):
        body = await read_json(request)
        rr = resp_api.parse_request(body)
        conv = conv_api.conversation_id(rr.conversation)
        if conv is not None and rr.previous_response_id:
            raise bad_request("give previous_response_id or conversation, not both", param="conversation")
        if conv is not None:
            history = resp_api.input_messages((await convs.get(conv, owner, param="conversation"))[1])
            new_items = conv_api.normalize_items(rr.input, "input")
        else:
            history = await saved.history(rr.previous_response_id, owner) if rr.previous_response_id else []

        async def on_done(out: dict) -> None:
            if conv is not None:  # the input and the answer join the conversation
                await convs.append(conv, owner, new_items + out["output"])

        req = resp_api.chat_request(rr, history)
        try:
            run = await _start_chat(svc, req, resp_api._item_id("resp"), truncate=rr.truncation == "auto")
        except APIError as e:  # errors name the Responses API's fields (input, not messages)
            raise resp_api.renamed(e) from None
        charge_tokens(request, len(run.prompt_ids), [run.job] if run.job is not None else [])
        keep = rr.store is not False
        if rr.stream:
            return StreamingResponse(resp_api.stream(svc, run, rr, request, saved if keep else None, owner,
                                                     _run_events(svc, run, request),
                                                     lambda mod: _record_moderation(svc, mod, run.rid, "replaced"),
                                                     on_done),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        if run.refusal is not None:
            choice = {"text": run.refusal.refusal, "finish": "content_filter"}
            tokens = 0
        else:
            choices, tokens, _ = await _run_to_end(svc, run, request)
            choice = choices[0]
        out = resp_api.response_object(run, rr, choice, tokens)
        if keep:
            await saved.put(out, run.messages_in, choice, owner)
        await on_done(out)
        return out

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, owner: str | None = Depends(require_key)):
        return await saved.get(response_id, owner)

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(response_id: str, order: str = "desc", limit: int = 20, after: str | None = None,
                                   owner: str | None = Depends(require_key)):
        return resp_api.page(await saved.inputs(response_id, owner), order, limit, after)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, owner: str | None = Depends(require_key)):
        await saved.delete(response_id, owner)
        return {"id": response_id, "object": "response", "deleted": True}

    # ---------------------------------------------------------------- legacy completions
    @app.post("/v1/completions", dependencies=[Depends(rate_limit)])
    async def completions(request: Request):
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        m = models.get(req.model)
        _top_p_ok(req)
        if req.echo and req.logprobs:
            raise bad_request("echo together with logprobs is not supported by this server", param="echo")
        prompts = _prompts(m, req.prompt)
        for ids in prompts:
            m.check_fits(ids, param="prompt")
        texts = [m.tokenizer.decode(ids) for ids in prompts]
        policy = req.moderation
        block_in = policy is None or policy.mode("input") == "block"
        block_out = policy is None or policy.mode("output") == "block"
        verdict = await check_input(moderator, texts)
        rid = new_id("cmpl")
        n = req.n or 1
        if verdict.flagged is not None and block_in:
            await _record_moderation(svc, Moderated(0, verdict.flagged, "", "input"), rid, "refused")
            refusal = moderator.refusal_for(verdict.flagged)
            return _completion_body(svc, m, rid, [
                {"index": i, "text": refusal, "logprobs": None, "finish_reason": "content_filter"}
                for i in range(n * len(prompts))], sum(map(len, prompts)), 0, _report(verdict, {}, 0))
        jobs = []
        try:
            for ids in prompts:
                opts = _opts(svc, m, len(ids), max_tokens=req.max_tokens, default_max=16, req=req,
                             logprobs=req.logprobs is not None, top_logprobs=req.logprobs or 0)
                jobs.append(submit(svc, m, ids, opts))
        except APIError:
            for j in jobs:
                j.cancel()
            raise
        charge_tokens(request, sum(map(len, prompts)), jobs)
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return StreamingResponse(_completion_stream(svc, m, rid, jobs, texts, bool(req.echo), include_usage,
                                                        block_out),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        choices, ctoks, verdicts = [], 0, {}
        for pi, job in enumerate(jobs):
            got_verdicts: dict[int, Any] = {}
            async with cancel_on_disconnect(request, job):
                got, toks = await _collect(svc, job, rid, got_verdicts, block_out)
            ctoks += toks
            for c in got:
                idx = pi * n + c["index"]
                verdicts[idx] = got_verdicts.get(c["index"])
                text = (texts[pi] if req.echo else "") + c["text"]
                choices.append({"index": idx, "text": text, "logprobs": _legacy_logprobs(c["logprobs"]),
                                "finish_reason": c["finish"]})
        return _completion_body(svc, m, rid, choices, sum(map(len, prompts)), ctoks,
                                _report(verdict, verdicts, n * len(prompts)))

    # ---------------------------------------------------------------- the web chat
    if cfg.web:
        from minichat.serve.web import router as web_router

        if store is not None:
            app.include_router(web_router)
            from minichat.label.web import mount as mount_label

            mount_label(app, store, cfg.label_session_hours)  # the labeling app at /label (its tables are added to the store)
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    return app


# ---------------------------------------------------------------------------------------------- chat helpers

@dataclass
class ChatRun:
    """A chat request under way: its prompt, options and job (None when the input was refused: `refusal`)."""
    m: ServedModel
    rid: str
    messages_in: list[dict]  # the conversation as sent (OpenAI chat messages), before tools are rendered
    messages: list[dict]  # what the model sees: tools described in the system message, calls as text
    functions: list[dict]
    prompt_ids: list[int]
    opts: GenOptions
    structured: bool  # the reply must be JSON: a refusal goes in `refusal`, not the content
    policy: Any
    block_out: bool
    verdict: Any
    job: Job | None = None
    refusal: Moderated | None = None


async def _start_chat(svc: Services, req: ChatCompletionRequest, rid: str, truncate: bool = False) -> ChatRun:
    """Render, submit and check the input of a chat request (shared by chat completions and responses).
    truncate: drop the oldest turns (never the system message or the newest one) until the prompt leaves room
    for the answer (the Responses API's truncation "auto"); otherwise a prompt that does not fit is a 400."""
    from minichat.serve.web import fit_history

    m = svc.models.get(req.model)
    _top_p_ok(req)
    functions = req.functions_in_use
    raw = [x.as_dict() for x in req.messages]
    # tool calls and results as text, the tools described in the system message (toolcall.py)
    messages = tools.prompt_messages(raw, functions, req.tool_choice, m.tokenizer.meta.default_system)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if truncate:
        reserve = min(max_tokens or svc.cfg.default_max_tokens, m.context_len // 2)
        prompt_ids, _ = fit_history(m, messages, reserve)
    else:
        prompt_ids = m.render_chat(messages)
        m.check_fits(prompt_ids)
    opts = _opts(svc, m, len(prompt_ids), max_tokens=max_tokens, default_max=svc.cfg.default_max_tokens, req=req,
                 logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0, dry_default=svc.cfg.dry_multiplier)
    opts.grammar = (m.tool_grammar(functions, req.tool_choice, req.parallel_tool_calls is not False) if functions
                    else m.grammar(req.response_format))
    # a reply that must be JSON (response_format, a required tool call) is refused in `message.refusal` with
    # no content, as OpenAI's structured outputs do: the client's parse() then gives refusal, not an error
    structured = isinstance(opts.grammar, JSONGrammar)
    policy = req.moderation
    block_in = policy is None or policy.mode("input") == "block"
    block_out = policy is None or policy.mode("output") == "block"
    # the job joins the engine's batch while its input is checked (the check's queueing in the moderation
    # process, ~6 ms p50 at 32 clients, would otherwise come before the prefill); nothing it generates is
    # read before the verdict, and a flagged input cancels it
    job = submit(svc, m, prompt_ids, opts)
    try:
        verdict = await check_input(svc.moderator, [x["content"] for x in raw if x["role"] != "assistant"])
    except BaseException:
        job.cancel()
        raise
    run = ChatRun(m, rid, raw, messages, functions, prompt_ids, opts, structured, policy, block_out, verdict, job)
    if verdict.flagged is not None and block_in:
        job.cancel()
        run.job = None
        run.refusal = Moderated(0, verdict.flagged, svc.moderator.refusal_for(verdict.flagged), "input")
        await _record_moderation(svc, run.refusal, rid, "refused")
    return run


async def _run_to_end(svc: Services, run: ChatRun, request: Request) -> tuple[list[dict], int, dict[int, Any]]:
    """Collect a run's choices; a reply of calls gets `tool_calls` (a reply cut by max_tokens keeps its complete
    calls, and says it was cut)."""
    verdicts: dict[int, Any] = {}
    async with cancel_on_disconnect(request, run.job):
        choices, completion_tokens = await _collect(svc, run.job, run.rid, verdicts, run.block_out, run.structured)
    for c in choices:
        cut = c["finish"] == "length"
        ok = run.functions and (cut or c["finish"] == "stop")
        calls = tools.parse_calls(c["text"], run.functions, cut) if ok else None
        if calls:
            c["tool_calls"], c["finish"] = calls, ("length" if cut else "tool_calls")
    return choices, completion_tokens, verdicts


def _run_events(svc: Services, run: ChatRun, request: Request):
    """The moderated events of a run's job, cancelled if the client goes away (for streamed responses)."""

    async def events():
        if run.job is None:
            return
        async with cancel_on_disconnect(request, run.job):
            async for ev in moderated_events(svc.moderator, run.job, None, run.block_out):
                yield ev

    return events()


def _report(verdict, verdicts: dict[int, Any], n: int) -> dict:
    """The response's `moderation` field, in OpenAI's moderated-completions shape (output: one per choice)."""
    return {"input": results_block(verdict.results), "output": results_block([verdicts.get(i) for i in range(n)])}


async def _collect(svc: Services, job: Job, rid: str, verdicts: dict[int, Any], block: bool,
                   structured: bool = False) -> tuple[list[dict], int]:
    """Run a job to the end: per choice its text, finish reason, logprob entries and moderation verdict
    (`refused`: a structured reply replaced by a refusal, which goes in `message.refusal`)."""
    out = [{"index": c.index, "text": "", "finish": None, "logprobs": [] if job.opts.logprobs else None,
            "moderation": None} for c in job.choices]
    tokens = 0
    async for ev in moderated_events(svc.moderator, job, verdicts, block):
        c = out[ev.index]
        if isinstance(ev, Delta):
            c["text"] += ev.text
            if c["logprobs"] is not None:
                c["logprobs"].extend(ev.logprobs)
        elif isinstance(ev, Moderated):
            c["text"], c["logprobs"], c["refused"] = ev.refusal, None, structured
            c["moderation"] = summary(ev.result, "output")
            await _record_moderation(svc, ev, rid, "replaced")
        else:
            if ev.reason == "error":
                raise APIError(500, ev.error or "generation failed", type="server_error")
            c["finish"] = ev.reason
            tokens += ev.completion_tokens
    return out, tokens


def _chat_body(svc: Services, m: ServedModel, rid: str, choices: list[dict], prompt_tokens: int,
               completion_tokens: int, report: dict | None) -> dict:
    body = {
        "id": rid, "object": "chat.completion", "created": now(), "model": m.name,
        "system_fingerprint": svc.fingerprint,
        "choices": [{
            "index": i,
            "message": {"role": "assistant", "content": None if c.get("tool_calls") or c.get("refused") else c["text"],
                        "refusal": c["text"] if c.get("refused") else None,
                        **({"tool_calls": c["tool_calls"]} if c.get("tool_calls") else {})},
            "logprobs": {"content": c["logprobs"], "refusal": None} if c["logprobs"] is not None else None,
            "finish_reason": c["finish"],
            **({"moderation": c["moderation"]} if c.get("moderation") else {}),
        } for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, completion_tokens),
    }
    if svc.moderator is not None:
        body["moderation"] = report
    return body


def _chunk(svc: Services, m: ServedModel, rid: str, created: int, choices: list[dict], include_usage: bool,
           usage_obj: dict | None = None, **extra) -> str:
    obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": m.name,
           "system_fingerprint": svc.fingerprint, "choices": choices, **extra}
    if include_usage:
        obj["usage"] = usage_obj  # null on every chunk but the last, as OpenAI sends it
    return sse(obj)


def _choice(i: int, delta: dict, finish: str | None = None, logprobs: Any = None, **extra) -> dict:
    return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish, **extra}


async def _chat_stream(svc: Services, m: ServedModel, rid: str, job: Job, include_usage: bool, request: Request,
                       messages: list[dict], owner: str | None, verdict, block: bool, send_report: bool,
                       functions: list[dict] | None = None, structured: bool = False) -> AsyncIterator[str]:
    """OpenAI's stream: per choice a role chunk, content chunks and one chunk with finish_reason; then, when
    the request asked for moderation, a chunk with empty choices and `moderation`; with include_usage a last
    chunk with empty choices and the usage; then [DONE]. Every chunk has the same id.
    With tools, a reply that may still become a tool call is held back; its calls are sent whole, in one
    `tool_calls` delta, before its finish_reason "tool_calls"."""
    created = now()
    tokens = 0
    sent: dict[int, str] = {c.index: "" for c in job.choices}
    held: dict[int, str] = {c.index: "" for c in job.choices} if functions else {}
    finishes: dict[int, str] = {}
    flagged: dict[int, dict] = {}
    verdicts: dict[int, Any] = {}
    try:
        async with cancel_on_disconnect(request, job):
            for c in job.choices:  # the role comes first, once per choice
                yield _chunk(svc, m, rid, created, [_choice(c.index, {"role": "assistant", "content": ""})],
                             include_usage)
            async for ev in moderated_events(svc.moderator, job, verdicts if send_report else None, block):
                if isinstance(ev, Delta):
                    text = ev.text
                    if ev.index in held:
                        held[ev.index] += text
                        if tools.may_be_call(held[ev.index]):
                            continue
                        text = held.pop(ev.index)  # plain text after all: what was held goes out now
                    sent[ev.index] += text
                    lp = {"content": ev.logprobs, "refusal": None} if job.opts.logprobs else None
                    yield _chunk(svc, m, rid, created, [_choice(ev.index, {"content": text}, logprobs=lp)],
                                 include_usage)
                elif isinstance(ev, Moderated):
                    held.pop(ev.index, None)
                    await _record_moderation(svc, ev, rid, "replaced")
                    # what was already streamed cannot be taken back: the refusal follows it, plainly marked
                    text = ev.refusal if structured else ("\n\n" if sent[ev.index] else "") + ev.refusal
                    sent[ev.index] = ev.refusal
                    flagged[ev.index] = summary(ev.result, "output")
                    delta = {"refusal" if structured else "content": text}
                    yield _chunk(svc, m, rid, created, [_choice(ev.index, delta)], include_usage)
                else:
                    if ev.reason == "error":
                        yield sse(APIError(500, ev.error or "generation failed", type="server_error").body())
                        yield "data: [DONE]\n\n"
                        return
                    tokens += ev.completion_tokens
                    reason = ev.reason
                    if ev.index in held:  # the reply was (or began as) a call
                        text = held.pop(ev.index)
                        cut = reason == "length"
                        calls = tools.parse_calls(text, functions, cut) if cut or reason == "stop" else None
                        if calls:
                            reason = "length" if cut else "tool_calls"
                            delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
                        else:
                            sent[ev.index] += text
                            delta = {"content": text}
                        if text:
                            yield _chunk(svc, m, rid, created, [_choice(ev.index, delta)], include_usage)
                    finishes[ev.index] = reason
                    extra = {"moderation": flagged[ev.index]} if ev.index in flagged else {}
                    yield _chunk(svc, m, rid, created, [_choice(ev.index, {}, reason, **extra)], include_usage)
        if send_report and svc.moderator is not None:
            yield _chunk(svc, m, rid, created, [], include_usage,
                         moderation=_report(verdict, verdicts, len(job.choices)))
        if include_usage:
            yield _chunk(svc, m, rid, created, [], True, usage(job.prompt_tokens, tokens))
        yield "data: [DONE]\n\n"
        if svc.cfg.store_api_conversations:
            choices = [{"text": sent[i], "finish": finishes.get(i)} for i in sorted(sent)]
            await _store_api_exchange(svc, m, messages, choices, owner, job.opts)
    finally:
        if any(not c.done for c in job.choices):
            job.cancel()


async def _refusal_stream(svc: Services, m: ServedModel, rid: str, n: int, mod: Moderated, prompt_tokens: int,
                          include_usage: bool, report: dict | None, structured: bool = False) -> AsyncIterator[str]:
    created = now()
    for i in range(n):
        yield _chunk(svc, m, rid, created, [_choice(i, {"role": "assistant", "content": ""})], include_usage)
        yield _chunk(svc, m, rid, created, [_choice(i, {"refusal" if structured else "content": mod.refusal})],
                     include_usage)
        yield _chunk(svc, m, rid, created, [_choice(i, {}, "content_filter",
                                                    moderation=summary(mod.result, "input"))], include_usage)
    if report is not None:
        yield _chunk(svc, m, rid, created, [], include_usage, moderation=report)
    if include_usage:
        yield _chunk(svc, m, rid, created, [], True, usage(prompt_tokens, 0))
    yield "data: [DONE]\n\n"


async def _store_api_exchange(svc: Services, m: ServedModel, messages: list[dict], choices: list[dict],
                              owner: str | None, opts: GenOptions) -> None:
    """Keep an API exchange as a conversation (store_api_conversations): n answers become sibling messages."""
    if svc.store is None:
        return

    def write():
        st = svc.store
        system = "\n".join(x["content"] for x in messages if x["role"] in ("system", "developer"))
        conv = st.create_conversation(model=m.name, system_prompt=system, source="api", owner=owner,
                                      settings={"temperature": opts.temperature, "top_p": opts.top_p})
        parent = None
        for x in messages:
            if x["role"] in ("system", "developer"):
                continue
            parent = st.add_message(conv["id"], role=x["role"], content=x["content"], parent_id=parent)["id"]
        for c in choices:
            st.add_message(conv["id"], role="assistant", content=c["text"], parent_id=parent, model=m.name,
                           finish_reason=c.get("finish"), moderated=c.get("finish") == "content_filter")

    try:
        await asyncio.to_thread(write)
    except Exception:
        log.exception("could not store an API exchange")


# ---------------------------------------------------------------------------------------------- completions

def _prompts(m: ServedModel, prompt, param: str = "prompt") -> list[list[int]]:
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    out = []
    for i, p in enumerate(items):
        if isinstance(p, str):
            ids = m.encode(p)
        else:
            V = m.tokenizer.vocab_size
            if any((not isinstance(t, int)) or t < 0 or t >= V for t in p):
                raise bad_request(f"{param} {i}: token ids must be integers in 0..{V - 1}", param=param)
            ids = list(p)
        if not ids:
            ids = [m.tokenizer.eos_id if m.tokenizer.eos_id is not None else 0]  # as OpenAI: start from <eos>
        out.append(ids)
    return out


def _legacy_logprobs(entries: list[dict] | None) -> dict | None:
    if entries is None:
        return None
    offsets, pos = [], 0
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def _completion_body(svc: Services, m: ServedModel, rid: str, choices: list[dict], prompt_tokens: int,
                     completion_tokens: int, report: dict | None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": now(), "model": m.name,
            "system_fingerprint": svc.fingerprint, "choices": sorted(choices, key=lambda c: c["index"]),
            "usage": usage(prompt_tokens, completion_tokens)}
    if svc.moderator is not None:
        body["moderation"] = report
    return body


async def _completion_stream(svc: Services, m: ServedModel, rid: str, jobs: list[Job], texts: list[str], echo: bool,
                             include_usage: bool, block: bool) -> AsyncIterator[str]:
    created = now()
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(pi: int, job: Job):
        try:
            async for ev in moderated_events(svc.moderator, job, None, block):
                await queue.put((pi, job, ev))
        finally:
            await queue.put((pi, job, None))

    def chunk(choices, usage_obj=None):
        obj = {"id": rid, "object": "text_completion", "created": created, "model": m.name,
               "system_fingerprint": svc.fingerprint, "choices": choices}
        if include_usage:
            obj["usage"] = usage_obj
        return sse(obj)

    tasks = [asyncio.create_task(pump(pi, j)) for pi, j in enumerate(jobs)]
    open_jobs, tokens = len(jobs), 0
    try:
        if echo:
            for pi, job in enumerate(jobs):
                for c in job.choices:
                    yield chunk([{"index": pi * job.opts.n + c.index, "text": texts[pi], "logprobs": None,
                                  "finish_reason": None}])
        while open_jobs:
            pi, job, ev = await queue.get()
            if ev is None:
                open_jobs -= 1
                continue
            idx = pi * job.opts.n + ev.index
            if isinstance(ev, Delta):
                yield chunk([{"index": idx, "text": ev.text, "logprobs": _legacy_logprobs(ev.logprobs)
                              if job.opts.logprobs else None, "finish_reason": None}])
            elif isinstance(ev, Moderated):
                await _record_moderation(svc, ev, rid, "replaced")
                yield chunk([{"index": idx, "text": ev.refusal, "logprobs": None, "finish_reason": None}])
            else:
                if ev.reason == "error":
                    yield sse(APIError(500, ev.error or "generation failed", type="server_error").body())
                    yield "data: [DONE]\n\n"
                    return
                tokens += ev.completion_tokens
                yield chunk([{"index": idx, "text": "", "logprobs": None, "finish_reason": ev.reason}])
        if include_usage:
            yield chunk([], usage(sum(j.prompt_tokens for j in jobs), tokens))
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        for j in jobs:
            if any(not c.done for c in j.choices):
                j.cancel()


# ---------------------------------------------------------------------------------------------- main

def build_services(cfg: ServeConfig) -> tuple[ModelRegistry, Any, Any]:
    store = moderator = None
    # models first: a wrong model path is the likeliest mistake, and it should fail before anything starts
    models = ModelRegistry.load(cfg.models, cfg.engine, max_queue=cfg.max_queue)
    if cfg.store_url.lower() != "none":
        from minichat.serve.store import Store

        store = Store(cfg.store_url or None)
        log.info("store: %s", store.safe_url)
    if cfg.moderation:
        from minichat.moderation import Moderator

        moderator = Moderator.load(cfg.moderation_config or None,
                                   audit_path=cfg.moderation_audit or None)
        if cfg.moderation_process:
            from minichat.moderation.process import ModeratorProcess

            moderator = ModeratorProcess(moderator, cfg.moderation_config or None)
    return models, store, moderator


def main(argv: list[str]) -> int:
    from minichat import config as config_mod

    def extra(ap):
        ap.add_argument("--host", help="address to listen on (default 127.0.0.1)")
        ap.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
        ap.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                        help="a model to serve (repeatable; default: the built-in smollm2)")
        ap.add_argument("--api-key", action="append", default=[], help="accept this bearer key (repeatable)")
        ap.add_argument("--store", help="SQLAlchemy URL of the store, or 'none'")
        ap.add_argument("--no-moderation", action="store_true", help="turn moderation off")

    cfg, ns = config_mod.build(ServeConfig, argv, prog="minichat serve", description=__doc__, extra=extra)
    if ns.host:
        cfg.host = ns.host
    if ns.port is not None:
        cfg.port = ns.port
    if ns.model:
        cfg.models = ns.model
    if ns.api_key:
        cfg.api_keys = cfg.api_keys + ns.api_key
    if ns.store:
        cfg.store_url = ns.store
    if ns.no_moderation:
        cfg.moderation = False
    cfg.validate()
    logging.basicConfig(level=cfg.log_level.upper() if cfg.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.log_level not in ("debug", "trace"):  # alembic's INFO lines (plugins, DDL mode) on every start are noise
        logging.getLogger("alembic").setLevel(logging.WARNING)
    if not cfg.is_loopback() and not cfg.all_api_keys():
        log.warning("listening on %s without API keys: anyone who can reach it can use it", cfg.host)
    models, store, moderator = build_services(cfg)
    try:
        app = create_app(cfg, models, store, moderator)
        import uvicorn

        print(f"minichat serve: http://{cfg.host}:{cfg.port}/  (models: {', '.join(models.names())})", flush=True)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
    finally:
        if store is not None:
            store.close()
        if hasattr(moderator, "close"):
            moderator.close()
    return 0

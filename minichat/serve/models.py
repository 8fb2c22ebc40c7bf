"""The served models: each loaded once, with its own Engine and worker thread, chosen by the `model` field."""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

from minichat.errors import MinichatError
from minichat.serve.config import EngineSettings, parse_model_spec
from minichat.serve.protocol import APIError
from minichat.serve.worker import ModelWorker

log = logging.getLogger("minichat.serve")


@dataclass
class ServedModel:
    name: str
    source: str  # what was asked for: "smollm2", a path
    tokenizer: object
    worker: ModelWorker
    created: int
    # temperature / top_p for requests that leave them out (gguf_import.recommended_sampling); else OpenAI's 1.0
    sampling: dict = field(default_factory=dict)
    _vocab: object = field(default=None, repr=False)  # minichat.constrain.TokenVocab, built on first use
    _grammars: dict = field(default_factory=dict, repr=False)
    _embed_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def context_len(self) -> int:
        return self.worker.context_len

    def render_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation followed by the assistant's turn header (the template's prompt)."""
        try:
            ids, _ = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        except MinichatError as e:
            raise APIError(400, str(e), param="messages") from None
        return ids

    def grammar(self, response_format: dict | None):
        """The grammar for a request's response_format (None for text); compiled grammars are kept for reuse,
        with the token masks they have found."""
        if not response_format or response_format.get("type", "text") == "text":
            return None
        from minichat.constrain import SchemaError, response_format_grammar

        key = json.dumps(response_format, sort_keys=True)
        g = self._grammars.get(key)
        if g is None:
            try:
                g = response_format_grammar(self._token_vocab(), response_format)
            except SchemaError as e:
                raise APIError(400, f"response_format: {e}", param="response_format") from None
            self._keep(key, g)
        return g

    def tool_grammar(self, functions: list[dict], tool_choice, parallel: bool = True):
        """The grammar of a reply that may (or must) call one of these functions (toolcall.py), kept for
        reuse like grammar()."""
        from minichat import toolcall as tools

        key = "tools:" + json.dumps([functions, tool_choice, parallel], sort_keys=True)
        g = self._grammars.get(key)
        if g is None:
            try:
                g = tools.grammar(self._token_vocab(), functions, tool_choice, parallel)
            except tools.ToolError as e:
                raise APIError(400, str(e), param=e.param) from None
            self._keep(key, g)
        return g

    def _token_vocab(self):
        if self._vocab is None:
            from minichat.constrain import TokenVocab

            self._vocab = TokenVocab(self.tokenizer)
        return self._vocab

    def _keep(self, key: str, g) -> None:
        self._grammars[key] = g
        if len(self._grammars) > 16:  # each keeps up to ~12 MB of masks (JSONGrammar.mask)
            self._grammars.pop(next(iter(self._grammars)))

    def embed(self, seqs: list[list[int]], pooling: str = "mean"):
        """(N, d_model) unit vectors (Engine.embeddings), one batch at a time per model; called off the event
        loop (a thread), beside the worker thread's generation."""
        with self._embed_lock:
            return self.worker.engine.embeddings(seqs, pooling=pooling)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def check_fits(self, prompt_ids: list[int], param: str = "messages") -> None:
        if len(prompt_ids) >= self.context_len:
            raise APIError(400, f"This model's maximum context length is {self.context_len} tokens, but the "
                                f"prompt has {len(prompt_ids)} tokens; shorten the {param}.",
                           param=param, code="context_length_exceeded")

    def info(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "minichat",
                "context_length": self.context_len}


class ModelRegistry:
    def __init__(self, models: list[ServedModel], max_queue: int = 64):
        if not models:
            raise MinichatError("no models to serve")
        self.models = {m.name: m for m in models}
        self.default = models[0].name
        self.max_queue = max_queue
        self.started = False
        self.on_add: list = []  # callbacks(ServedModel) for a model added while serving (e.g. metrics)

    def add(self, m: ServedModel) -> None:
        """Serve one more model (a fine-tuned one), started at once if the others are running."""
        if m.name in self.models:
            raise MinichatError(f"a model named {m.name!r} is already served")
        for fn in self.on_add:
            fn(m)
        self.models[m.name] = m
        if self.started:
            m.worker.start()

    def get(self, name: str) -> ServedModel:
        m = self.models.get(name)
        if m is None:
            raise APIError(404, f"The model {name!r} does not exist; this server has: {', '.join(self.models)}.",
                           param="model", code="model_not_found")
        return m

    def names(self) -> list[str]:
        return list(self.models)

    def remove(self, name: str) -> None:
        """Stop serving a model added while serving (requests still running on it end with an error)."""
        m = self.models.pop(name)
        m.worker.stop()

    def start(self) -> None:
        for m in self.models.values():
            m.worker.start()
        self.started = True

    def stop(self) -> None:
        self.started = False
        for m in self.models.values():
            m.worker.stop()

    @classmethod
    def from_engines(cls, items: list[tuple[str, object, object]], max_queue: int = 64) -> "ModelRegistry":
        """(name, engine, tokenizer) triples -> a registry (used by tests and the loader below)."""
        now = int(time.time())
        return cls([ServedModel(name, name, tok, ModelWorker(name, eng, tok, max_queue=max_queue), now)
                    for name, eng, tok in items], max_queue)

    @classmethod
    def load(cls, specs: list[str], settings: EngineSettings, max_queue: int = 64) -> "ModelRegistry":
        import torch

        from minichat.engine import Engine
        from minichat.gguf_import import load, recommended_sampling
        from minichat.runtime import resolve_device

        threads = settings.threads or torch.get_num_threads()
        device = resolve_device(settings.device)
        served = []
        # Load with one thread, so this (the event loop's) thread never starts an OpenMP thread team: with a
        # second team alive, libgomp throttles its spin-waiting on 2 cores and every parallel region of the
        # stepping thread pays a futex wake-up (measured: 34 ms per SmolLM2 decode step instead of 14).
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for spec in specs:
                name, path = parse_model_spec(spec)
                t0 = time.perf_counter()
                model, tok, _ = load(path, device=device, verbose=True)
                engine = Engine(model, tok, device=device, weights=settings.weights, max_batch=settings.max_batch,
                                prefix_cache=settings.prefix_cache, kv_cache=settings.kv_cache)
                log.info("loaded model %s from %s in %.1f s", name, path, time.perf_counter() - t0)
                worker = ModelWorker(name, engine, tok, max_queue=max_queue, threads=threads,
                                     adaptive_threads=settings.adaptive_threads)
                served.append(ServedModel(name, path, tok, worker, int(time.time()), recommended_sampling(path)))
        finally:
            torch.set_num_threads(prev)
        return cls(served, max_queue)

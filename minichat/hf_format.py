"""Hugging Face's model folder, both ways: `minichat export MODEL OUT_DIR --format hf`, and any local Llama-family
folder (config.json + *.safetensors + tokenizer.json) wherever minichat takes a model.

    minichat export runs/pipeline/ppo my-model/ --format hf     # then AutoModelForCausalLM.from_pretrained("my-model")
    minichat chat --model ~/models/SmolLM2-360M-Instruct        # a folder someone downloaded with huggingface-cli

minichat's Transformer is the Llama architecture (RMSNorm, rotate-half RoPE, GQA, SwiGLU, no biases), so the
mapping is one name per tensor and no permutation. The export writes what `save_pretrained` would:
config.json (LlamaForCausalLM), model.safetensors, tokenizer.json, tokenizer_config.json with the ChatML template
(the one the GGUF export writes), special_tokens_map.json and generation_config.json. A folder is imported once
into minichat's cache (as GGUF files are) and then loaded from there. Only what the model file can hold exactly
is accepted: other architectures, biases, RoPE scaling and non-byte-level tokenizers are refused by name.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from minichat.errors import MinichatError

HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")  # Mistral without sliding windows is Llama
IMPORTER_VERSION = 1
# one block's tensors: ours -> Hugging Face's (under model.layers.{i}.)
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight", "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight", "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight", "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}


def hf_name(ours: str) -> str:
    if ours in _TOP:
        return _TOP[ours]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", ours)
    if m is None or m.group(2) not in _BLOCK:
        raise MinichatError(f"tensor {ours!r} has no Hugging Face Llama name")
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"


def is_hf_folder(p: Path) -> bool:
    """A Hugging Face model folder: its config.json names a model_type (minichat's own names a kind)."""
    if not (p.is_dir() and (p / "config.json").is_file()):
        return False
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and "model_type" in cfg and "kind" not in cfg


# ------------------------------------------------------------------------------------------------ export

def _bpe_tokenizer(tok, what: str):
    from minichat.tokenizer import BPETokenizer

    if not isinstance(tok, BPETokenizer):
        raise MinichatError(f"only byte-level BPE models can be exported to {what}; this model has a character "
                            "tokenizer (pretrain with --tokenizer.kind bpe)")
    if tok.im_start_id is None or tok.im_end_id is None:
        raise MinichatError("the tokenizer has no chat tokens (<|im_start|>, <|im_end|>), so no chat template "
                            "can be written")
    return tok


def hf_config(c, tok, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of LlamaForCausalLM for model config `c` (transformers 4.x reads rope_theta, 5.x
    rope_parameters)."""
    ids = tok.tok.get_vocab(with_added_tokens=True)
    bos = ids.get("<|endoftext|>", tok.im_start_id)
    pad = ids.get("<|pad|>", ids.get("<|endoftext|>", tok.im_end_id))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "intermediate_size": c.ff_dim, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
        "hidden_act": "silu", "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": c.tie_embeddings, "initializer_range": c.init_std, "pretraining_tp": 1,
        "use_cache": True, "bos_token_id": bos, "eos_token_id": tok.im_end_id, "pad_token_id": pad,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }


def export_hf(model_path: str, out: str | Path, dtype: str = "f32") -> dict:
    """Write the model at model_path (checkpoint, run folder, .gguf, a Hugging Face folder or smollm2) as a
    Hugging Face folder `out`, which must not exist or be empty. Written into a temporary folder beside it
    and renamed, so a failure leaves nothing half-written."""
    from safetensors.torch import save_file

    from minichat.gguf_export import chatml_template
    from minichat.gguf_import import load, recommended_sampling

    if dtype not in HF_DTYPES:
        raise MinichatError(f"--dtype for a Hugging Face folder must be one of {', '.join(HF_DTYPES)}, got {dtype!r}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MinichatError(f"{out} already exists and is not an empty folder; choose a new folder or remove it")
    model, tok, _ = load(model_path, verbose=False)
    tok = _bpe_tokenizer(tok, "a Hugging Face folder")
    c = model.cfg
    n_tok = tok.tok.get_vocab_size(with_added_tokens=True)
    if n_tok > c.vocab_size:
        raise MinichatError(f"the tokenizer has {n_tok} tokens but the model only {c.vocab_size} rows")
    tdt = HF_DTYPES[dtype]
    tensors = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and c.tie_embeddings:
            continue  # tied: transformers ties lm_head to embed_tokens itself
        # norms in f32 where the rest is lower, as transformers computes RMSNorm in f32 anyway
        tensors[hf_name(k)] = v.detach().to(torch.float32 if v.ndim == 1 else tdt).contiguous().cpu()
    ids = tok.tok.get_vocab(with_added_tokens=True)
    id_to = {i: t for t, i in ids.items()}
    specials = list(tok.meta.specials)
    cfg = hf_config(c, tok, tdt)
    sampling = recommended_sampling(model_path)
    gen = {"bos_token_id": cfg["bos_token_id"], "pad_token_id": cfg["pad_token_id"],
           "eos_token_id": sorted({tok.im_end_id, *(ids[s] for s in ("<|endoftext|>",) if s in ids)}),
           **({"do_sample": True, **sampling} if sampling else {})}
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.max_seq_len,
        "bos_token": id_to[cfg["bos_token_id"]], "eos_token": "<|im_end|>", "pad_token": id_to[cfg["pad_token_id"]],
        "unk_token": None, "additional_special_tokens": [s for s in specials if s not in
                                                         (id_to[cfg["bos_token_id"]], "<|im_end|>",
                                                          id_to[cfg["pad_token_id"]])],
        "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
        "chat_template": chatml_template(tok.meta.default_system),
    }
    special_map = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "tokenizer.json").write_text(tok.tok.to_str(), encoding="utf-8")
        for name, obj in (("config.json", cfg), ("generation_config.json", gen), ("tokenizer_config.json", tok_cfg),
                          ("special_tokens_map.json", special_map)):
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(v.numel() for v in tensors.values())
    return {"path": str(out), "parameters": n, "dtype": dtype,
            "bytes": sum(f.stat().st_size for f in out.iterdir())}


# ------------------------------------------------------------------------------------------------ import

def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinichatError(f"{p} is not valid JSON: {e}") from None


def model_config_from_hf(d: dict, where: Path):
    """Our ModelConfig from a Hugging Face config.json, refusing what our Transformer cannot represent."""
    from minichat.model import ModelConfig

    arch = (d.get("architectures") or ["?"])[0]
    if d.get("model_type") not in ("llama", "mistral") or arch not in ARCHITECTURES:
        raise MinichatError(f"{where}: {arch} ({d.get('model_type')}) is not supported; minichat reads Llama-family "
                            f"folders ({', '.join(ARCHITECTURES)})")
    if d.get("hidden_act", "silu") != "silu":
        raise MinichatError(f"{where}: hidden_act {d.get('hidden_act')!r} is not supported (only silu)")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise MinichatError(f"{where}: attention or MLP biases are not supported")
    if d.get("sliding_window"):
        raise MinichatError(f"{where}: sliding-window attention is not supported")
    rope = d.get("rope_scaling") or {}
    params = d.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default" or \
            params.get("rope_type", "default") != "default":
        raise MinichatError(f"{where}: RoPE scaling ({rope or params}) is not supported")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    try:
        n_head, d_model = int(d["num_attention_heads"]), int(d["hidden_size"])
        cfg = ModelConfig(vocab_size=int(d["vocab_size"]), n_layer=int(d["num_hidden_layers"]), n_head=n_head,
                          n_kv_head=int(d.get("num_key_value_heads") or n_head), d_model=d_model,
                          d_ff=int(d["intermediate_size"]), max_seq_len=int(d.get("max_position_embeddings", 2048)),
                          rope_theta=float(theta), norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                          tie_embeddings=bool(d.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise MinichatError(f"{where}: missing or malformed field {e}") from None
    if int(d.get("head_dim") or cfg.head_dim) != cfg.head_dim:
        raise MinichatError(f"{where}: head_dim {d['head_dim']} differs from hidden_size / num_attention_heads")
    cfg.validate()
    return cfg


def _chat_template(folder: Path, tok_cfg: dict) -> str:
    if (folder / "chat_template.jinja").is_file():  # transformers 5 saves it beside the tokenizer
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    t = tok_cfg.get("chat_template") or ""
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        t = next((x.get("template", "") for x in t if x.get("name") == "default"), "")
    return t


def tokenizer_from_hf(folder: Path):
    from tokenizers import Tokenizer

    from minichat.gguf_import import _default_system
    from minichat.tokenizer import BPETokenizer, ChatMeta

    f = folder / "tokenizer.json"
    if not f.is_file():
        raise MinichatError(f"{folder}: no tokenizer.json (only fast byte-level BPE tokenizers are supported)")
    try:
        spec = json.loads(f.read_text(encoding="utf-8"))
        tok = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type
        raise MinichatError(f"{f} is not a valid tokenizer file: {e}") from None
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise MinichatError(f"{f}: only byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) are supported")
    tok_cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    template = _chat_template(folder, tok_cfg)
    if template and "<|im_start|>" not in template:
        raise MinichatError(f"{folder}: only ChatML chat templates (<|im_start|> ... <|im_end|>) are supported")
    specials = [t["content"] for t in spec.get("added_tokens", []) if t.get("special")]
    return BPETokenizer(tok, ChatMeta(kind="bpe", default_system=_default_system(template), specials=specials))


def _state_dict_from_hf(folder: Path, cfg) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from minichat.model import Transformer

    index = folder / "model.safetensors.index.json"
    files = sorted(set(_read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    if not (folder / files[0]).is_file():
        raise MinichatError(f"{folder}: no model.safetensors (only safetensors weights are read, not .bin)")
    raw: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            raw.update(load_file(str(folder / name)))
        except (SafetensorError, OSError, ValueError) as e:
            raise MinichatError(f"{folder / name} is corrupted or unreadable: {e}") from None
    with torch.device("meta"):
        want = Transformer(cfg).state_dict()
    sd = {}
    for k, v in want.items():
        if k == "lm_head.weight" and cfg.tie_embeddings:
            continue
        h = hf_name(k)
        if h not in raw:
            raise MinichatError(f"{folder}: tensor {h} is missing")
        if tuple(raw[h].shape) != tuple(v.shape):
            raise MinichatError(f"{folder}: {h} has shape {tuple(raw[h].shape)}, expected {tuple(v.shape)}")
        sd[k] = raw.pop(h).float()
    if cfg.tie_embeddings:
        raw.pop("lm_head.weight", None)  # some tied folders store the head anyway
    extra = [k for k in raw if not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise MinichatError(f"{folder}: tensors minichat's model has no place for: {', '.join(extra[:5])}")
    return sd


def convert_hf(folder: str | Path, out_dir: str | Path) -> Path:
    """A Hugging Face Llama folder saved as a minichat checkpoint folder (atomically, by save_checkpoint)."""
    from minichat.checkpoint import save_checkpoint
    from minichat.model import Transformer

    folder = Path(folder)
    cfg = model_config_from_hf(_read_json(folder / "config.json"), folder / "config.json")
    tok = tokenizer_from_hf(folder)
    if tok.vocab_size > cfg.vocab_size:
        raise MinichatError(f"{folder}: the tokenizer has {tok.vocab_size} tokens but the model {cfg.vocab_size} rows")
    sd = _state_dict_from_hf(folder, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    return save_checkpoint(out_dir, model, tok, extra_config={"source": {"hf_folder": str(folder.resolve()),
                                                                          "importer": IMPORTER_VERSION}})


def ensure_imported(folder: str | Path, verbose: bool = True) -> Path:
    """The cached minichat checkpoint of a Hugging Face folder, converted on first use (and again when its
    weights or config change)."""
    import hashlib

    from minichat.gguf_import import cache_root, convert_once

    folder = Path(folder).expanduser().resolve()
    stamp = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(folder.iterdir())
             if f.suffix in (".json", ".safetensors", ".jinja")]
    key = hashlib.sha256(json.dumps([str(folder), stamp, IMPORTER_VERSION]).encode()).hexdigest()[:16]
    out = cache_root() / "models" / f"hf-{folder.name}-{key}"
    return convert_once(out, lambda o: convert_hf(folder, o), f"the Hugging Face folder {folder}", verbose)

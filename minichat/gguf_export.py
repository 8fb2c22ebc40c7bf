"""`minichat export`: a minichat language model as a GGUF file, for llama.cpp, Ollama, LM Studio and the like.

    minichat export runs/pipeline/ppo my-model.gguf [--dtype f16|f32|bf16|q8_0|q5_1|q5_0|q4_1|q4_0]

The mirror of gguf_import.py, written with llama.cpp's own `gguf` package: the "llama" architecture's metadata,
tensors under llama.cpp's names with Q/K rows permuted back to its interleaved RoPE layout, and the byte-level
BPE tokenizer (tokens, types, merges, ChatML template, stop token). Norms stay f32, as llama.cpp's converter
keeps them; 4- and 5-bit files keep the embeddings at 8 bits. Character-level models have no GGUF tokenizer to map to and are refused.
"""
from __future__ import annotations

import argparse
import json
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from minichat.errors import MinichatError

DTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, ...
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}
_OURS_TO_GGUF = {
    "attn_norm.weight": "attn_norm.weight", "attn.wq.weight": "attn_q.weight", "attn.wk.weight": "attn_k.weight",
    "attn.wv.weight": "attn_v.weight", "attn.wo.weight": "attn_output.weight", "mlp_norm.weight": "ffn_norm.weight",
    "mlp.w_gate.weight": "ffn_gate.weight", "mlp.w_up.weight": "ffn_up.weight", "mlp.w_down.weight": "ffn_down.weight",
}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half rows (x_i, x_{i+hd/2}) of each head -> llama.cpp's interleaved pairs (x0,x1),(x2,x3)...;
    gguf_import._unpermute is its inverse."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def chatml_template(default_system: str | None) -> str:
    """The Jinja ChatML template llama.cpp and Ollama apply, rendering exactly as minichat's render_chat_text
    (a default system prompt written inside the literal, as SmolLM2's file has it)."""
    sys_part = ""
    if default_system:
        text = default_system.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
        sys_part = ("{% if loop.first and messages[0]['role'] != 'system' and messages[0]['role'] != 'developer' %}"
                    "{{ '<|im_start|>system\\n" + text + "<|im_end|>\\n' }}{% endif %}")
    role = "{% if message['role'] == 'developer' %}system{% else %}{{ message['role'] }}{% endif %}"  # OpenAI's newer name
    return ("{% for message in messages %}" + sys_part + "<|im_start|>" + role +
            "{{ '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _tokenizer_fields(tok) -> dict:
    from minichat.tokenizer import BPETokenizer

    if not isinstance(tok, BPETokenizer):
        raise MinichatError("only byte-level BPE models can be exported to GGUF; this model has a character "
                            "tokenizer (pretrain with --tokenizer.kind bpe)")
    spec = json.loads(tok.tok.to_str())
    pre = json.dumps(spec.get("pre_tokenizer"))
    if '"ByteLevel"' not in pre or spec["model"].get("type") != "BPE":
        raise MinichatError("the tokenizer is not a GPT-2 style byte-level BPE; GGUF export supports only those")
    # llama.cpp's "smollm" rule is digits one by one, then GPT-2's regex; "gpt2" is the regex alone
    digits = '"individual_digits": true' in pre
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    if any(t == "" for t in tokens):
        raise MinichatError("the tokenizer's ids have gaps; GGUF needs one token per id")
    specials = set(tok.meta.specials)
    types = [3 if t in specials else 1 for t in tokens]  # 3 = CONTROL, 1 = NORMAL (llama.cpp's token types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": "smollm" if digits else "gpt2"}


def export_gguf(model_path: str, out: str | Path, dtype: str = "f16") -> dict:
    """Write the model at model_path (checkpoint, run folder, .gguf or smollm2) to `out` atomically."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    from minichat.gguf_import import load

    if dtype not in DTYPES:
        raise MinichatError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model, tok, cfg = load(model_path, verbose=False)
    c = model.cfg
    fields = _tokenizer_fields(tok)
    if tok.im_start_id is None or tok.im_end_id is None:
        raise MinichatError(f"{model_path}: its tokenizer has no chat tokens, so no chat template can be written")
    if len(fields["tokens"]) != c.vocab_size:
        raise MinichatError(f"the tokenizer has {len(fields['tokens'])} tokens but the model {c.vocab_size} rows")
    qtype = GGMLQuantizationType[dtype.upper()]
    # 4/5-bit files keep the embeddings (also the tied output layer) at 8 bits, as SmolLM2's own Q4_1 file does
    embed_qtype = GGMLQuantizationType.Q8_0 if dtype in ("q5_1", "q5_0", "q4_1", "q4_0") else qtype

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    name = (cfg.get("source") or {}).get("name") or Path(str(model_path)).name
    w = GGUFWriter(str(tmp), "llama")
    try:
        w.add_name(f"minichat {name}")
        w.add_context_length(c.max_seq_len)
        w.add_embedding_length(c.d_model)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.ff_dim)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.kv_heads)
        w.add_rope_freq_base(c.rope_theta)
        w.add_rope_dimension_count(c.head_dim)
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_vocab_size(c.vocab_size)
        w.add_file_type(_FILE_TYPES[dtype])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(fields["pre"])
        w.add_token_list(fields["tokens"])
        w.add_token_types(fields["types"])
        w.add_token_merges(fields["merges"])
        w.add_bos_token_id(tok.im_start_id)
        w.add_eos_token_id(tok.im_end_id)  # a ChatML reply ends with <|im_end|>
        w.add_pad_token_id(tok.pad_id)
        w.add_add_bos_token(False)
        w.add_add_space_prefix(False)
        w.add_chat_template(chatml_template(tok.meta.default_system))

        sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
        tensors = [("token_embd.weight", sd["embed.weight"])]
        for i in range(c.n_layer):
            for ours, theirs in _OURS_TO_GGUF.items():
                t = sd[f"layers.{i}.{ours}"]
                if ours == "attn.wq.weight":
                    t = permute_qk(t, c.n_head)
                elif ours == "attn.wk.weight":
                    t = permute_qk(t, c.kv_heads)
                tensors.append((f"blk.{i}.{theirs}", t))
        tensors.append(("output_norm.weight", sd["norm.weight"]))
        if not c.tie_embeddings:
            tensors.append(("output.weight", sd["lm_head.weight"]))
        for tname, t in tensors:
            t = np.ascontiguousarray(t, dtype=np.float32)
            q = embed_qtype if tname in ("token_embd.weight", "output.weight") else qtype
            if t.ndim == 1 or q == GGMLQuantizationType.F32:  # norms stay f32
                w.add_tensor(tname, t)
            elif q == GGMLQuantizationType.F16:
                w.add_tensor(tname, t.astype(np.float16))
            else:
                if q != GGMLQuantizationType.BF16 and t.shape[-1] % 32:
                    raise MinichatError(f"{dtype} needs rows that are a multiple of 32 wide; {tname} is {t.shape[-1]}")
                w.add_tensor(tname, quantize(t, q), raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(out), "dtype": dtype, "bytes": out.stat().st_size, "tensors": len(tensors),
            "parameters": model.num_params()}


def main(argv: list[str]) -> int:
    from minichat.hf_format import HF_DTYPES, export_hf

    ap = argparse.ArgumentParser(prog="minichat export", description="Write a minichat language model as a GGUF "
                                 "file that llama.cpp, Ollama and LM Studio load, or as a Hugging Face folder that "
                                 "transformers (and the tools built on it) load.")
    ap.add_argument("model", help="checkpoint or run folder (e.g. runs/pipeline/ppo), a .gguf, a Hugging Face "
                                  "folder, or smollm2")
    ap.add_argument("out", help="the .gguf file to write, or the folder for --format hf")
    ap.add_argument("--format", default="auto", choices=("auto", "gguf", "hf"),
                    help="auto (default): gguf when OUT ends in .gguf, else a Hugging Face folder")
    ap.add_argument("--dtype", default=None, choices=DTYPES,
                    help="weights' type (norms stay f32); default f16 for GGUF, f32 for Hugging Face "
                         f"({', '.join(HF_DTYPES)} there)")
    a = ap.parse_args(argv)
    fmt = a.format if a.format != "auto" else ("gguf" if a.out.endswith(".gguf") else "hf")
    if fmt == "hf":
        r = export_hf(a.model, a.out, a.dtype or "f32")
        print(f"wrote {r['path']}/: {r['parameters']:,} parameters as {r['dtype']}, {r['bytes'] / 2**20:.1f} MiB "
              f"(a Hugging Face LlamaForCausalLM folder)")
        return 0
    r = export_gguf(a.model, a.out, a.dtype or "f16")
    print(f"wrote {r['path']}: {r['parameters']:,} parameters as {r['dtype']}, {r['bytes'] / 2**20:.1f} MiB")
    return 0

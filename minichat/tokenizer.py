"""Tokenizers: byte-level BPE (Hugging Face `tokenizers`) and characters, plus the ChatML chat template.

Both kinds share one interface (encode, decode, vocab_size, special ids, render_chat, save/load), so the data
pipeline, the trainers and the engine never care which one a checkpoint uses.

Chat template (ChatML, as SmolLM2 uses):
    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n
render_chat returns the token ids and a mask that is True exactly on the assistant's content tokens and its
closing <|im_end|> (what SFT trains). Message content is always encoded as plain text.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from minichat.errors import MinichatError

ENDOFTEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIALS = [ENDOFTEXT, IM_START, IM_END, PAD]
ROLES = ("system", "developer", "user", "assistant")


@dataclass
class ChatMeta:
    """What a tokenizer needs beyond its vocabulary: which specials exist and the default system prompt."""

    kind: str = "bpe"  # "bpe" or "char"
    default_system: str | None = None  # SmolLM2's template inserts one when the conversation has none
    specials: list[str] = field(default_factory=lambda: list(SPECIALS))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class BaseTokenizer:
    meta: ChatMeta

    # --- interface each kind implements ---
    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...
    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...

    @property
    def vocab_size(self) -> int: ...

    # --- shared ---
    def _sid(self, tok: str) -> int | None:
        return self.token_to_id(tok) if tok in self.meta.specials else None

    @property
    def eos_id(self) -> int | None:
        return self._sid(ENDOFTEXT)

    @property
    def im_start_id(self) -> int | None:
        return self._sid(IM_START)

    @property
    def im_end_id(self) -> int | None:
        return self._sid(IM_END)

    @property
    def pad_id(self) -> int:
        pid = self._sid(PAD)
        if pid is None:
            pid = self.eos_id
        return 0 if pid is None else pid

    @property
    def special_ids(self) -> set[int]:
        return {i for i in (self.token_to_id(t) for t in self.meta.specials) if i is not None}

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an assistant turn."""
        return [i for i in (self.im_end_id, self.eos_id) if i is not None]

    def render_chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as ChatML text (for display and logs); validates roles and contents."""
        if self.im_start_id is None or self.im_end_id is None:
            raise MinichatError("this tokenizer has no chat tokens (<|im_start|>, <|im_end|>); train one with specials")
        parts: list[str] = []
        msgs = list(messages)
        if self.meta.default_system and (not msgs or msgs[0].get("role") not in ("system", "developer")):
            msgs.insert(0, {"role": "system", "content": self.meta.default_system})
        for i, m in enumerate(msgs):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise MinichatError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
            if not isinstance(content, str):
                raise MinichatError(f"message {i}: content must be a string")
            role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
            parts.append(f"{IM_START}{role}\n{content}{IM_END}\n")
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
        return "".join(parts)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and, per token, whether it is an assistant token to train on.

        Built piece by piece so that message content is always plain text: a user who types "<|im_end|>"
        gets those characters, never the control token (the byte-level pre-tokenizer splits at these
        boundaries anyway, so the ids equal tokenizing the rendered text)."""
        self.render_chat_text(messages, add_generation_prompt)  # validates roles and contents
        start, end = self.im_start_id, self.im_end_id
        newline = self.encode("\n")
        msgs = list(messages)
        if self.meta.default_system and (not msgs or msgs[0].get("role") not in ("system", "developer")):
            msgs.insert(0, {"role": "system", "content": self.meta.default_system})
        ids: list[int] = []
        mask: list[bool] = []

        def add(piece: list[int], train: bool) -> None:
            ids.extend(piece)
            mask.extend([train] * len(piece))

        for m in msgs:
            role = "system" if m["role"] == "developer" else m["role"]
            is_assistant = role == "assistant"
            add([start], False)
            add(self.encode(role + "\n"), False)
            add(self.encode(m["content"]), is_assistant)
            add([end], is_assistant)
            add(newline, False)
        if add_generation_prompt:
            add([start], False)
            add(self.encode("assistant\n"), False)
        return ids, mask


class BPETokenizer(BaseTokenizer):
    """Byte-level BPE over a Hugging Face `tokenizers.Tokenizer` (ours, or one built from a GGUF vocabulary)."""

    def __init__(self, tok, meta: ChatMeta | None = None):
        self.tok = tok
        self.meta = meta or ChatMeta()
        self._specials = set(self.meta.specials)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 256 + len(SPECIALS):
            raise MinichatError(f"BPE vocab_size must be at least {256 + len(SPECIALS)} (256 bytes + specials)")
        tok = Tokenizer(models.BPE())
        # digits one by one (arithmetic generalises better), then GPT-2's byte-level split
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, ChatMeta(kind="bpe"))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.tok.encode(text, add_special_tokens=False).ids
        return self._encode_plain(text)

    def _encode_plain(self, text: str) -> list[int]:
        # Special-token strings in user text must stay plain text, never become control tokens.
        if not any(s in text for s in self._specials):
            return self.tok.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for piece in _split_keep(text, self._specials):
            if piece in self._specials:
                ids += self.tok.encode(piece[0], add_special_tokens=False).ids
                ids += self.tok.encode(piece[1:], add_special_tokens=False).ids
            elif piece:
                ids += self.tok.encode(piece, add_special_tokens=False).ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if any(s in t for t in texts for s in self._specials):
            return [self._encode_plain(t) for t in texts]
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(d / "tokenizer.json", self.tok.to_str())
        _atomic_write(d / "tokenizer_meta.json", json.dumps(self.meta.__dict__, indent=2))


def _split_keep(text: str, specials: set[str]) -> Iterator[str]:
    i = 0
    while i < len(text):
        hits = [(text.find(s, i), s) for s in specials]
        hits = [(p, s) for p, s in hits if p >= 0]
        if not hits:
            yield text[i:]
            return
        p, s = min(hits)
        yield text[i:p]
        yield s
        i = p + len(s)


class CharTokenizer(BaseTokenizer):
    """One id per character (nanoGPT's shakespeare_char); specials, when wanted, follow the characters."""

    def __init__(self, chars: list[str], specials: list[str] | None = None):
        self.chars = list(chars)
        self.meta = ChatMeta(kind="char", specials=list(specials or []))
        self.itos = self.chars + self.meta.specials
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def train(cls, texts: Iterable[str], with_specials: bool = False) -> "CharTokenizer":
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return cls(sorted(chars), SPECIALS if with_specials else [])

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def token_to_id(self, token: str) -> int | None:
        return self.stoi.get(token)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        out = []
        for piece in _split_keep(text, set(self.meta.specials)) if (allow_special and self.meta.specials) else [text]:
            if piece in self.meta.specials:
                out.append(self.stoi[piece])
                continue
            for c in piece:
                i = self.stoi.get(c) if len(c) == 1 else None
                if i is None:
                    raise MinichatError(f"character {c!r} is not in this character-level vocabulary")
                out.append(i)
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        n = len(self.chars)
        return "".join(self.itos[i] for i in ids if not (skip_special and i >= n))

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        data = {"kind": "char", "chars": self.chars, "specials": self.meta.specials}
        _atomic_write(d / "tokenizer_char.json", json.dumps(data, ensure_ascii=False))


Tokenizer = BaseTokenizer  # the type other modules annotate with


def load_tokenizer(directory: str | Path) -> BaseTokenizer:
    d = Path(directory)
    if (d / "tokenizer_char.json").is_file():
        data = json.loads((d / "tokenizer_char.json").read_text(encoding="utf-8"))
        return CharTokenizer(data["chars"], data.get("specials") or [])
    if (d / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:
            raise MinichatError(f"{d / 'tokenizer.json'} is not a valid tokenizer file: {e}") from None
        meta = ChatMeta()
        if (d / "tokenizer_meta.json").is_file():
            meta = ChatMeta(**json.loads((d / "tokenizer_meta.json").read_text()))
        return BPETokenizer(tok, meta)
    raise MinichatError(f"no tokenizer in {d} (expected tokenizer.json or tokenizer_char.json)")

"""Conversations and `minichat chat`, a terminal chat in the manner of `ollama run` and `llama-cli`.

A Conversation keeps the system prompt and the turns, renders them with the chat template into token ids,
and, when the next turn would not fit the context window, drops the oldest turns while the system prompt
and the newest user message stay (the way ChatGPT only remembers what fits its context).

    minichat chat                          # talk to the built-in SmolLM2-135M-Instruct
    minichat chat --model runs/sft         # any minichat checkpoint
    minichat chat -p "Tell me a joke"      # one answer, then exit;  echo "hi" | minichat chat  works too
    minichat chat --temperature 0.2 --max_tokens 256 --verbose

Inside: /help, /clear, /system TEXT, /set temperature|top_p|top_k|max_tokens|seed|repetition_penalty|dry_multiplier VALUE,
/set verbose|quiet, /regen, /save FILE, /load FILE, /bye; multi-line input between \"\"\" lines;
Ctrl+C stops the current reply, Ctrl+D leaves.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from minichat.errors import ConfigError, MinichatError

HELP = """Commands:
  /help                      this list
  /clear                     forget the conversation (keeps the system prompt)
  /system TEXT               set the system prompt (and start over)
  /set PARAM VALUE           temperature, top_p, top_k, max_tokens, seed, repetition_penalty, dry_multiplier
  /set verbose | quiet       show or hide the timing line after each reply
  /regen                     answer the last message again
  /save FILE  /load FILE     write or read the conversation as JSON
  /bye                       leave (Ctrl+D works too)
Write \"\"\" on a line to start multi-line input and \"\"\" again to end it.
Ctrl+C stops a reply without leaving."""

SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "max_tokens": int, "seed": int,
            "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float,
            "dry_multiplier": float}


# ----------------------------------------------------------------------------------------------- conversation

class Conversation:
    """System prompt + alternating turns, rendered to fit a context window."""

    def __init__(self, tokenizer, system: str | None = None, context: int = 2048):
        self.tok = tokenizer
        self.system = system
        self.context = context
        self.messages: list[dict] = []  # user/assistant turns, oldest first
        self.dropped = 0  # turns left out of the last rendered prompt

    def add(self, role: str, content: str) -> None:
        if role not in ("user", "assistant"):
            raise MinichatError(f"a conversation turn is 'user' or 'assistant', got {role!r}")
        self.messages.append({"role": role, "content": content})

    def clear(self) -> None:
        self.messages.clear()

    def all_messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def _render(self, turns: list[dict]) -> list[int]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return self.tok.render_chat(head + turns, add_generation_prompt=True)[0]

    def prompt_ids(self, reserve: int = 0) -> list[int]:
        """Token ids of the conversation ending in the assistant's generation prompt, with room for
        `reserve` new tokens where possible. Oldest turns go first; the newest user message always stays."""
        from minichat.engine import ContextOverflowError

        msgs = self.messages
        if not msgs or msgs[-1]["role"] != "user":
            raise MinichatError("the conversation must end with a user message before the assistant answers")
        budget = self.context - max(0, reserve)
        ids = self._render(msgs)
        if len(ids) <= budget:
            self.dropped = 0
            return ids
        # the fewest dropped turns that fit (rendered length shrinks as more are dropped: binary search);
        # a kept history always starts with a user turn
        starts = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        lo, hi = 0, len(starts) - 1  # index into starts; starts[-1] keeps only the newest user message
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._render(msgs[starts[mid]:])) <= budget:
                hi = mid
            else:
                lo = mid + 1
        ids = self._render(msgs[starts[lo]:])
        self.dropped = starts[lo]
        if len(ids) >= self.context:  # even system + newest message leave no room for one token
            raise ContextOverflowError(
                f"your message does not fit: with the system prompt it takes {len(ids)} tokens and the "
                f"context window is {self.context}; shorten it"
            )
        return ids

    def to_json(self, params: dict | None = None) -> dict:
        return {"system": self.system, "messages": list(self.messages), "params": params or {}}

    def save(self, path: str | Path, params: dict | None = None) -> None:
        p = Path(path).expanduser()
        tmp = p.with_name(f".{p.name}.tmp")
        try:
            tmp.write_text(json.dumps(self.to_json(params), indent=2, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, p)
        except OSError as e:
            raise MinichatError(f"cannot write {p}: {e}") from None

    @staticmethod
    def read(path: str | Path) -> dict:
        """A saved conversation (ours, or a bare OpenAI-style list of messages), validated."""
        p = Path(path).expanduser()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise MinichatError(f"cannot read {p}: {e}") from None
        except json.JSONDecodeError as e:
            raise MinichatError(f"{p} is not JSON: {e}") from None
        if isinstance(data, list):
            data = {"messages": data}
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise MinichatError(f"{p}: expected {{'system': ..., 'messages': [...]}} or a list of messages")
        system = data.get("system")
        msgs = []
        for i, m in enumerate(data["messages"]):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise MinichatError(f"{p}: message {i} needs a role and a string content")
            if m.get("role") == "system":
                system = m["content"]
            elif m.get("role") in ("user", "assistant"):
                msgs.append({"role": m["role"], "content": m["content"]})
            else:
                raise MinichatError(f"{p}: message {i} has role {m.get('role')!r} (system, user or assistant)")
        if system is not None and not isinstance(system, str):
            raise MinichatError(f"{p}: system must be a string")
        return {"system": system, "messages": msgs, "params": data.get("params") or {}}


# ----------------------------------------------------------------------------------------------- moderation hook

class Guard:
    """The moderation hook between the person and the model.

    check_user(text) -> a reply to show instead of generating, or None to go ahead.
    reply_guard() -> an object with feed(delta) / finish() that returns a replacement text as soon as the
    streamed reply is flagged (generation then stops), or None.
    Backed by minichat.moderation's Moderator when it is available; otherwise lets everything through.
    """

    def __init__(self, moderator=None):
        self.mod = moderator

    @classmethod
    def load(cls, enabled: bool = True) -> "Guard":
        if not enabled:
            return cls(None)
        try:
            from minichat.moderation import Moderator
        except ImportError:
            return cls(None)
        mod = Moderator.load()
        mod.check("hello", audit=False)  # loads its scorer now, not in the middle of the first streamed reply
        return cls(mod)

    def check_user(self, text: str) -> str | None:
        if self.mod is None:
            return None
        res = self.mod.check(text)
        return self.mod.refusal_for(res) if res.flagged else None

    def reply_guard(self):
        return _ReplyGuard(self.mod)


class _ReplyGuard:
    def __init__(self, mod):
        self.mod = mod
        self.guard = mod.stream_guard() if mod is not None else None

    def feed(self, delta: str) -> str | None:
        if self.guard is None or not delta:
            return None
        hit = self.guard.feed(delta)
        return self.mod.refusal_for(hit) if hit else None

    def finish(self) -> str | None:
        if self.guard is None:
            return None
        hit = self.guard.finish()
        return self.mod.refusal_for(hit) if hit else None


# ----------------------------------------------------------------------------------------------- the REPL

@dataclass
class ChatConfig:
    model: str = "smollm2"  # "smollm2" (built in), a .gguf file, or a minichat checkpoint / run folder
    system: str | None = None  # None: the model's default (SmolLM2's template has one)
    temperature: float = 0.2  # SmolLM2's model card suggests 0.2, top_p 0.9
    top_p: float = 0.9
    top_k: int = 0
    max_tokens: int = 512
    repetition_penalty: float = 1.0  # >1 curbs loops, but penalises the prompt's words too
    dry_multiplier: float = 0.8  # DRY: penalises only extending a sequence the reply already wrote; 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    context: int = 0  # 0: the model's context window
    weights: str = "auto"  # engine weights: auto | fast | fp32 | bf16 | int8 | int4 | w8a8 (docs/parts/engine.md)
    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    verbose: bool = False  # timing line after each reply
    ignore_eos: bool = False  # keep generating past the end-of-turn token (until max_tokens)
    moderation: bool = True

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError("max_tokens must be >= 1")
        if self.context < 0:
            raise ConfigError("context must be >= 0")
        from minichat.engine import WEIGHT_MODES

        if self.weights not in WEIGHT_MODES:
            raise ConfigError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {self.weights!r}")
        self.params().validate()

    def params(self):
        from minichat.engine import SamplingParams

        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, repetition_penalty=self.repetition_penalty,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              dry_multiplier=self.dry_multiplier, stop_token_ids=[] if self.ignore_eos else None)


class ChatSession:
    """The state of one terminal chat: engine, conversation, settings, and how to print."""

    def __init__(self, cfg: ChatConfig, engine, tokenizer, guard: Guard, out=None, err=None):
        self.cfg, self.engine, self.tok, self.guard = cfg, engine, tokenizer, guard
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        ctx = min(cfg.context or engine.max_seq_len, engine.max_seq_len)
        self.conv = Conversation(tokenizer, cfg.system, ctx)
        self.turns = 0

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    # one assistant turn ---------------------------------------------------------------------
    def reply(self, user_text: str | None) -> str | None:
        """Add the user's message (unless regenerating), stream the answer, record it. Returns it."""
        from minichat.engine import Detokenizer

        if user_text is not None:
            refusal = self.guard.check_user(user_text)
            self.conv.add("user", user_text)
            if refusal is not None:
                self.say(refusal)
                self.conv.add("assistant", refusal)
                return refusal
        params = self.cfg.params()
        if params.seed is not None:
            params.seed += self.turns  # reproducible, yet not the same answer every turn
        self.turns += 1
        try:
            ids = self.conv.prompt_ids(reserve=min(params.max_tokens, self.conv.context // 4))
        except MinichatError:
            self.conv.messages.pop()
            raise
        if self.conv.dropped:
            self.err.write(f"(the oldest {self.conv.dropped} messages no longer fit the context and are left out)\n")
        detok = Detokenizer(self.tok)
        rguard = self.guard.reply_guard()
        shown, replaced = [], None
        t0 = time.perf_counter()
        t_first = None
        n_tokens = 0
        stream = self.engine.stream(ids, params)
        interrupted = False
        try:
            for ev in stream:
                if t_first is None:
                    t_first = time.perf_counter()
                n_tokens += 1
                piece = detok.push(ev.token_id)
                if ev.finished:
                    piece += detok.flush()
                replaced = rguard.feed(piece)
                if replaced is not None:
                    break
                if piece:
                    shown.append(piece)
                    self.say(piece, end="")
            if replaced is None:
                replaced = rguard.finish()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            stream.close()  # cancels the request if it is still running
        t_end = time.perf_counter()
        text = "".join(shown)
        if replaced is not None:
            self.say(("\n" if text else "") + replaced)
            text = replaced
        else:
            self.say("")
        if interrupted:
            self.err.write("(stopped)\n")
        self.conv.add("assistant", text)
        if self.cfg.verbose:
            self.timing(len(ids), n_tokens, t0, t_first or t_end, t_end)
        return text

    def timing(self, n_prompt, n_gen, t0, t_first, t_end) -> None:
        pre = max(t_first - t0, 1e-9)
        gen = t_end - t_first
        rate = (n_gen - 1) / gen if n_gen > 1 and gen > 0 else 0.0
        self.err.write(f"[prompt {n_prompt} tokens, {pre:.2f} s to first token ({n_prompt / pre:.0f} tok/s) | "
                       f"reply {n_gen} tokens, {rate:.1f} tok/s]\n")
        self.err.flush()

    # commands -----------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        name = name.lower()
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name in ("/help", "/?"):
            self.say(HELP)
        elif name == "/clear":
            self.conv.clear()
            self.say("(conversation cleared)")
        elif name == "/system":
            if not arg:
                self.say(f"system prompt: {self.conv.system or self.tok.meta.default_system or '(none)'}")
            else:
                self.conv.system = arg
                self.conv.clear()
                self.say("(system prompt set; conversation cleared)")
        elif name == "/set":
            self._set(arg)
        elif name == "/regen":
            if not self.conv.messages:
                self.say("(nothing to regenerate yet)")
            else:
                if self.conv.messages[-1]["role"] == "assistant":
                    self.conv.messages.pop()
                self.reply(None)
        elif name == "/save":
            if not arg:
                self.say("usage: /save FILE")
            else:
                self.conv.save(arg, params=self._params_dict())
                self.say(f"(saved {len(self.conv.messages)} messages to {arg})")
        elif name == "/load":
            if not arg:
                self.say("usage: /load FILE")
            else:
                data = Conversation.read(arg)
                self.conv.system = data["system"]
                self.conv.messages = data["messages"]
                for k, v in data["params"].items():
                    if k in SETTABLE:
                        self._set(f"{k} {v}", quiet=True)
                self.say(f"(loaded {len(self.conv.messages)} messages from {arg})")
                for m in self.conv.messages[-2:]:
                    self.say(f"{m['role']}: {m['content']}")
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def _params_dict(self) -> dict:
        return {k: getattr(self.cfg, k) for k in SETTABLE}

    def _set(self, arg: str, quiet: bool = False) -> None:
        key, _, val = arg.partition(" ")
        key, val = key.strip().lower(), val.strip()
        if key in ("verbose", "quiet") and not val:
            self.cfg.verbose = key == "verbose"
            if not quiet:
                self.say(f"(timing line {'on' if self.cfg.verbose else 'off'})")
            return
        if key not in SETTABLE or not val:
            self.say(f"usage: /set {'|'.join(SETTABLE)} VALUE   or   /set verbose|quiet")
            return
        old = getattr(self.cfg, key)
        try:
            new = None if (key == "seed" and val.lower() in ("none", "off")) else SETTABLE[key](val)
            setattr(self.cfg, key, new)
            self.cfg.params().validate()
        except (ValueError, MinichatError) as e:
            setattr(self.cfg, key, old)
            self.say(f"cannot set {key} to {val!r}: {e}")
            return
        if not quiet:
            self.say(f"({key} = {new})")


def read_input(prompt: str) -> str:
    """One message from the person: a line, or several between \"\"\" lines. Raises EOFError on Ctrl+D."""
    line = input(prompt)
    if not line.strip().startswith('"""'):
        return line
    first = line.strip()[3:]
    if first.endswith('"""') and len(first) >= 3:
        return first[:-3]
    lines = [first] if first else []
    while True:
        nxt = input("... ")
        if nxt.rstrip().endswith('"""'):
            lines.append(nxt.rstrip()[:-3])
            break
        lines.append(nxt)
    return "\n".join(lines).strip("\n")


def repl(session: ChatSession) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    session.say(f"minichat chat — {session.engine.describe()}. /help for commands, /bye or Ctrl+D to leave.")
    while True:
        try:
            text = read_input(">>> ")
        except EOFError:
            session.say("")
            return 0
        except KeyboardInterrupt:
            session.say("\n(use Ctrl+D or /bye to leave)")
            continue
        if not text.strip():
            continue
        try:
            if text.startswith("/"):
                if not session.command(text):
                    return 0
                continue
            session.reply(text)
        except KeyboardInterrupt:
            session.say("\n(stopped)")
        except MinichatError as e:
            session.say(f"error: {e}")


def _add_options(ap) -> None:
    ap.add_argument("-p", "--prompt", help="answer this one message and exit (stdin, if piped, is appended)")
    ap.add_argument("--no-moderation", action="store_true", help="do not moderate messages and replies")


def main(argv: list[str]) -> int:
    from minichat import config as cfglib

    cfg, ns = cfglib.build(ChatConfig, argv, prog="minichat chat", description=__doc__.split("\n\n")[0],
                           extra=_add_options)
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from minichat.engine import Engine
    from minichat.gguf_import import load

    model, tok, mcfg = load(cfg.model, device=cfg.device)
    if tok.im_start_id is None:
        raise MinichatError(f"{cfg.model} has no chat tokens (<|im_start|>/<|im_end|>); chat needs a chat model")
    # each turn resends the conversation: its prefix cache computes only the new message (and the reply so far)
    engine = Engine(model, tok, weights=cfg.weights, max_batch=4, prefix_cache=8192)
    engine.name = str(cfg.model)
    if torch.get_num_threads() > 1:  # one thread while another busy process makes that faster
        from minichat.runtime import ThreadTuner

        engine.thread_tuner = ThreadTuner(torch.get_num_threads())
    session = ChatSession(cfg, engine, tok, Guard.load(cfg.moderation and not ns.no_moderation))

    piped = not sys.stdin.isatty()
    if ns.prompt is not None or piped:
        text = ns.prompt or ""
        if piped:
            extra = sys.stdin.read().strip()
            text = f"{text}\n\n{extra}".strip() if extra else text
        if not text.strip():
            raise MinichatError("nothing to answer: give -p PROMPT or pipe text into minichat chat")
        session.reply(text)
        return 0
    return repl(session)

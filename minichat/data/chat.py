"""Chat datasets for SFT, reward modelling, PPO and DPO: reading, validating and tokenizing.

Accepted JSONL rows (one object a line; .gz is fine):
  SFT           {"messages": [{"role", "content"}, ...]}              OpenAI-style, multi-turn
                {"tools": [...], "messages": [... {"role": "assistant", "tool_calls": [...]}, {"role": "tool"} ...]}
                                                                     tool calls, rendered as minichat.toolcall does
                {"prompt": str | messages, "response": str}           ("completion" works too)
                {"instruction", "input"?, "output"}                   Alpaca
  preferences   {"prompt": str | messages, "answers": [best, ..., worst], "ranks"?: [0, 1, 1, 2]}  K-wise, ties
                (with "tools", prompts may hold tool calls and results and an answer may be an assistant message
                with tool_calls; prompts for PPO likewise)
                {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
                {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}  Anthropic HH transcripts
                {"input": {"messages": [...]}, "preferred_output": [assistant], "non_preferred_output": [...]}
                                                                     OpenAI's preference fine-tuning rows
  prompts       {"prompt": str | messages} or {"messages": [...]}, or a .txt file with one prompt a line

A malformed line stops with "file:line: what is wrong". Rows that are well formed but unusable (fewer than two
answers, empty answers, all answers tied, nothing left to train after truncation) are skipped, and prompts that
do not fit the context are truncated from the left; each case is counted in a DataReport and summarised.
"""
from __future__ import annotations

import bisect
import gzip
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from minichat.errors import MinichatError
from minichat.tokenizer import ROLES

Messages = list[dict]


@dataclass
class DataReport:
    """Counted warnings about skipped or changed rows, with the first place each kind happened."""

    name: str = "data"
    counts: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def warn(self, kind: str, where: str) -> None:
        self.counts[kind] += 1
        self.first.setdefault(kind, where)

    def summary(self) -> str:
        if not self.counts:
            return f"[{self.name}] all rows used"
        parts = [f"{n} {k.replace('_', ' ')} (first at {self.first[k]})" for k, n in sorted(self.counts.items())]
        return f"[{self.name}] warnings: " + "; ".join(parts)


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(location "file:line", object) per non-blank line; a line that is not a JSON object is an error."""
    p = Path(path)
    if not p.is_file():
        raise MinichatError(f"data file {p} does not exist")
    with _open(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MinichatError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise MinichatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def check_messages(msgs, where: str) -> Messages:
    if not isinstance(msgs, list) or not msgs:
        raise MinichatError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise MinichatError(f"{where}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": string}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _as_prompt(value, where: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return check_messages(value, where)


def _as_answer(value, where: str) -> str:
    """An answer given as a string or as messages (the content of the last assistant message); an assistant
    message with tool_calls is the calls' text, as minichat.toolcall writes them."""
    if isinstance(value, str):
        return value
    tools = isinstance(value, dict) or _tool_fields(value)
    msgs = check_tool_messages(value, where) if tools else check_messages(value, where)
    if msgs[-1]["role"] != "assistant":
        raise MinichatError(f"{where}: an answer given as messages must end with an assistant message")
    if not tools:
        return msgs[-1]["content"]
    from minichat import toolcall

    return toolcall.prompt_messages(msgs[-1:], [], "none", None)[0]["content"]


# --- SFT ---------------------------------------------------------------------------------------------------

def _tool_fields(value) -> bool:
    """Whether messages (a list, or one message) use OpenAI's tool fields."""
    msgs = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
    return any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in msgs)


def _has_tools(obj: dict) -> bool:
    return bool(obj.get("tools")) or any(_tool_fields(obj.get(k)) for k in
                                         ("messages", "prompt", "chosen", "rejected", "answers", "responses"))


def _functions(obj: dict, where: str) -> list[dict]:
    from minichat import toolcall

    try:
        return toolcall.check_tools(obj.get("tools"), "auto")
    except toolcall.ToolError as e:
        raise MinichatError(f"{where}: {e}") from None


def check_tool_messages(msgs, where: str) -> list[dict]:
    """Messages that may carry tool fields (assistant tool_calls, tool messages), validated."""
    from minichat import toolcall

    if isinstance(msgs, dict):
        msgs = [msgs]
    if not isinstance(msgs, list) or not msgs:
        raise MinichatError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES + ("tool",) or not (isinstance(content, str) or (content is None and m.get("tool_calls"))):
            raise MinichatError(f"{where}: message {i} must have a role ({', '.join(ROLES)} or tool) and a string "
                                "content (an assistant message with tool_calls may have none)")
        try:
            toolcall.check_message(m)
        except toolcall.ToolError as e:
            raise MinichatError(f"{where}: message {i}: {e}") from None
    return msgs


def tool_conversation(obj: dict, where: str, default_system: str | None, key: str = "messages") -> Messages:
    """A conversation with OpenAI tool fields ("tools", assistant "tool_calls", "tool" messages) as the plain
    messages the model reads: the same rendering the server gives such a conversation (minichat.toolcall)."""
    from minichat import toolcall

    value = obj.get(key)
    msgs = [{"role": "user", "content": value}] if isinstance(value, str) else check_tool_messages(value, where)
    return toolcall.prompt_messages(msgs, _functions(obj, where), "auto", default_system)


def sft_conversation(obj: dict, where: str, default_system: str | None = None) -> Messages:
    if "messages" in obj and _has_tools(obj):
        return tool_conversation(obj, where, default_system)
    if "messages" in obj:
        return check_messages(obj["messages"], where)
    if "prompt" in obj and ("response" in obj or "completion" in obj):
        answer = obj.get("response", obj.get("completion"))
        return _as_prompt(obj["prompt"], where) + [{"role": "assistant", "content": _as_answer(answer, where)}]
    if "instruction" in obj and "output" in obj:
        user = str(obj["instruction"])
        if obj.get("input"):
            user += "\n\n" + str(obj["input"])
        return [{"role": "user", "content": user}, {"role": "assistant", "content": str(obj["output"])}]
    raise MinichatError(f"{where}: expected 'messages', 'prompt'+'response' or 'instruction'+'output' fields "
                        f"(got {', '.join(sorted(obj)) or 'none'})")


def load_sft(path: str | Path, report: DataReport | None = None, default_system: str | None = None) -> list[Messages]:
    """default_system: the tokenizer's default system prompt, which rows with tools keep in front of the
    tools' description, as the server does."""
    report = report or DataReport("sft")
    out = []
    for where, obj in read_jsonl(path):
        conv = sft_conversation(obj, where, default_system)
        answers = [m for m in conv if m["role"] == "assistant"]
        if not answers:
            report.warn("conversations_without_assistant_turn", where)
            continue
        if all(not m["content"].strip() for m in answers):
            report.warn("empty_answers", where)
            continue
        out.append(conv)
    if not out:
        raise MinichatError(f"{path}: no usable conversations ({report.summary()})")
    return out


@dataclass
class SFTExample:
    ids: list[int]
    mask: list[bool]  # True on tokens the loss trains (assistant content + <|im_end|>)


def encode_sft(convs: list[Messages], tok, max_len: int, report: DataReport | None = None) -> list[SFTExample]:
    """Render with the chat template; keep at most max_len + 1 tokens (inputs + one shifted target)."""
    report = report or DataReport("sft")
    out = []
    for i, conv in enumerate(convs):
        ids, mask = tok.render_chat(conv, add_generation_prompt=False)
        if len(ids) > max_len + 1:
            report.warn("conversations_truncated_to_context", f"conversation {i}")
            ids, mask = ids[:max_len + 1], mask[:max_len + 1]
        if not any(mask[1:]):
            report.warn("conversations_with_nothing_to_train_after_truncation", f"conversation {i}")
            continue
        out.append(SFTExample(ids, mask))
    return out


class EpochSampler:
    """The global batch for a step: successive epochs of seeded permutations, so a resumed run and any number
    of processes see exactly the batches a single uninterrupted run would."""

    def __init__(self, n: int, seed: int = 0):
        if n <= 0:
            raise MinichatError("no training examples")
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def indices(self, step: int, batch: int, part: int = 0, n_parts: int = 1) -> list[int]:
        per = batch // n_parts
        out = []
        for pos in range(step * batch + part * per, step * batch + (part + 1) * per):
            epoch, k = divmod(pos, self.n)
            if epoch not in self._perms:
                self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
            out.append(int(self._perms[epoch][k]))
        return out


class Sequences:
    """SFT rows of (ids, mask) in seeded epoch order. `pack` puts whole conversations together into rows of at
    most seq_len + 1 tokens (best fit, longest first: few pad tokens) and records which conversation each token
    belongs to, so attention and positions stay within a conversation (`Transformer(doc_ids=...)`)."""

    def __init__(self, examples: list[SFTExample], seq_len: int, pad_id: int, pack: bool, seed: int = 0):
        self.seq_len, self.pad_id, self.pack = seq_len, pad_id, pack
        self.rows = pack_examples(examples, seq_len + 1) if pack else examples
        self.sampler = EpochSampler(len(self.rows), seed)

    def __len__(self) -> int:
        return len(self.rows)

    def num_tokens(self) -> int:
        return sum(len(r.ids) - 1 for r in self.rows)

    def batch(self, step: int, batch: int, part: int = 0, n_parts: int = 1):
        """(x, y, loss mask, doc ids or None) right-padded to the longest row; part::n_parts of the global batch."""
        return collate_sft([self.rows[i] for i in self.sampler.indices(step, batch, part, n_parts)], self.pad_id,
                           self.pack)

    def all_batches(self, batch: int):
        for s in range(0, len(self.rows), batch):
            yield collate_sft(self.rows[s:s + batch], self.pad_id, self.pack)


@dataclass
class PackedRow(SFTExample):
    docs: list[int] = field(default_factory=list)  # per token: which of the row's conversations it belongs to


def pack_examples(examples: list[SFTExample], capacity: int) -> list[PackedRow]:
    """Best-fit decreasing bin packing of whole conversations into rows of at most `capacity` tokens.
    Deterministic: ties keep the input order. A conversation's first target is never trained (it would be
    predicted from the previous conversation's last token)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].ids), i))
    free: list[tuple[int, int]] = []  # (tokens still free, row index), sorted
    rows: list[list[int]] = []
    for i in order:
        n = len(examples[i].ids)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    out = []
    for members in rows:
        members.sort()  # conversations in file order within a row
        ids, mask, docs = [], [], []
        for j, i in enumerate(members):
            e = examples[i]
            ids += e.ids
            mask += [False] + list(e.mask[1:])
            docs += [j] * len(e.ids)
        out.append(PackedRow(ids, mask, docs))
    return out


def collate_sft(rows: list[SFTExample], pad_id: int, with_docs: bool = False):
    """x, y (B, L) ids and their shift, m (B, L) loss mask; with_docs: also doc ids (B, L), -1 on padding."""
    import torch

    L = max(len(r.ids) for r in rows) - 1
    x = torch.full((len(rows), L), pad_id, dtype=torch.long)
    y = torch.full((len(rows), L), pad_id, dtype=torch.long)
    m = torch.zeros((len(rows), L), dtype=torch.float32)
    d = torch.full((len(rows), L), -1, dtype=torch.long) if with_docs else None
    for i, r in enumerate(rows):
        n = len(r.ids) - 1
        x[i, :n] = torch.tensor(r.ids[:-1])
        y[i, :n] = torch.tensor(r.ids[1:])
        m[i, :n] = torch.tensor(r.mask[1:], dtype=torch.float32)  # target t is trained if it is an assistant token
        if d is not None:
            d[i, :n] = torch.tensor(r.docs[:-1] if isinstance(r, PackedRow) else [0] * n)
    return (x, y, m, d) if with_docs else (x, y, m)


# --- preferences -------------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """One prompt with K >= 2 answers; ranks[i] is answer i's place (0 = best; equal ranks are ties)."""

    prompt: Messages
    answers: list[str]
    ranks: list[int]
    where: str = ""


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh(text: str, where: str = "") -> Messages:
    """An Anthropic HH transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." as chat messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise MinichatError(f"{where}: not an HH transcript (expected it to start with '\\n\\nHuman:')")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return msgs


class DivergentPair(MinichatError):
    """A chosen/rejected transcript pair that differs before its last turn. Real data has a few (4 of Anthropic
    HH harmless's 1,835 development pairs: an answer that itself contains "Human:"), so a loader skips and counts
    them rather than losing the whole file to them."""


def comparison_from_row(obj: dict, where: str, default_system: str | None = None) -> Comparison:
    """default_system: the tokenizer's default system prompt, kept before the tools' description in rows with
    tools (as the server does)."""
    if "preferred_output" in obj or "non_preferred_output" in obj:  # OpenAI's DPO fine-tuning format
        obj = _from_openai_preference(obj, where)
    if _has_tools(obj) and "prompt" in obj:  # tool calls in the prompt or the answers, rendered as minichat.toolcall
        prompt = tool_conversation(obj, where, default_system, key="prompt")
        key = next((k for k in ("answers", "responses", "completions") if k in obj), None)
        if key is None and not ("chosen" in obj and "rejected" in obj):
            raise MinichatError(f"{where}: a row with tools needs 'prompt' and 'answers' or 'chosen'+'rejected'")
        answers = obj[key] if key else [obj["chosen"], obj["rejected"]]
        if not isinstance(answers, list):
            raise MinichatError(f"{where}: '{key}' must be a list of answers, best first")
        answers = [_as_answer(a, where) for a in answers]
        ranks = obj.get("ranks", list(range(len(answers)))) if key else [0, 1]
        if not isinstance(ranks, list) or len(ranks) != len(answers) or not all(isinstance(r, int) for r in ranks):
            raise MinichatError(f"{where}: 'ranks' must be one integer per answer (0 = best, equal = tie)")
        return Comparison(prompt, answers, list(ranks), where)
    for key in ("answers", "responses", "completions"):
        if key in obj:
            if "prompt" not in obj:
                raise MinichatError(f"{where}: a ranking needs a 'prompt' beside '{key}'")
            answers = obj[key]
            if not isinstance(answers, list) or not all(isinstance(a, (str, list)) for a in answers):
                raise MinichatError(f"{where}: '{key}' must be a list of answers (strings), best first")
            answers = [_as_answer(a, where) for a in answers]
            ranks = obj.get("ranks", list(range(len(answers))))
            if not isinstance(ranks, list) or len(ranks) != len(answers) or not all(isinstance(r, int) for r in ranks):
                raise MinichatError(f"{where}: 'ranks' must be one integer per answer (0 = best, equal = tie)")
            return Comparison(_as_prompt(obj["prompt"], where), answers, list(ranks), where)
    if "chosen" in obj and "rejected" in obj:
        ch, rj = obj["chosen"], obj["rejected"]
        if "prompt" in obj:
            return Comparison(_as_prompt(obj["prompt"], where), [_as_answer(ch, where), _as_answer(rj, where)], [0, 1], where)
        if isinstance(ch, str) and isinstance(rj, str):
            ch, rj = parse_hh(ch, where), parse_hh(rj, where)
        else:
            ch, rj = check_messages(ch, where), check_messages(rj, where)
        if ch[-1]["role"] != "assistant" or rj[-1]["role"] != "assistant":
            raise MinichatError(f"{where}: 'chosen' and 'rejected' must end with an assistant turn")
        if ch[:-1] != rj[:-1]:
            raise DivergentPair(f"{where}: 'chosen' and 'rejected' must share every turn but the last")
        return Comparison(ch[:-1], [ch[-1]["content"], rj[-1]["content"]], [0, 1], where)
    raise MinichatError(f"{where}: expected 'prompt'+'answers', 'prompt'+'chosen'+'rejected', or HH 'chosen'+'rejected' "
                        f"(got {', '.join(sorted(obj)) or 'none'})")


def _from_openai_preference(obj: dict, where: str) -> dict:
    """{"input": {"messages", "tools"?}, "preferred_output": [msg], "non_preferred_output": [msg]} as a
    prompt/chosen/rejected row."""
    inp = obj.get("input")
    if not isinstance(inp, dict) or not isinstance(inp.get("messages"), list):
        raise MinichatError(f"{where}: 'input' must be an object with 'messages'")
    out = {"prompt": inp["messages"]}
    for ours, theirs in (("chosen", "preferred_output"), ("rejected", "non_preferred_output")):
        v = obj.get(theirs)
        if not isinstance(v, list) or not v or not isinstance(v[-1], dict) or v[-1].get("role") != "assistant":
            raise MinichatError(f"{where}: '{theirs}' must be a list ending with an assistant message")
        out[ours] = v[-1] if v[-1].get("tool_calls") else v[-1].get("content") or ""
    if inp.get("tools"):
        out["tools"] = inp["tools"]
    return out


def clean_comparison(c: Comparison, report: DataReport) -> Comparison | None:
    keep = [i for i, a in enumerate(c.answers) if a.strip()]
    if len(keep) < len(c.answers):
        report.warn("empty_answers_dropped", c.where)
    answers, ranks = [c.answers[i] for i in keep], [c.ranks[i] for i in keep]
    if len(answers) < 2:
        report.warn("rankings_with_fewer_than_two_answers_skipped", c.where)
        return None
    if len(set(ranks)) < 2:
        report.warn("rankings_with_all_answers_tied_skipped", c.where)
        return None
    return Comparison(c.prompt, answers, ranks, c.where)


def load_comparisons(path: str | Path, report: DataReport | None = None, limit: int = 0,
                     default_system: str | None = None) -> list[Comparison]:
    report = report or DataReport("preferences")
    out = []
    for where, obj in read_jsonl(path):
        try:
            c = clean_comparison(comparison_from_row(obj, where, default_system), report)
        except DivergentPair:
            report.warn("pairs_that_differ_before_the_last_turn_skipped", where)
            continue
        if c is not None:
            out.append(c)
            if limit and len(out) >= limit:
                break
    if not out:
        raise MinichatError(f"{path}: no usable comparisons ({report.summary()})")
    return out


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, then the last `fraction` held out (at least one of each)."""
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = min(len(items) - 1, max(1, int(round(len(items) * fraction)))) if len(items) > 1 else 0
    val = [items[i] for i in order[len(items) - n_val:]]
    train = [items[i] for i in order[:len(items) - n_val]]
    return train, val


@dataclass
class EncodedComparison:
    prompt: list[int]  # ends with "<|im_start|>assistant\n"
    answers: list[list[int]]  # each ends with <|im_end|>
    ranks: list[int]


def encode_answer_turn(tok, prompt: Messages, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) split where the template's assistant mask starts, so ids are exactly what the
    whole conversation tokenizes to; the answer ends with <|im_end|> (the token the reward is read at)."""
    ids, mask = tok.render_chat(prompt + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
    last = max(i for i, m in enumerate(mask) if m)
    start = last
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids[:start], ids[start:last + 1]


def fit_to_context(prompt: list[int], answers: list[list[int]], max_len: int, report: DataReport, where: str,
                   min_prompt: int = 8) -> tuple[list[int], list[list[int]]] | None:
    """Cut answers to leave room for a little prompt, then the prompt from the left, so prompt + answer fits."""
    room = max_len - min(len(prompt), min_prompt)
    if any(len(a) > room for a in answers):
        report.warn("answers_truncated_to_context", where)
        answers = [a[:room] for a in answers]
    longest = max(len(a) for a in answers)
    if len(prompt) + longest > max_len:
        report.warn("prompts_truncated_from_the_left", where)
        prompt = prompt[len(prompt) + longest - max_len:]
    if not prompt:
        report.warn("comparisons_without_room_for_the_prompt_skipped", where)
        return None
    return prompt, answers


def encode_comparisons(comps: list[Comparison], tok, max_len: int, report: DataReport | None = None) -> list[EncodedComparison]:
    report = report or DataReport("preferences")
    out = []
    for c in comps:
        pairs = [encode_answer_turn(tok, c.prompt, a) for a in c.answers]
        # the shared prompt is the common prefix (the same for every answer unless BPE merged across the seam)
        base, n = pairs[0][0], min(len(p) for p, _ in pairs)
        for p, _ in pairs[1:]:
            n = next((k for k in range(n) if p[k] != base[k]), n)
        prompt = base[:n]
        answers = [(p + a)[n:] for p, a in pairs]
        fitted = fit_to_context(prompt, answers, max_len, report, c.where)
        if fitted is not None:
            out.append(EncodedComparison(fitted[0], fitted[1], list(c.ranks)))
    return out


# --- prompts -----------------------------------------------------------------------------------------------

def load_prompts(path: str | Path, default_system: str | None = None) -> list[Messages]:
    """Prompts for PPO or best-of-N: JSONL rows with 'prompt' or 'messages' (a trailing assistant turn is
    dropped; rows with tools are rendered as minichat.toolcall does), or a .txt file with one prompt a line."""
    p = Path(path)
    if not p.is_file():
        raise MinichatError(f"prompt file {p} does not exist")
    if p.suffix == ".txt":
        out = [[{"role": "user", "content": line.strip()}] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        out = []
        for where, obj in read_jsonl(p):
            if _has_tools(obj) and ("messages" in obj or "prompt" in obj):
                msgs = tool_conversation(obj, where, default_system, key="messages" if "messages" in obj else "prompt")
            elif "messages" in obj:
                msgs = check_messages(obj["messages"], where)
            elif "prompt" in obj:
                msgs = _as_prompt(obj["prompt"], where)
            elif "chosen" in obj:  # a preference row: its prompt
                try:
                    msgs = comparison_from_row(obj, where).prompt
                except DivergentPair:  # the chosen transcript's own turns are still a prompt
                    ch = obj["chosen"]
                    msgs = parse_hh(ch, where) if isinstance(ch, str) else check_messages(ch, where)
            else:
                raise MinichatError(f"{where}: expected a 'prompt' or 'messages' field")
            while msgs and msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if not msgs:
                raise MinichatError(f"{where}: the prompt has no user turn")
            out.append(msgs)
    if not out:
        raise MinichatError(f"prompt file {p} has no prompts")
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Atomically write rows as JSONL."""
    import os

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, p)


def collate_rankings(rows: list[EncodedComparison], pad_id: int, share_prompt: bool = True) -> dict:
    """A reward-model batch: each comparison is one element holding its K answers and all their ordered pairs.

    share_prompt: prompts (B, P) left-padded + answers (N, A) right-padded, so each prompt is encoded once for
    its K answers (ScalarModel reuses its keys and values); otherwise N full prompt+answer rows, left-padded.
    Pairs index the N answers: pair_w beats pair_l, and pair_group names the comparison (the loss's 1/C(K,2)).
    """
    import torch

    from minichat.losses import ranking_pairs

    owner, w, l, g, flat = [], [], [], [], []
    for b, r in enumerate(rows):
        base = len(flat)
        for a in r.answers:
            owner.append(b)
            flat.append(a)
        for i, j in ranking_pairs(r.ranks):
            w.append(base + i)
            l.append(base + j)
            g.append(b)
    out = {"pair_w": torch.tensor(w), "pair_l": torch.tensor(l), "pair_group": torch.tensor(g)}
    if share_prompt:
        P = max(len(r.prompt) for r in rows)
        prompts = torch.full((len(rows), P), pad_id, dtype=torch.long)
        pmask = torch.zeros((len(rows), P), dtype=torch.bool)
        for b, r in enumerate(rows):
            prompts[b, P - len(r.prompt):] = torch.tensor(r.prompt)
            pmask[b, P - len(r.prompt):] = True
        A = max(len(a) for a in flat)
        answers = torch.full((len(flat), A), pad_id, dtype=torch.long)
        for i, a in enumerate(flat):
            answers[i, :len(a)] = torch.tensor(a)
        out.update(ids=prompts, key_mask=None if bool(pmask.all()) else pmask, answers=answers,
                   answer_lens=torch.tensor([len(a) for a in flat]), owner=torch.tensor(owner))
    else:
        seqs = [rows[o].prompt + a for o, a in zip(owner, flat)]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, L - len(s):] = torch.tensor(s)
            mask[i, L - len(s):] = True
        out.update(ids=ids, key_mask=None if bool(mask.all()) else mask)
    out["n_tokens"] = sum(len(r.prompt) for r in rows) * (1 if share_prompt else 0) + sum(
        len(a) + (0 if share_prompt else len(rows[o].prompt)) for o, a in zip(owner, flat))
    return out

"""Conversations (history that outgrows the context) and `minichat chat` driven as a person would: through a
pseudo-terminal, with a tiny saved checkpoint."""
import json
import os
import subprocess
import sys

import pytest

from tests.engine.engine_util import make_tiny
from minichat.chat import Conversation
from minichat.engine import ContextOverflowError
from minichat.errors import MinichatError


@pytest.fixture(scope="module")
def tok():
    return make_tiny()[1]


def test_conversation_renders_the_chat_template(tok):
    c = Conversation(tok, system="Be kind.", context=500)
    c.add("user", "Hello there!")
    ids = c.prompt_ids()
    assert ids == tok.render_chat([{"role": "system", "content": "Be kind."},
                                   {"role": "user", "content": "Hello there!"}])[0]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n") and c.dropped == 0
    with pytest.raises(MinichatError, match="end with a user message"):
        c.add("assistant", "Hi!")
        c.prompt_ids()
    with pytest.raises(MinichatError):
        c.add("system", "no")


def test_history_longer_than_the_context_drops_oldest_turns(tok):
    c = Conversation(tok, system="Be kind.", context=300)
    for i in range(30):  # far more than 300 tokens of history
        c.add("user", f"Question number {i}: the cat sat on the mat?")
        c.add("assistant", f"Answer number {i}: the dog sat on the log.")
    c.add("user", "The newest question!")
    ids = c.prompt_ids(reserve=20)
    text = tok.decode(ids)
    assert len(ids) <= 280 and c.dropped > 0
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>")  # the system prompt stays
    assert text.endswith("The newest question!<|im_end|>\n<|im_start|>assistant\n")  # so does the newest turn
    assert "Answer number 29" in text and "number 0:" not in text  # the oldest go first
    kept = text.split("<|im_end|>\n", 1)[1]
    assert kept.startswith("<|im_start|>user\n")  # the kept history starts with a user turn
    # the most that fits: dropping one turn fewer would not fit
    msgs = c.messages[c.dropped - 2:]
    assert len(tok.render_chat([{"role": "system", "content": "Be kind."}] + msgs)[0]) > 280
    # a newest message that cannot fit at all is a clear error
    c.add("assistant", "ok")
    c.add("user", "cat " * 400)
    with pytest.raises(ContextOverflowError, match="does not fit"):
        c.prompt_ids(reserve=20)


def test_default_system_prompt_comes_from_the_tokenizer(tok):
    tok2 = make_tiny()[1]
    tok2.meta.default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    c = Conversation(tok2, context=500)
    c.add("user", "hi")
    assert "named SmolLM" in tok2.decode(c.prompt_ids())


def test_save_and_load(tmp_path, tok):
    c = Conversation(tok, system="Sys", context=500)
    c.add("user", "a")
    c.add("assistant", "b")
    f = tmp_path / "conv.json"
    c.save(f, params={"temperature": 0.5})
    data = Conversation.read(f)
    assert data == {"system": "Sys", "messages": c.messages, "params": {"temperature": 0.5}}
    (tmp_path / "list.json").write_text(json.dumps([{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]))
    assert Conversation.read(tmp_path / "list.json")["system"] == "S"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MinichatError, match="not JSON"):
        Conversation.read(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}))
    with pytest.raises(MinichatError, match="robot"):
        Conversation.read(tmp_path / "bad2.json")
    with pytest.raises(MinichatError, match="cannot read"):
        Conversation.read(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------- the terminal

def _cmd(ckpt, *extra):
    return [sys.executable, "-m", "minichat.cli", "chat", "--model", str(ckpt), "--threads", "1",
            "--no-moderation", *extra]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", TERM="dumb")


def test_terminal_session(tiny_ckpt, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    cmd = _cmd(tiny_ckpt, "--temperature", "0", "--max_tokens", "6")
    child = pexpect.spawn(cmd[0], cmd[1:], env=_env(), encoding="utf-8", timeout=60, cwd=str(tmp_path))
    try:
        child.expect("minichat chat")
        child.expect(">>> ")
        child.sendline("/help")
        child.expect("/regen")
        child.expect(">>> ")
        child.sendline("Hello there!")
        child.expect(">>> ")  # the streamed reply, then the prompt again
        child.sendline("/set temperature 0.5")
        child.expect(r"\(temperature = 0.5\)")
        child.sendline("/set top_p 7")
        child.expect("cannot set top_p")
        child.sendline("/set verbose")
        child.expect("timing line on")
        child.sendline('"""')
        child.expect(r"\.\.\. ")
        child.sendline("line one")
        child.sendline('line two"""')
        child.expect(r"tok/s\]")  # the timing line after the reply
        child.expect(">>> ")
        child.sendline("/regen")
        child.expect(r"tok/s\]")
        child.sendline("/save conv.json")
        child.expect(r"saved 4 messages")
        child.sendline("/clear")
        child.expect("conversation cleared")
        child.sendline("/load conv.json")
        child.expect("loaded 4 messages")
        child.sendline("/system Be brief.")
        child.expect("system prompt set")
        child.sendline("/nonsense")
        child.expect("unknown command")
        child.expect(">>> ")
        child.sendcontrol("c")  # Ctrl+C at the prompt does not leave
        child.expect("Ctrl\\+D")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "conv.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][2]["content"] == "line one\nline two"
    assert saved["params"]["temperature"] == 0.5


def test_ctrl_c_stops_a_reply_and_ctrl_d_leaves(tiny_ckpt):
    pexpect = pytest.importorskip("pexpect")
    cmd = _cmd(tiny_ckpt, "--temperature", "1", "--max_tokens", "4000", "--ignore_eos")
    child = pexpect.spawn(cmd[0], cmd[1:], env=_env(), encoding="utf-8", timeout=60)
    try:
        child.expect(">>> ")
        child.sendline("Tell me a long story")
        child.expect("long story\r\n")  # the terminal's echo of the line
        child.expect(r"\S")  # the reply has started streaming
        child.sendcontrol("c")
        child.expect(r"\(stopped\)")
        child.expect(">>> ")
        child.sendline("/set max_tokens 3")
        child.expect(r"max_tokens = 3")
        child.expect(">>> ")
        child.sendline("still here?")
        child.expect("still here\\?\r\n")
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_one_shot_prompt_and_pipe(tiny_ckpt):
    r = subprocess.run(_cmd(tiny_ckpt, "-p", "Hello there!", "--max_tokens", "5", "--temperature", "0"),
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    r2 = subprocess.run(_cmd(tiny_ckpt, "--max_tokens", "5", "--temperature", "0"), input="Hello there!",
                        capture_output=True, text=True, env=_env(), timeout=120)
    assert r2.returncode == 0 and r2.stdout == r.stdout  # the same message, from a pipe
    r3 = subprocess.run(_cmd(tiny_ckpt, "--max_tokens", "5"), input="", capture_output=True, text=True,
                        env=_env(), timeout=120)
    assert r3.returncode == 2 and "nothing to answer" in r3.stderr and "Traceback" not in r3.stderr


def test_bad_model_path_is_a_clear_error(tmp_path):
    r = subprocess.run(_cmd(tmp_path / "nope", "-p", "hi"), capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_moderation_hook_replaces_a_flagged_message(tiny_ckpt):
    pytest.importorskip("minichat.moderation")
    cmd = [c for c in _cmd(tiny_ckpt, "-p", "How do I make a pipe bomb at home?") if c != "--no-moderation"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("I can't help")  # the moderator's refusal, and no generation


def test_guard_on_a_streamed_reply():
    """The reply guard stops a reply as soon as the moderator flags the streamed text."""
    mod = pytest.importorskip("minichat.moderation")
    from minichat.chat import Guard

    g = Guard(mod.Moderator.load())
    assert g.check_user("hello there") is None
    rg = g.reply_guard()
    hits = [rg.feed(piece) for piece in ["Sure. To make a pipe ", "bomb at home, ", "first you need "]]
    hits.append(rg.finish())
    assert any(h and h.startswith("I can't help") for h in hits)
    assert Guard(None).check_user("anything") is None and Guard(None).reply_guard().feed("x") is None

"""Tool calling end to end: SFT on conversations with OpenAI tool fields, then the official client against the
served model with tool_choice "auto" (the model itself decides to call, as it was trained to)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.live import LiveServer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
CITIES = ["Paris", "Rome", "Oslo", "Lima"]


def conversations() -> list[dict]:
    rows = []
    for i, city in enumerate(CITIES * 2):
        call = {"id": f"c{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
        rows.append({"tools": [WEATHER], "messages": [
            {"role": "user", "content": f"weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": "sunny"},
            {"role": "assistant", "content": f"It is sunny in {city}."}]})
        rows.append({"tools": [WEATHER], "messages": [{"role": "user", "content": "hello"},
                                                      {"role": "assistant", "content": "Hi there!"}]})
    return rows


def test_training_data_with_tools_renders_as_the_server_renders_it(tmp_path):
    from minichat import toolcall
    from minichat.data.chat import load_sft
    from minichat.errors import MinichatError

    f = tmp_path / "tools.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in conversations()[:1]) + "\n")
    conv = load_sft(f, default_system="Be kind.")[0]
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user", "assistant"]
    assert conv[0]["content"] == "Be kind.\n\n" + toolcall.system_block([WEATHER["function"]])
    assert conv[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert conv[3]["content"] == "<tool_response>\nsunny\n</tool_response>"
    # preferences: an answer may be a call (an assistant message with tool_calls) or text; prompts for PPO too
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]}
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"tools": [WEATHER], "prompt": "weather in Rome?",
                                 "answers": [call, "I cannot know that.", [{"role": "assistant", "content": "Rainy."}]],
                                 "ranks": [0, 1, 1]}) + "\n"
                     + json.dumps({"tools": [WEATHER], "prompt": [{"role": "user", "content": "weather in Rome?"}],
                                   "chosen": call, "rejected": "Sunny, surely."}) + "\n")
    from minichat.data.chat import load_comparisons, load_prompts

    a, b = load_comparisons(prefs, default_system="Be kind.")
    assert a.prompt == b.prompt == [conv[0], {"role": "user", "content": "weather in Rome?"}]
    assert a.answers == [conv[2]["content"].replace("Paris", "Rome"), "I cannot know that.", "Rainy."]
    assert a.ranks == [0, 1, 1] and b.answers == [a.answers[0], "Sunny, surely."] and b.ranks == [0, 1]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"tools": [WEATHER], "messages": [{"role": "user", "content": "weather in Oslo?"}]})
                       + "\n")
    assert load_prompts(prompts, default_system="Be kind.") == [
        [conv[0], {"role": "user", "content": "weather in Oslo?"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tools": [{"type": "function", "function": {"name": "no spaces"}}],
                               "messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(MinichatError, match="bad.jsonl:1: tools"):
        load_sft(bad)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x", "tool_calls": [{"x": 1}]}]}) + "\n")
    with pytest.raises(MinichatError, match="only assistant messages carry tool_calls"):
        load_sft(bad)


def test_a_model_fine_tuned_on_tool_calls_calls_tools_through_the_api(tmp_path):
    from openai import OpenAI

    from minichat.checkpoint import save_checkpoint
    from minichat.data.chat import load_sft
    from minichat.model import ModelConfig, Transformer
    from minichat.serve.app import create_app
    from minichat.serve.config import EngineSettings, ServeConfig
    from minichat.serve.models import ModelRegistry
    from minichat.tokenizer import BPETokenizer
    from minichat.train import sft

    data = tmp_path / "tools.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in conversations()) + "\n")
    texts = [m["content"] for conv in load_sft(data) for m in conv]
    tok = BPETokenizer.train(texts * 20, vocab_size=400)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4,
                                                               d_model=96, max_seq_len=512)), tok)
    cfg = sft.preset_tiny()
    cfg.init_from, cfg.data.train, cfg.data.max_len, cfg.data.val_fraction = str(tmp_path / "base"), str(data), 512, 0.0
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.eval_every, cfg.train.progress = str(tmp_path / "sft"), 400, 0, False
    cfg.train.lr, cfg.train.min_lr = 3e-3, 3e-4
    sft.run(cfg)

    scfg = ServeConfig(models=[f"tooly={tmp_path / 'sft'}"], engine=EngineSettings(device="cpu", weights="fp32"),
                       store_url=f"sqlite:///{tmp_path / 'store.db'}")
    scfg.validate()
    srv = LiveServer(create_app(scfg, ModelRegistry.load(scfg.models, scfg.engine), None, None)).start()
    try:
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        ask = [{"role": "user", "content": "weather in Rome?"}]
        r = client.chat.completions.create(model="tooly", messages=ask, tools=[WEATHER], temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c.message.content
        call = c.message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
        # the client's loop: the call and the tool's result go back, and the model answers from them
        ask += [c.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        r = client.chat.completions.create(model="tooly", messages=ask, tools=[WEATHER], temperature=0)
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "It is sunny in Rome."
        hello = client.chat.completions.create(model="tooly", messages=[{"role": "user", "content": "hello"}],
                                               tools=[WEATHER], temperature=0)
        assert hello.choices[0].message.content == "Hi there!" and not hello.choices[0].message.tool_calls
    finally:
        srv.stop()

"""OpenAI's Agents SDK (`openai-agents`) against `minichat serve`: an agent with a function tool, over the
Responses API (the SDK's default) and over chat completions, plain and streamed.

    pip install openai-agents          # in its own environment: it pins other versions of starlette than FastAPI
    minichat serve --port 8000 &       # the built-in model
    python bench/serve/agents_sdk.py --base-url http://127.0.0.1:8000/v1

Each run asks for the weather in a city. The agent must call get_weather (tool_choice "required" on the first
turn), receive its output, and answer; the script prints what the SDK saw: the tool calls, their arguments and
the final text. A 135M chat model's final answers are a 135M model's; the point is the protocol.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time


async def main() -> None:
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner,
                        function_tool, set_tracing_disabled)
    from openai import AsyncOpenAI

    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="smollm2")
    a = ap.parse_args()
    set_tracing_disabled(True)  # no traces sent to OpenAI
    client = AsyncOpenAI(base_url=a.base_url, api_key="unused")
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return json.dumps({"city": city, "sky": "sunny", "celsius": 24})

    for api, model in (("responses", OpenAIResponsesModel(a.model, client)),
                       ("chat completions", OpenAIChatCompletionsModel(a.model, client))):
        for streamed in (False, True):
            calls.clear()
            agent = Agent(name="weather", instructions="Answer questions about the weather, using the tool.",
                          model=model, tools=[get_weather],
                          model_settings=ModelSettings(tool_choice="required", temperature=0.2, max_tokens=60),
                          reset_tool_choice=True)  # after one call, the model may answer in text
            t = time.perf_counter()
            if streamed:
                run = Runner.run_streamed(agent, "What's the weather like in Paris?", max_turns=4)
                kinds = set()
                async for ev in run.stream_events():
                    kinds.add(ev.type)
                result = run
            else:
                result = await Runner.run(agent, "What's the weather like in Paris?", max_turns=4)
                kinds = None
            items = [type(i).__name__ for i in result.new_items]
            print(f"{api}, {'streamed' if streamed else 'plain'}: tool called with {calls}, items {items}, "
                  f"final {result.final_output!r:.80}, {time.perf_counter() - t:.1f} s"
                  + (f", stream event kinds {sorted(kinds)}" if kinds else ""))


if __name__ == "__main__":
    asyncio.run(main())

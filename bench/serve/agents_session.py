"""OpenAI's Agents SDK keeping a conversation in `minichat serve` through the Conversations API
(`OpenAIConversationsSession`), over the Responses API.

    pip install openai-agents          # in its own environment (see agents_sdk.py)
    minichat serve --port 8000 &
    python bench/serve/agents_session.py --base-url http://127.0.0.1:8000/v1

Two turns with one session: the second must reach the model with the first turn as history. The script prints
the conversation's items as the server keeps them, and each turn's input tokens (the second's must include the
first turn's).
"""
from __future__ import annotations

import argparse
import asyncio


async def main() -> None:
    from agents import Agent, ModelSettings, OpenAIConversationsSession, OpenAIResponsesModel, Runner, set_tracing_disabled
    from openai import AsyncOpenAI

    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="smollm2")
    a = ap.parse_args()
    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=a.base_url, api_key="unused")
    agent = Agent(name="assistant", instructions="Answer in one short sentence.",
                  model=OpenAIResponsesModel(a.model, client), model_settings=ModelSettings(temperature=0))
    session = OpenAIConversationsSession(openai_client=client)
    for text in ("My name is Ada and I live in Paris.", "What is my name?"):
        r = await Runner.run(agent, text, session=session)
        usage = r.context_wrapper.usage
        print(f"user: {text}\n  agent: {r.final_output!r}  (input tokens {usage.input_tokens})")
    cid = await session._get_session_id()
    items = (await client.conversations.items.list(cid, order="asc")).data
    print(f"conversation {cid}: {len(items)} items")
    for it in items:
        print(f"  {it.type} {getattr(it, 'role', '')}: {getattr(it.content[0], 'text', '') if getattr(it, 'content', None) else ''!r}")


if __name__ == "__main__":
    asyncio.run(main())

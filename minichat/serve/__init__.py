"""Serving: the OpenAI-compatible API, the web chat and the conversation/feedback store (see docs/parts/serve.md)."""

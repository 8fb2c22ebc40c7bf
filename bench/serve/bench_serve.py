"""N concurrent streaming clients against `minichat serve` on loopback.

Starts `minichat serve` in its own process (so the clients' CPU time is not the server's), then for each N in
--clients runs N clients at once, each sending --requests streaming chat completions one after another, and
reports requests/s, aggregate completion tokens/s, time to first token p50/p99 and failed requests.

    python bench/serve/bench_serve.py                          # SmolLM2-135M, N = 1, 8, 32, moderation on
    python bench/serve/bench_serve.py --no-moderation --out bench/results/serve.md
    python bench/serve/bench_serve.py --client httpx           # the clients of sessions 1-9 (more client CPU)
Targets (issue 6): tokens/s at 32 clients >= 10x the 1-client rate; p99 TTFT < 2 s at 8 clients; 0 failures.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in two sentences.",
    "Give me three tips for learning Python.", "What is 17 times 23?", "Name a famous painting and its painter.",
    "Why do cats purr?", "Describe a sunset without using the word 'red'.", "What does a compiler do?",
    "Suggest a name for a bakery.", "How far is the Moon from the Earth?", "Summarize the plot of Hamlet.",
]


def default_weights() -> str:
    from minichat.serve.config import EngineSettings

    return EngineSettings().weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Stream:
    """What a client reads off one streamed reply: time to the first content chunk and the usage's completion
    tokens. The clients share the server's 2 cores, so they parse as little as they can: JSON only until the
    first content chunk, then only the usage chunk and errors (every chunk is still read off the socket)."""

    def __init__(self, t0: float):
        self.t0, self.ttft, self.tokens, self.buf = t0, None, 0, b""

    def feed(self, data: bytes) -> None:
        self.buf += data
        *events, self.buf = self.buf.split(b"\n\n")
        for ev in events:
            if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                continue
            if self.ttft is None or b'"usage":{' in ev or b'"error"' in ev:
                obj = json.loads(ev[6:])
                if "error" in obj:
                    raise RuntimeError(obj["error"]["message"])
                if self.ttft is None and obj["choices"] and obj["choices"][0]["delta"].get("content"):
                    self.ttft = time.perf_counter() - self.t0
                if obj.get("usage"):
                    self.tokens = obj["usage"]["completion_tokens"]

    def result(self) -> tuple[float, int]:
        return (self.ttft if self.ttft is not None else time.perf_counter() - self.t0), self.tokens


def _body(model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": seed, "stream": True, "stream_options": {"include_usage": True},
            "min_tokens": max_tokens}  # every request generates exactly max_tokens, so runs compare


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int, seed: int):
    """One streamed chat completion with httpx (client: httpx.AsyncClient) or aiohttp (an aiohttp.ClientSession)."""
    body = _body(model, prompt, max_tokens, seed)
    st = _Stream(time.perf_counter())
    if isinstance(client, httpx.AsyncClient):
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            async for data in r.aiter_raw():
                st.feed(data)
    else:
        async with client.post(url + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
            async for data in r.content.iter_any():
                st.feed(data)
    return st.result()


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int | None, children: bool = False) -> float:
    """User + system CPU seconds of a process (this one when pid is None); with children, of its running
    child processes instead (the server's moderation process)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        if not children:
            fields = _stat(pid)
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        total = 0.0
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    fields = _stat(int(d))
                except OSError:
                    continue
                if int(fields[1]) == pid:
                    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total
    except (OSError, IndexError, ValueError):
        return float("nan")


async def run_level(url: str, model: str, n_clients: int, n_requests: int, max_tokens: int,
                    server_pid: int | None = None, client_kind: str = "httpx") -> dict:
    limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=n_clients + 4)
    ttfts, tokens, errors = [], 0, []
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=600, limits=limits))
        streams = client
        if client_kind == "aiohttp":  # a lighter client: less of the 2 cores goes to the load generator
            import aiohttp

            streams = await stack.enter_async_context(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=n_clients + 4), timeout=aiohttp.ClientTimeout(total=600)))

        async def worker(ci: int):
            nonlocal tokens
            for k in range(n_requests):
                try:
                    # every request's text is its own (a tag first): only the chat template's shared start, not
                    # the question, can come from the server's prefix cache, as with real users
                    prompt = f"[{n_clients}.{ci}.{k}] {PROMPTS[(ci + k) % len(PROMPTS)]}"
                    t, n = await one_request(streams, url, model, prompt, max_tokens,
                                             seed=ci * 1000 + k)
                    ttfts.append(t)
                    tokens += n
                except Exception as e:  # counted and reported, never hidden
                    errors.append(str(e))

        h0 = await engine_stats(client, url, model)
        c0, s0, k0 = cpu_seconds(None), cpu_seconds(server_pid), cpu_seconds(server_pid, children=True)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(n_clients)))
        wall = time.perf_counter() - t0
        c1, s1, k1 = cpu_seconds(None), cpu_seconds(server_pid), cpu_seconds(server_pid, children=True)
        h1 = await engine_stats(client, url, model)
    steps = h1.get("steps", 0) - h0.get("steps", 0)
    step_s = h1.get("step_seconds", 0.0) - h0.get("step_seconds", 0.0)
    step_cpu = h1.get("step_cpu_seconds", 0.0) - h0.get("step_cpu_seconds", 0.0)
    gen = h1.get("tokens_generated", 0) - h0.get("tokens_generated", 0)
    prefilled = h1.get("prefill_tokens", 0) - h0.get("prefill_tokens", 0)
    reused = h1.get("prefix_cache_tokens", 0) - h0.get("prefix_cache_tokens", 0)
    prefill_s = h1.get("prefill_seconds", 0.0) - h0.get("prefill_seconds", 0.0)
    q = statistics.quantiles(ttfts, n=100, method="inclusive") if len(ttfts) >= 2 else ttfts * 99
    return {"clients": n_clients, "requests": len(ttfts) + len(errors), "errors": len(errors),
            "wall_s": wall, "req_per_s": len(ttfts) / wall, "tok_per_s": tokens / wall, "tokens": tokens,
            "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"), "ttft_p99": q[98] if ttfts else float("nan"),
            "client_cpu": (c1 - c0) / wall,
            # the worker thread's view: sequences per engine step, and the share of wall time spent stepping
            "mean_batch": gen / steps if steps else float("nan"), "step_busy": step_s / wall, "prefill_busy": prefill_s / wall,
            "step_ms": 1000 * step_s / steps if steps else float("nan"),
            "step_cpu_ms": 1000 * step_cpu / steps if steps else float("nan"),
            "prompt_tokens": prefilled + reused, "reused_share": reused / (prefilled + reused) if prefilled + reused else 0.0, "server_cpu": (s1 - s0) / wall if server_pid else float("nan"),
            "child_cpu": (k1 - k0) / wall if server_pid else float("nan"),
            "threads": h1.get("threads"), "thread_switches": h1.get("thread_switches", 0) - h0.get("thread_switches", 0),
            "first_error": errors[0] if errors else ""}


async def engine_stats(client: httpx.AsyncClient, url: str, model: str) -> dict:
    try:
        return (await client.get(url + "/health")).json()["models"][model]
    except (httpx.HTTPError, KeyError, ValueError):
        return {}


def run_levels(a, url: str, server_pid: int | None) -> list[dict]:
    name = a.model.split("=")[0] if "=" in a.model else os.path.basename(a.model.rstrip("/")) or a.model
    asyncio.run(run_level(url, name, 1, 1, 8, client_kind=a.client))  # warm-up
    rows = []
    for n in [int(x) for x in a.clients.split(",")]:
        r = asyncio.run(run_level(url, name, n, a.requests, a.max_tokens, server_pid, a.client))
        rows.append(r)
        print(f"N={n:>3}  {r['requests']} requests  {r['req_per_s']:.2f} req/s  {r['tok_per_s']:.1f} tok/s  "
              f"TTFT p50 {r['ttft_p50']:.3f}s p99 {r['ttft_p99']:.3f}s  errors {r['errors']}  "
              f"CPU: server {r['server_cpu']:.2f} cores (+ its moderation process {r['child_cpu']:.2f}), clients "
              f"{r['client_cpu']:.2f}  engine: batch "
              f"{r['mean_batch']:.1f}, step {r['step_ms']:.1f} ms (CPU {r['step_cpu_ms']:.1f}), busy {r['step_busy']:.0%} (prefill {r['prefill_busy']:.0%}), prompt tokens {r['prompt_tokens']} ({r['reused_share']:.0%} from the prefix cache), threads {r['threads']} ({r['thread_switches']} switches) {r['first_error']}",
              flush=True)
    return rows


def wait_ready(url: str, server: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.time() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="model to serve ([NAME=]PATH or smollm2)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=4,
                    help="requests per client, one after another (4: a 1-client level of 2 moved by ±10%%)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="server torch threads (0 = default)")
    ap.add_argument("--weights", default="", help="the engine's weight mode (default: the server's)")
    ap.add_argument("--no-moderation", action="store_true")
    ap.add_argument("--server-args", default="", help="more `minichat serve` options, e.g. '--engine.prefix_cache 0'")
    ap.add_argument("--out", help="write a Markdown table here (appends a section)")
    ap.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp",
                    help="the clients' HTTP library: aiohttp (pip install -e '.[bench]') takes ~0.04 cores at 32 "
                         "clients where httpx took ~0.11, and the clients share the server's 2 cores")
    ap.add_argument("--url", help="use this running server instead of starting one (e.g. under py-spy)")
    a = ap.parse_args()
    if a.client == "aiohttp":
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            raise SystemExit("the aiohttp clients need aiohttp: pip install -e '.[bench]' (or pass --client httpx)")

    if a.url:
        rows = run_levels(a, a.url.rstrip("/"), None)
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "minichat.cli", "serve", "--model", a.model, "--port", str(port), "--store",
               "none", "--engine.max_batch", str(a.max_batch), "--max_queue", "256", "--log_level", "warning"]
        if a.threads:
            cmd += ["--engine.threads", str(a.threads)]
        if a.weights:
            cmd += ["--engine.weights", a.weights]
        if a.no_moderation:
            cmd.append("--no-moderation")
        if a.server_args:
            import shlex

            cmd += shlex.split(a.server_args)
        server = subprocess.Popen(cmd)
        try:
            wait_ready(url, server)
            rows = run_levels(a, url, server.pid)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    base = rows[0]["tok_per_s"] if rows else float("nan")
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M')} — model {a.model}, moderation "
             f"{'off' if a.no_moderation else 'on'}, {a.client} clients, {a.requests} requests/client, {a.max_tokens} tokens each, "
             f"max_batch {a.max_batch}, weights {a.weights or default_weights()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})", "",
             "| clients | requests | req/s | tokens/s | × 1 client | TTFT p50 (s) | TTFT p99 (s) | failed "
             "| server CPU (cores) | its moderation process | client CPU (cores) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
                     f"{r['tok_per_s'] / base:.1f} | {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {r['errors']} | "
                     f"{r['server_cpu']:.2f} | {r['child_cpu']:.2f} | {r['client_cpu']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

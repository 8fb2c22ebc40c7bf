"""The Batch API's throughput: N chat requests as one batch, against the same requests sent one at a time.

Starts `minichat serve` (SmolLM2, store in memory), uploads N requests of exactly --max-tokens tokens each,
times the batch from create to completed, then times --sequential of the same requests sent one after another
by one client, and reports tokens/s of both and their ratio. Every reply is checked to have the requested length.

    python bench/serve/bench_batch.py                     # 128 requests, 64 tokens each
    python bench/serve/bench_batch.py --requests 256 --out bench/results/serve.md
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import PROMPTS, free_port, wait_ready  # noqa: E402


def body(i: int, max_tokens: int) -> dict:
    return {"model": "smollm2", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0.7, "seed": i}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sequential", type=int, default=8, help="requests timed one at a time (default 8)")
    ap.add_argument("--server-args", default="", help="more `minichat serve` options")
    ap.add_argument("--out", help="append a Markdown table here")
    a = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "minichat.cli", "serve", "--port", str(port), "--store", "none",
           "--log_level", "warning"]
    if a.server_args:
        import shlex

        cmd += shlex.split(a.server_args)
    server = subprocess.Popen(cmd)
    try:
        wait_ready(url, server)
        c = httpx.Client(base_url=url, timeout=600)
        lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                    "body": body(i, a.max_tokens)}) + "\n" for i in range(a.requests))
        f = c.post("/v1/files", files={"file": ("req.jsonl", lines.encode())}, data={"purpose": "batch"}).json()
        t0 = time.perf_counter()
        b = c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h"}).json()
        while b["status"] not in ("completed", "failed", "cancelled"):
            time.sleep(0.05)
            b = c.get(f"/v1/batches/{b['id']}").json()
        batch_s = time.perf_counter() - t0
        assert b["status"] == "completed" and b["request_counts"]["completed"] == a.requests, b
        out = [json.loads(x) for x in c.get(f"/v1/files/{b['output_file_id']}/content").text.splitlines()]
        tokens = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)
        assert tokens == a.requests * a.max_tokens, tokens
        t1 = time.perf_counter()
        seq_tokens = 0
        for i in range(a.sequential):
            r = c.post("/v1/chat/completions", json=body(i, a.max_tokens)).json()
            seq_tokens += r["usage"]["completion_tokens"]
        seq_s = time.perf_counter() - t1
        c.close()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    batch_rate, seq_rate = tokens / batch_s, seq_tokens / seq_s
    text = (f"| {a.requests} × {a.max_tokens} tokens | {batch_s:.1f} s | {batch_rate:.1f} | {seq_rate:.1f} "
            f"({a.sequential} requests) | {batch_rate / seq_rate:.1f}× |")
    print("| batch | batch wall | batch tokens/s | one at a time, tokens/s | ratio |\n|---|---|---|---|---|\n" + text)
    if a.out:
        with open(a.out, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

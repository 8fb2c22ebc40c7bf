"""The worker's hand-off to the event loop and the output guard's thread use, on a real tiny engine (no HTTP)."""
from __future__ import annotations

import asyncio

import pytest

from minichat.serve.protocol import GenOptions
from minichat.serve.worker import Delta, Finish, ModelWorker


@pytest.fixture(scope="module")
def worker(model_files):
    from minichat.engine import Engine
    from minichat.gguf_import import load

    model, tok, _ = load(str(model_files.tiny), device="cpu", verbose=False)
    w = ModelWorker("tiny", Engine(model, tok, weights="fp32", max_batch=8), tok)
    w.start()
    yield w
    w.stop()


async def _collect(job) -> tuple[str, list[dict], list[Finish]]:
    text, lps, finishes = "", [], []
    async for ev in job.events():
        if isinstance(ev, Delta):
            text += ev.text
            lps += ev.logprobs
        else:
            finishes.append(ev)
    return text, lps, finishes


def test_one_loop_wakeup_per_step_not_per_token(worker):
    """All the events of one engine step reach the event loop in one call_soon_threadsafe."""

    async def main():
        loop = asyncio.get_running_loop()
        calls = 0
        real = loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            nonlocal calls
            calls += 1
            return real(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # only this test's loop is affected
        steps0, tokens0 = worker.steps, worker.tokens_out
        jobs = [worker.submit([5, 6, 7 + i], GenOptions(max_tokens=12, min_tokens=12, seed=i)) for i in range(4)]
        outs = await asyncio.gather(*(_collect(j) for j in jobs))
        return outs, calls, worker.steps - steps0, worker.tokens_out - tokens0

    outs, calls, steps, tokens = asyncio.run(main())
    assert tokens == 48 and all(f[0].reason == "length" and f[0].completion_tokens == 12 for _, _, f in outs)
    assert all(text for text, _, _ in outs)
    # 48 tokens and 4 finishes, but one hand-off per step (plus at most one when the thread goes idle)
    assert calls <= steps + 1, (calls, steps)
    assert steps < tokens


def test_logprobs_ride_with_their_text(worker):
    async def main():
        job = worker.submit([5, 6, 7], GenOptions(max_tokens=6, min_tokens=6, temperature=0, logprobs=True,
                                                  top_logprobs=2))
        return await _collect(job)

    text, lps, finishes = asyncio.run(main())
    assert len(lps) == 6 and all(len(e["top_logprobs"]) == 2 for e in lps)
    assert "".join(e["token"] for e in lps) == text  # byte-level tokens of a tiny ASCII corpus decode alone
    assert [f.reason for f in finishes] == ["length"]


def test_guard_due_predicts_which_feeds_check():
    """The server feeds a delta inline unless StreamGuard.due() says feed() will run a check (awaited)."""
    from minichat.moderation import Moderator

    m = Moderator.load(learned=False)
    checks = []
    real = m.screen_many
    m.screen_many = lambda *a, **k: checks.append(1) or real(*a, **k)  # count the guard's checks on a real moderator
    guard = m.stream_guard()
    answer = "Sure, here is a plan for the day. First we walk to the park and look at the ducks. " * 3
    pieces = [answer[i:i + 5] for i in range(0, len(answer), 5)]
    predicted = 0
    for p in pieces:
        due, before = guard.due(p), len(checks)
        assert guard.feed(p) is None
        assert (len(checks) > before) == due, p
        predicted += due
    assert 0 < predicted < len(pieces) / 2  # most deltas need no check, so they are not sent to a thread


def test_registry_loads_on_one_thread_and_steps_on_the_configured_count(model_files):
    """ModelRegistry.load builds engines with 1 torch thread (so the loading thread never starts an OpenMP team
    that would compete with the stepping thread's) and the worker thread steps with engine.threads."""
    import threading

    import torch

    from minichat.serve.config import EngineSettings
    from minichat.serve.models import ModelRegistry

    before = torch.get_num_threads()
    reg = ModelRegistry.load([f"tiny={model_files.tiny}"], EngineSettings(weights="fp32", threads=2))
    assert torch.get_num_threads() == before  # the caller's setting is restored
    w = reg.get("tiny").worker
    seen = []
    real_step = w.engine.step

    def step():
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real_step()

    w.engine.step = step
    reg.start()
    try:
        async def main():
            return await _collect(w.submit([5, 6, 7], GenOptions(max_tokens=4, min_tokens=4, seed=0)))

        _, _, finishes = asyncio.run(main())
    finally:
        reg.stop()
    assert finishes[0].completion_tokens == 4
    assert seen and all(name.startswith("minichat-worker-") and n == 2 for name, n in seen), seen


def _run_tuner(tuner, step_seconds, steps, rows=8, t0=0.0):
    """Feed `steps` steps to the tuner, each taking step_seconds[threads] (a dict), one every 10 ms."""
    t = t0
    for _ in range(steps):
        k = tuner.threads()
        tuner.record(step_seconds[k], rows, t)
        t += 0.01
    return t


def test_thread_tuner_drops_to_one_thread_when_that_is_faster_and_comes_back():
    from minichat.serve.worker import ThreadTuner

    tuner = ThreadTuner(2, probe=4, interval=1.0, max_interval=8.0)
    assert tuner.threads() == 2
    busy = {2: 0.040, 1: 0.015}  # another process on a core: 2 threads wait at barriers
    t = _run_tuner(tuner, busy, 99)  # not yet time to probe
    assert tuner.current == 2 and tuner.trying is None
    t = _run_tuner(tuner, busy, 10, t0=t)  # the probe runs 4 steps at 1 thread, which wins
    assert tuner.current == 1 and tuner.switches == 1
    idle = {2: 0.010, 1: 0.015}  # the other process ended
    t = _run_tuner(tuner, idle, 120, t0=t)
    assert tuner.current == 2 and tuner.switches == 2


def test_thread_tuner_keeps_all_threads_when_they_win_and_probes_less_often():
    from minichat.serve.worker import ThreadTuner

    tuner = ThreadTuner(2, probe=4, interval=1.0, max_interval=4.0)
    idle = {2: 0.010, 1: 0.015}
    _run_tuner(tuner, idle, 1000)  # 10 s
    assert tuner.current == 2 and tuner.switches == 0
    assert tuner.interval == 4.0  # doubled after each probe the current setting won, up to max_interval
    # a margin: 1 thread a little faster (noise) is not enough to switch
    close = {2: 0.010, 1: 0.0095}
    tuner2 = ThreadTuner(2, probe=4, interval=1.0)
    _run_tuner(tuner2, close, 300)
    assert tuner2.current == 2


def test_thread_tuner_ignores_probes_over_batches_of_another_size():
    from minichat.serve.worker import ThreadTuner

    tuner = ThreadTuner(2, probe=4, interval=1.0)
    t = 0.0
    for i in range(300):  # 1 thread looks faster, but only because its probe steps ran 2 rows instead of 32
        k = tuner.threads()
        tuner.record(0.005 if k == 1 else 0.030, 2 if k == 1 else 32, t)
        t += 0.01
    assert tuner.current == 2 and tuner.switches == 0
    with pytest.raises(ValueError):
        ThreadTuner(1)


def test_worker_reports_its_threads(model_files):
    """The worker builds a tuner when it steps with more than one thread, and its stats show the threads."""
    import time

    import torch

    from minichat.engine import Engine
    from minichat.gguf_import import load

    model, tok, _ = load(str(model_files.tiny), device="cpu", verbose=False)
    for adaptive in (True, False):
        w = ModelWorker("t", Engine(model, tok, weights="fp32"), tok, threads=2, adaptive_threads=adaptive)
        w.start()
        try:
            deadline = time.time() + 10
            while adaptive and w.tuner is None and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)
            assert (w.tuner is not None) == adaptive and w.stats()["threads"] == 2
            assert w.stats()["thread_switches"] == 0
        finally:
            w.stop()
    assert torch.get_num_threads() >= 1


def test_fast_engine_hands_tokens_on_from_the_next_steps_compute_hook(model_files):
    """With fast mode's one-call pass the worker hands a step's events on at the next step's compute hook
    (Engine.before_compute), through its courier thread: every job still gets all its tokens, in order, the
    same as the engine generates them alone, and each finish arrives."""
    from minichat.engine import Engine, SamplingParams
    from minichat.gguf_import import load

    model, tok, _ = load(str(model_files.tiny), device="cpu", verbose=False)
    eng = Engine(model, tok, weights="fast", max_batch=8)
    if eng._layers_c is None:
        pytest.skip("no one-call fused pass here (no compiled VNNI kernels, or the tiny model's shapes)")
    prompts = [[5, 6, 7 + i] for i in range(6)]  # more than small_rows: the one-call pass runs
    want = Engine(model, tok, weights="fast", max_batch=8).generate(
        prompts, SamplingParams(temperature=0, max_tokens=10, min_tokens=10))
    w = ModelWorker("fast", eng, tok)
    hooks = []
    w.start()
    try:
        async def main():
            deadline = asyncio.get_running_loop().time() + 10
            while eng.before_compute is None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            hook = eng.before_compute
            eng.before_compute = lambda: hooks.append(1) or hook()
            jobs = [w.submit(p, GenOptions(max_tokens=10, min_tokens=10, temperature=0)) for p in prompts]
            return await asyncio.gather(*(_collect(j) for j in jobs))

        outs = asyncio.run(main())
    finally:
        w.stop()
    assert hooks  # the hook path ran
    for (text, _, finishes), o in zip(outs, want):
        assert text == tok.decode(o.token_ids) and [f.completion_tokens for f in finishes] == [10]

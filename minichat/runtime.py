"""Where and how code runs: device, precision, threads, torchrun/DDP, seeding, rank-0 printing."""
from __future__ import annotations

import contextlib
import functools
import os
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from minichat.errors import ConfigError


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast precision for matmuls; weights stay fp32 when training)
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    seed: int = 1337
    compile: bool = False  # torch.compile the model (worth it for long runs on GPU)

    def validate(self) -> None:
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"runtime.dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.threads < 0:
            raise ConfigError("runtime.threads must be >= 0")


def cpu_has_amx() -> bool:
    """AMX tiles make bf16 matmuls ~6x faster than fp32 on this class of CPU."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:
        cap = ""
    if "AMX" in cap.upper():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """How many times faster a bf16 matmul runs than an fp32 one on this CPU, timed once per process (~0.1 s).

    CPU flags do not tell: an AMD EPYC with avx512_bf16 multiplied bf16 3.8x faster than fp32 (2 threads,
    2048^3), while a Xeon whose AMX the VM hid ran bf16 at half the fp32 rate (bench/results/pretrain.md)."""
    a, b = torch.randn(1024, 512), torch.randn(512, 512)

    def best(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up: oneDNN picks and caches its kernel
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(4):
                x @ y
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def cpu_prefers_bf16() -> bool:
    """bf16 matmuls on this CPU: with AMX, or where they measured at least 1.5x the fp32 rate (the margin keeps a
    noisy probe from flipping between runs; measured ratios were 0.5 and 3.8-4.7)."""
    return cpu_has_amx() or cpu_bf16_speedup() >= 1.5


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device is cuda but no CUDA device is available")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 autocast where this CPU multiplies bf16 clearly faster: the pipeline's pretraining step took 102 ms
    # instead of 169 on the EPYC (2 threads)
    if device.type == "cpu" and cpu_prefers_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Dist:
    """This process's place in a (possibly one-process) DistributedDataParallel job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA); else a one-process Dist."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def shutdown_distributed() -> None:
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # DDP wrappers sit in reference cycles and hold the process group: freed only at interpreter exit,
        # after the group, they left gloo's threads running and a process aborted on exit now and then
        # ("terminate called without an active exception"). Collect them while the group still exists.
        gc.collect()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(cfg: RuntimeConfig) -> tuple[torch.device, torch.dtype, Dist]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    seed_everything(cfg.seed)
    return device, resolve_dtype(cfg.dtype, device), dist


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ThreadTuner:
    """Picks the stepping thread's torch threads, all `n` or one, by timing steps at each.

    Where another process keeps a core busy, OpenMP's barriers (hundreds per decode step) wait for the thread
    that shares its core with it, and n threads run slower than one: with one CPU-bound process beside
    `minichat serve` on 2 cores, 1 client got 22.8 tok/s at 2 threads against 61.5 at 1, and 8 clients 133
    against 306; on an otherwise idle machine 2 threads are ~1.4x faster. So after `interval` seconds at the
    current setting the other one runs `probe` steps, and replaces it when the median step is below `margin`
    of the current setting's median over its last `probe` steps, with batches of comparable size (medians: a
    step that prefills a wave of prompts is an outlier). Each probe the current setting wins doubles the
    interval, up to `max_interval`, so an idle machine pays for a probe rarely. Engine.step applies it when set
    (`engine.thread_tuner`): the server's stepping thread and `minichat chat` do."""

    def __init__(self, n: int, probe: int = 8, interval: float = 5.0, max_interval: float = 60.0,
                 margin: float = 0.8):
        if n < 2 or probe < 1 or not 0 < margin <= 1 or interval <= 0:
            raise ValueError("ThreadTuner: n >= 2, probe >= 1, 0 < margin <= 1, interval > 0")
        self.n, self.current, self.probe, self.margin = n, n, probe, margin
        self.min_interval, self.interval, self.max_interval = interval, interval, max(interval, max_interval)
        self._recent: deque[tuple[float, int]] = deque(maxlen=probe)  # (seconds, rows) at the current setting
        self._trial: list[tuple[float, int]] = []
        self.trying: int | None = None
        self._next: float | None = None
        self.switches = 0

    def threads(self) -> int:
        """Threads for the next step."""
        return self.current if self.trying is None else self.trying

    def record(self, seconds: float, rows: int, now: float) -> None:
        """One step that ran at threads() threads with `rows` sequences took `seconds`; `now`: a monotonic clock."""
        if self._next is None:
            self._next = now + self.interval
        if self.trying is None:
            self._recent.append((seconds, rows))
            if now >= self._next and len(self._recent) == self.probe:
                self.trying, self._trial = (1 if self.current != 1 else self.n), []
            return
        self._trial.append((seconds, rows))
        if len(self._trial) < self.probe:
            return
        cur_s, cur_r = (statistics.median([x[i] for x in self._recent]) for i in (0, 1))
        try_s, try_r = (statistics.median([x[i] for x in self._trial]) for i in (0, 1))
        if cur_r > 0 and 0.8 <= try_r / cur_r <= 1.25:  # else not comparable: probe again after the same wait
            if try_s < self.margin * cur_s:
                self.current, self.interval = self.trying, self.min_interval
                self._recent = deque(self._trial, maxlen=self.probe)
                self.switches += 1
            else:
                self.interval = min(2 * self.interval, self.max_interval)
        self.trying, self._trial = None, []
        self._next = now + self.interval

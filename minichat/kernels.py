"""Fused kernels for the engine's decode step (kernels.c), compiled on first use.

The C file is compiled once per machine with the system C compiler (`cc -O3 -march=native`, with `-fopenmp`
when it can) into the user cache directory, named by a hash of the source and flags, and loaded with ctypes.
Where no compiler is found, or MINICHAT_KERNELS=0, `load()` returns None and the engine runs the same math as
torch ops.

Each wrapper takes torch tensors, checks what the C side assumes (CPU, contiguous, dtype) and allocates
its outputs. Big loops split over the calling thread's torch threads, but only when the library shares torch's
OpenMP runtime (checked at load); otherwise everything runs on the calling thread.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from minichat.errors import MinichatError

_SRC = Path(__file__).with_name("kernels.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11"]
_YTYPE = {torch.float32: 0, torch.int32: 1, torch.bfloat16: 2}
# a KV cache's element types; int8 rows hold head_dim values and then their float32 scale (kernels.c kv_store_s8)
_CTYPE = {torch.float32: 0, torch.bfloat16: 2, torch.int8: 3}
KV_SCALE_BYTES = 4


def kv_head_dim(cache: torch.Tensor) -> int:
    """The head dimension of a KV cache (..., capacity, D), or (..., capacity, D + 4) int8 with its scales."""
    return cache.shape[-1] - (KV_SCALE_BYTES if cache.dtype == torch.int8 else 0)
_lock = threading.Lock()
_loaded: dict[str, object] = {}

_p, _i64, _f32, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "mc_norm_quant": [_p, _p, _f32, _i32, _i64, _i64, _p, _p],
    "mc_norm_bf16": [_p, _p, _f32, _i64, _i64, _p],
    "mc_dequant": [_p, _i32, _p, _p, _i64, _i64, _p, _i32],
    "mc_swiglu": [_p, _i32, _p, _p, _i64, _i64, _p, _p, _p, _p, _i32],
    "mc_argmax_rows": [_p, _i64, _i64, _p],
    "mc_sample_rows": [_p, _i64, _i64, _p, _p, _p],
    "mc_int4_groups": [_p, _i64, _i64, _p, _p],
    "mc_int8_rows": [_p, _i64, _i64, _p, _p],
    "mc_qkv_rope_cache": [_p, _i32, _p, _p, _i64, _i64, _i64, _i64, _p, _p, _p, _f32, _p, _i32, _p, _p, _i32,
                          _i64, _i64, _p],
    "mc_allow_threads": [_i32],
    "mc_attend_decode": [_p, _i64, _i64, _i64, _i64, _p, _p, _i32, _i64, _i64, _p, _p, _p, _i64, _i32, _p],
    "mc_gemm_s8": [_p, _i64, _i64, _p, _i64, _p, _p, _p, _i32, _p, _p],
    "mc_has_vnni": [],
    "mc_decode_w8a8_work": [_i64, _i64, _i64, _i64, _i64, _i64, _i64, _i32],
}
# called through ctypes.CDLL, which releases the GIL: a whole decode pass takes milliseconds
_NOGIL = {"mc_decode_w8a8": [_p, _i64, _p, _i64, _i64, _i64, _i64, _i64, _i64, _p, _p, _i64, _p, _p, _i32, _i64,
                             _i64, _i64, _p, _p, _f32, _f32, _i32, _p]}
_RESTYPES = {"mc_int4_groups": ctypes.c_double, "mc_gemm_s8": ctypes.c_int, "mc_has_vnni": ctypes.c_int,
             "mc_decode_w8a8_work": ctypes.c_int64, "mc_decode_w8a8": ctypes.c_int}


class LayerW8A8(ctypes.Structure):
    """One layer's weights for mc_decode_w8a8 (pointers into tensors the engine keeps alive)."""
    _fields_ = [(n, ctypes.c_void_p) for n in (
        "attn_norm", "wo_inv", "mlp_norm", "down_inv", "qkv_p", "wo_p", "gu_p", "down_p",
        "qkv_comp", "wo_comp", "gu_comp", "down_comp", "qkv_cs", "wo_cs", "gu_cs", "down_cs")]


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_id() -> str:
    """What -march=native compiles for: a library built on one CPU may crash on another that shares the cache
    directory (a network home), so the CPU's feature flags are part of the library's name."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        import platform

        return platform.machine() + platform.processor()


def _build(cc: str, cache: Path, flags: list[str], keep: tuple[str, ...] = ()) -> Path:
    src = _SRC.read_bytes()
    tag = hashlib.sha256(src + " ".join([cc, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    so = cache / f"kernels-{tag}.so"
    failed = so.with_suffix(".failed")  # this compiler cannot build with these flags: do not retry every start
    if so.exists():
        return so
    if failed.exists():
        raise MinichatError(f"compiling {_SRC.name} failed before:\n{failed.read_text(errors='replace')}")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:  # compile to a temporary name, then rename: a half-written library is never loaded
        r = subprocess.run([cc, *flags, str(_SRC), "-o", tmp, "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            failed.write_text(r.stderr[-2000:])
            raise MinichatError(f"compiling {_SRC.name} failed:\n{r.stderr[-2000:]}")
        os.replace(tmp, so)
        for old in cache.glob("kernels-*"):  # builds of earlier sources (or other CPUs: they rebuild)
            if old != so and old.name not in keep:
                old.unlink(missing_ok=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime libraries mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if "libgomp" in line or "libomp" in line or "libiomp" in line}
    except OSError:
        return set()


def load() -> "Kernels | None":
    """The compiled kernels, or None where they cannot be built (no C compiler) or are turned off."""
    if os.environ.get("MINICHAT_KERNELS", "1") == "0":
        return None
    with _lock:
        if "k" not in _loaded:
            cc = _compiler()
            _loaded["k"] = None
            if cc is not None:
                from minichat.gguf_import import cache_root

                cache = cache_root() / "kernels"
                lib = err = None
                # with OpenMP first (the attention kernel splits its work over torch's threads), else without
                for flags in (_FLAGS + ["-fopenmp"], _FLAGS):
                    try:
                        before = _openmp_runtimes()
                        # PyDLL: calls keep the GIL. These kernels take microseconds; releasing and re-taking the
                        # GIL around each (CDLL's way) would let any other busy Python thread (the server's
                        # moderation checks) cut in hundreds of times per decode step
                        so = _build(cc, cache, flags, keep=tuple(p.name for p in cache.glob("kernels-*.failed")))
                        lib = ctypes.PyDLL(str(so))
                        break
                    except (MinichatError, OSError) as e:  # a broken compiler must not stop generation
                        err = e
                if lib is None:
                    warnings.warn(f"minichat's compiled kernels are unavailable, decoding is slower: {err}")
                else:
                    for name, args in _SIGNATURES.items():
                        getattr(lib, name).argtypes = args
                        getattr(lib, name).restype = _RESTYPES.get(name)
                    lib.mc_openmp.restype = ctypes.c_int
                    nogil = ctypes.CDLL(str(so))  # the same library; its calls release the GIL
                    for name, args in _NOGIL.items():
                        getattr(nogil, name).argtypes = args
                        getattr(nogil, name).restype = _RESTYPES.get(name)
                    # threads only when the library shares torch's OpenMP runtime: a second runtime would bring
                    # a second thread team to the same cores, and each would wait for the other at barriers
                    openmp = bool(lib.mc_openmp()) and _openmp_runtimes() == before and bool(before)
                    lib.mc_allow_threads(int(openmp))
                    _loaded["k"] = Kernels(lib, openmp=openmp, nogil=nogil)
        return _loaded["k"]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(t: torch.Tensor, *dtypes: torch.dtype) -> None:
    if not (t.is_cpu and t.dtype in dtypes and t.is_contiguous()):  # ~600 calls a decode step: the cheap form
        raise ValueError(f"kernel input must be a contiguous CPU tensor of {dtypes}, got {t.dtype} "
                         f"{t.device} contiguous={t.is_contiguous()}")


class Kernels:
    """Typed wrappers over the C functions. Shapes: M rows; 'y' is a matmul output: float32, bfloat16, or
    int32 from int8 activations quantized per row as x ≈ s·q + z (`rs` (M, 2): s, z, as norm_quant returns)
    times int8 weights w ≈ t·p (`cs` (2, N): t and Σ_k w[n, k])."""

    def __init__(self, lib, openmp: bool = False, nogil=None):
        self.lib = lib
        self.nogil = nogil  # the same library through ctypes.CDLL (None: not loaded that way)
        self.openmp = openmp  # the library's OpenMP loops may use torch's threads
        self._tls = threading.local()  # decode_layers' workspace, one per thread: its calls run without the GIL

    def norm_quant(self, x: torch.Tensor, w: torch.Tensor | None, eps: float = 0.0, norm: bool = True):
        """RMSNorm(x)·w (x·w with norm=False; x itself when w is None) as int8 (M, K) with a scale and an
        offset per row (M, 2): x ≈ s·q + z."""
        _check(x, torch.float32)
        M, K = x.shape
        q = torch.empty(M, K, dtype=torch.int8)
        s = torch.empty(M, 2)
        self.lib.mc_norm_quant(x.data_ptr(), _ptr(w), eps, int(norm), M, K, q.data_ptr(), s.data_ptr())
        return q, s

    def norm_bf16(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        _check(x, torch.float32)
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        self.lib.mc_norm_bf16(x.data_ptr(), w.data_ptr(), eps, x.shape[0], x.shape[1], out.data_ptr())
        return out

    def dequant(self, y: torch.Tensor, rs=None, cs=None, out: torch.Tensor | None = None,
                accumulate: bool = False) -> torch.Tensor:
        """y as float32 (M, N); with accumulate, added into `out` in place."""
        _check(y, *_YTYPE)
        M, N = y.shape
        if out is None:
            out = torch.empty(M, N)
        else:
            _check(out, torch.float32)
            if out.shape != (M, N):
                raise ValueError(f"dequant: out is {tuple(out.shape)}, y is {(M, N)}")
        self.lib.mc_dequant(y.data_ptr(), _YTYPE[y.dtype], _ptr(rs), _ptr(cs), M, N, out.data_ptr(), int(accumulate))
        return out

    def swiglu_quant(self, y: torch.Tensor, rs=None, cs=None, colmul: torch.Tensor | None = None):
        """silu(gate)·up of y = [gate | up] (times colmul (F,)), quantized to int8 per row: (q (M, F),
        scale and offset (M, 2))."""
        _check(y, *_YTYPE)
        M, F = y.shape[0], y.shape[1] // 2
        q = torch.empty(M, F, dtype=torch.int8)
        s = torch.empty(M, 2)
        self.lib.mc_swiglu(y.data_ptr(), _YTYPE[y.dtype], _ptr(rs), _ptr(cs), M, F, _ptr(colmul), q.data_ptr(),
                           s.data_ptr(), None, 0)
        return q, s

    def swiglu(self, y: torch.Tensor, rs=None, cs=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """silu(gate)·up of y = [gate | up] as float32 or bfloat16 (M, F)."""
        _check(y, *_YTYPE)
        M, F = y.shape[0], y.shape[1] // 2
        out = torch.empty(M, F, dtype=dtype)
        self.lib.mc_swiglu(y.data_ptr(), _YTYPE[y.dtype], _ptr(rs), _ptr(cs), M, F, None, None, None,
                           out.data_ptr(), _YTYPE[dtype])
        return out

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Row-wise argmax of a float32 (M, V) matrix (torch's own is ~10x slower on a 49k vocabulary)."""
        _check(x, torch.float32)
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self.lib.mc_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
        return out

    def sample(self, x: torch.Tensor, inv_temp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One token per row of float32 logits x (M, V), drawn from softmax(x * inv_temp[m]) by the inverse CDF
        at u[m] in [0, 1): what softmax, cumsum and searchsorted compute, in three passes over the logits."""
        _check(x, torch.float32)
        _check(inv_temp, torch.float32)
        _check(u, torch.float32)
        M = x.shape[0]
        if x.dim() != 2 or inv_temp.shape != (M,) or u.shape != (M,):
            raise ValueError("sample: x must be (M, V), inv_temp and u (M,)")
        out = torch.empty(M, dtype=torch.int64)
        self.lib.mc_sample_rows(x.data_ptr(), M, x.shape[1], inv_temp.data_ptr(), u.data_ptr(), out.data_ptr())
        return out

    def qkv_rope_cache(self, y: torch.Tensor, rs, cs, H: int, Hkv: int, cos: torch.Tensor, sin: torch.Tensor,
                       pos: torch.Tensor, max_pos: int, q_scale: float, kc: torch.Tensor, vc: torch.Tensor,
                       q_dtype: torch.dtype = torch.float32, slots: torch.Tensor | None = None,
                       max_slot: int = -1) -> torch.Tensor:
        """Rotate queries and keys of rows 0..M-1 (positions `pos`), write keys and values into the layer's
        cache kc/vc (slots, Hkv, capacity, D) at [m, :, pos[m]] (at [slots[m], :, pos[m]] when `slots` is
        given, with max_slot its largest), return the queries (M, H, D). `max_pos` is max(pos), known to the
        caller without reading the tensor, and bounds-checked here."""
        _check(y, *_YTYPE)
        _check(pos, torch.int64)
        self._check_slots(slots, max_slot, y.shape[0], kc)
        for t in (kc, vc):
            _check(t, *_CTYPE)
        M, D = y.shape[0], kv_head_dim(kc)
        if y.shape[1] != (H + 2 * Hkv) * D or cos.shape[-1] != D or pos.shape != (M,):
            raise ValueError("qkv_rope_cache: shapes do not agree")
        if max_pos >= kc.shape[2] or max_pos >= cos.shape[0] or (slots is None and M > kc.shape[0]):
            raise ValueError("qkv_rope_cache: position or row outside the cache")
        q = torch.empty(M, H, D, dtype=q_dtype)
        self.lib.mc_qkv_rope_cache(y.data_ptr(), _YTYPE[y.dtype], _ptr(rs), _ptr(cs), M, H, Hkv, D,
                                   cos.data_ptr(), sin.data_ptr(), pos.data_ptr(), q_scale, q.data_ptr(),
                                   _YTYPE[q_dtype], kc.data_ptr(), vc.data_ptr(), _CTYPE[kc.dtype],
                                   kc.stride(0), kc.stride(1), _ptr(slots))
        return q

    @staticmethod
    def _check_slots(slots, max_slot: int, M: int, kc: torch.Tensor) -> None:
        if slots is None:
            return
        _check(slots, torch.int64)
        if slots.shape != (M,) or not 0 <= max_slot < kc.shape[0]:
            raise ValueError("slots: one per row, each a slot of the cache (max_slot their largest)")

    def attend_decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor,
                      max_pos: int, slots: torch.Tensor | None = None, max_slot: int = -1) -> torch.Tensor:
        """One decode step's attention: query heads q (M, H, D) float32, already scaled, of rows 0..M-1 attend
        to their own cached positions 0..pos[m] of kc/vc (slots, Hkv, capacity, D); returns (M, H, D) float32."""
        _check(q, torch.float32)
        _check(pos, torch.int64)
        for t in (kc, vc):
            _check(t, *_CTYPE)
        M, H, D = q.shape
        Hkv = kc.shape[1]
        if kc.shape != vc.shape or kc.dtype != vc.dtype or kv_head_dim(kc) != D or H % Hkv or pos.shape != (M,):
            raise ValueError("attend_decode: shapes do not agree")
        if max_pos >= kc.shape[2] or (slots is None and M > kc.shape[0]):
            raise ValueError("attend_decode: position or row outside the cache")
        self._check_slots(slots, max_slot, M, kc)
        out = torch.empty(M, H, D)
        # torch's thread count (the calling thread's) when the library shares torch's OpenMP runtime and there are
        # ~1,000 cached key rows to read: below that, waking the second thread costs more than it saves (in the
        # server one stream's decode ran at 82 tok/s with it against ~92 without)
        threads = torch.get_num_threads() if self.openmp and M * Hkv > 1 and M * Hkv * (max_pos + 1) >= 1024 else 1
        stride = (H // Hkv) * (max_pos + 1)
        scratch = torch.empty(threads * stride)
        self.lib.mc_attend_decode(q.data_ptr(), M, H, Hkv, D, kc.data_ptr(), vc.data_ptr(), _CTYPE[kc.dtype],
                                  kc.stride(0), kc.stride(1), pos.data_ptr(), out.data_ptr(), scratch.data_ptr(),
                                  stride, threads, _ptr(slots))
        return out

    @property
    def vnni(self) -> bool:
        """Whether this build has the AVX-512 VNNI int8 matmul (else pack_s8 returns None)."""
        return bool(self.lib.mc_has_vnni())

    def pack_s8(self, q: torch.Tensor):
        """int8 weight rows q (N, K) prepacked for gemm_s8: (panels (N/64, K/4, 64, 4) int8, 128·Σ_k q (N,)
        int32), or None where the VNNI kernel cannot take them (no VNNI, N not a multiple of 64, K of 4)."""
        _check(q, torch.int8)
        N, K = q.shape
        if not self.vnni or N % 64 or K % 4:
            return None
        panels = q.t().reshape(K // 4, 4, N // 64, 64).permute(2, 0, 3, 1).contiguous()
        return panels, (128 * q.sum(1, dtype=torch.int32)).contiguous()

    def gemm_s8(self, a: torch.Tensor, panels: torch.Tensor, comp: torch.Tensor, rs: torch.Tensor | None = None,
                cs: torch.Tensor | None = None) -> torch.Tensor:
        """a (M, K) int8 times the packed weights: (M, N) int32, equal to torch._int_mm(a, q.t()); with the
        activations' row scales rs (M, 2) and the weights' cs (2, N), float32 equal to dequant(that, rs, cs)."""
        _check(a, torch.int8)
        M, K = a.shape
        N = comp.shape[0]
        if panels.shape != (N // 64, K // 4, 64, 4):
            raise ValueError(f"gemm_s8: activations (M, {K}) do not fit weights packed as {tuple(panels.shape)}")
        if (rs is None) != (cs is None):
            raise ValueError("gemm_s8: give both rs and cs, or neither")
        if rs is not None:
            _check(rs, torch.float32)
            _check(cs, torch.float32)
            if rs.shape != (M, 2) or cs.shape != (2, N):
                raise ValueError("gemm_s8: rs must be (M, 2) and cs (2, N)")
        out = torch.empty(M, N, dtype=torch.int32 if rs is None else torch.float32)
        scratch = torch.empty((min(M, 128) + 5) // 6 * 6 * K, dtype=torch.uint8)
        # torch's threads (when shared) from ~1M multiply-adds: smaller ones finish before a second thread wakes
        threads = torch.get_num_threads() if self.openmp and N > 64 and M * N * K >= 1 << 20 else 1
        if not self.lib.mc_gemm_s8(a.data_ptr(), M, K, panels.data_ptr(), N, comp.data_ptr(), out.data_ptr(),
                                   scratch.data_ptr(), threads, _ptr(rs), _ptr(cs)):
            raise ValueError("gemm_s8: this build has no VNNI kernel")
        return out

    def decode_layers(self, layers, x: torch.Tensor, H: int, Hkv: int, F: int, pos: torch.Tensor, max_pos: int,
                      kc: torch.Tensor, vc: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_scale: float,
                      eps: float, slots: torch.Tensor | None = None, max_slot: int = -1) -> None:
        """Every layer of the engine's fused W8A8 decode pass in one call without the GIL: x (M, D) float32 (the
        residual stream) is updated in place; row m runs at position pos[m] of cache slot slots[m] (of row m
        when slots is None). `layers`: a ctypes array of LayerW8A8; kc/vc the whole cache (layers, slots,
        Hkv, capacity, D). The same kernels in the same order as the per-layer calls, so the same numbers."""
        _check(x, torch.float32)
        _check(pos, torch.int64)
        for t in (kc, vc):
            _check(t, *_CTYPE)
        M, Dm = x.shape
        hd = kv_head_dim(kc)
        if self.nogil is None or kc.shape != vc.shape or kc.dtype != vc.dtype or kc.shape[0] != len(layers) \
                or kc.shape[2] != Hkv or H % Hkv or pos.shape != (M,) or cos.shape[-1] != hd:
            raise ValueError("decode_layers: shapes do not agree")
        if max_pos >= kc.shape[3] or max_pos >= cos.shape[0] or (slots is None and M > kc.shape[1]):
            raise ValueError("decode_layers: position or row outside the cache")
        self._check_slots(slots, max_slot, M, kc[0])
        threads = torch.get_num_threads() if self.openmp else 1
        need = self.lib.mc_decode_w8a8_work(M, Dm, H, Hkv, hd, F, max_pos, threads) + 64
        buf = getattr(self._tls, "work", None)
        if buf is None or buf.numel() < need:  # kept between calls: the next step needs about the same
            buf = self._tls.work = torch.empty(need + need // 2, dtype=torch.uint8)
        work = (buf.data_ptr() + 63) // 64 * 64
        if not self.nogil.mc_decode_w8a8(layers, len(layers), x.data_ptr(), M, Dm, H, Hkv, hd, F, pos.data_ptr(),
                                         _ptr(slots), max_pos, kc.data_ptr(), vc.data_ptr(), _CTYPE[kc.dtype],
                                         kc.stride(0), kc.stride(1), kc.stride(2), cos.data_ptr(), sin.data_ptr(),
                                         q_scale, eps, threads, work):
            raise ValueError("decode_layers: this build has no VNNI kernel")

    def int4_groups(self, w: torch.Tensor):
        """engine._int4_groups in one pass: (q int32 (N, K), scales and zeros bf16 (K/32, N, 2), relative error)."""
        _check(w, torch.float32)
        N, K = w.shape
        if K % 32:
            raise ValueError("int4 groups need rows of a multiple of 32")
        q = torch.empty(N, K, dtype=torch.int32)
        sz = torch.empty(K // 32, N, 2, dtype=torch.bfloat16)
        err = self.lib.mc_int4_groups(w.data_ptr(), N, K, q.data_ptr(), sz.data_ptr())
        return q, sz, float(err)

    def int8_rows(self, w: torch.Tensor):
        """Symmetric int8 per row: (q int8 (N, K), scales float32 (N,)), w ≈ q·scale."""
        _check(w, torch.float32)
        N, K = w.shape
        q = torch.empty(N, K, dtype=torch.int8)
        t = torch.empty(N)
        self.lib.mc_int8_rows(w.data_ptr(), N, K, q.data_ptr(), t.data_ptr())
        return q, t

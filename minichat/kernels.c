/* Fused element-wise kernels for the engine's int8 decode path (minichat/kernels.py compiles this file with
 * the system C compiler on first use and calls it through ctypes).
 *
 * Why: between its matmuls, a decode step is ~30 tiny torch ops per layer (RMSNorm, per-row int8 scaling,
 * RoPE, KV-cache writes, SwiGLU, residual adds), each paying dispatcher and allocation overhead that at
 * batch 32 adds up to a third of the step. Each kernel here does one of those chains in one pass over rows
 * that are already in cache. All tensors are row-major and contiguous; the Python side checks that.
 *
 * "y" inputs are matmul outputs in one of three forms (ytype): 0 float32; 1 int32 from an int8 x int8
 * matmul; 2 bfloat16. Activations are quantized per row asymmetrically, x ≈ s·q + z (row_sz (M, 2) holds s, z),
 * weights per output row, w ≈ t·p (col (2, N) holds t and the column sums Σ_k w[n, k]), so
 * x·wᵀ ≈ s·t·(q·pᵀ) + z·Σ_k w[n, k]: an int32 y dequantizes as y·s[m]·t[n] + z[m]·sum[n]. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

int mc_openmp(void) { /* whether this build splits work over OpenMP threads */
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Row loops split over the calling thread's OpenMP team (torch's threads) only when the loader allowed it
 * (the library shares torch's OpenMP runtime) and there are enough elements to pay for waking the team. */
static int threads_allowed = 0;
void mc_allow_threads(int allow) { threads_allowed = allow; }
#define PAR_MIN 16384
#define PAR(rows, work) ((rows) > 1 && (work) >= PAR_MIN && threads_allowed)

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* e^x for float32 to ~2 ulp, written so that loops over it vectorize (glibc's vector expf needs -ffast-math):
 * x = k·ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial (Cephes' expf coefficients), 2^k by bits. */
static inline float exp_f32(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    float k = nearbyintf(x * 1.44269504088896341f);
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* row m of y, dequantized into out[0..n) */
static inline void load_row(const void *y, int ytype, int64_t m, int64_t ncols, int64_t off, int64_t n,
                            const float *row_sz, const float *col, float *out) {
    if (ytype == 0) {
        memcpy(out, (const float *)y + m * ncols + off, n * sizeof(float));
    } else if (ytype == 1) {
        const int32_t *r = (const int32_t *)y + m * ncols + off;
        const float sc = row_sz[2 * m], z = row_sz[2 * m + 1];
        const float *t = col + off, *sum = col + ncols + off;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) out[j] = (float)r[j] * sc * t[j] + z * sum[j];
    } else {
        const uint16_t *r = (const uint16_t *)y + m * ncols + off;
        for (int64_t j = 0; j < n; j++) out[j] = bf16_to_f32(r[j]);
    }
}

/* int8 with one scale and one offset per row: h ≈ s·q + z, q in [-127, 127], z the middle of the row's range
 * (asymmetric: a row of mostly positive values uses all 255 levels, not half of them) */
static inline void quant_row(const float *h, int64_t n, int8_t *q, float *sz) {
    float lo = h[0], hi = h[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
    for (int64_t j = 0; j < n; j++) { /* not fminf/fmaxf: their NaN rules keep the loop scalar */
        lo = h[j] < lo ? h[j] : lo;
        hi = h[j] > hi ? h[j] : hi;
    }
    const float z = 0.5f * (hi + lo);
    const float sc = hi - lo > 1e-30f ? (hi - lo) / 254.f : 1.f;
    const float inv = 1.f / sc;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) q[j] = (int8_t)nearbyintf((h[j] - z) * inv);
    sz[0] = sc;
    sz[1] = z;
}

/* Per row: h = RMSNorm(x)·w (norm != 0), x·w (norm == 0, w != NULL) or x, then quantized to int8 with one
 * scale and offset per row (sz (M, 2)). w may carry per-channel smoothing factors (_W8A8IntMM in engine.py). */
void mc_norm_quant(const float *x, const float *w, float eps, int norm, int64_t M, int64_t K, int8_t *q,
                   float *sz) {
#pragma omp parallel for schedule(static) if (PAR(M, M * K))
    for (int64_t m = 0; m < M; m++) {
        float h[K];
        const float *r = x + m * K;
        if (!w) {
            quant_row(r, K, q + m * K, sz + 2 * m);
            continue;
        }
        float inv = 1.f;
        if (norm) {
            float ss = 0.f;
#pragma omp simd reduction(+ : ss)
            for (int64_t j = 0; j < K; j++) ss += r[j] * r[j];
            inv = 1.f / sqrtf(ss / (float)K + eps);
        }
#pragma omp simd
        for (int64_t j = 0; j < K; j++) h[j] = r[j] * inv * w[j];
        quant_row(h, K, q + m * K, sz + 2 * m);
    }
}

/* Per row: RMSNorm into bfloat16 (the input of the bf16-activation weight-only kernels). */
void mc_norm_bf16(const float *x, const float *w, float eps, int64_t M, int64_t K, uint16_t *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * K;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < K; j++) ss += r[j] * r[j];
        float inv = 1.f / sqrtf(ss / (float)K + eps);
        for (int64_t j = 0; j < K; j++) out[m * K + j] = f32_to_bf16(r[j] * inv * w[j]);
    }
}

/* out (M, N) = y (accumulate: out += y), y dequantized. */
void mc_dequant(const void *y, int ytype, const float *row_sz, const float *col, int64_t M, int64_t N,
                float *out, int accumulate) {
#pragma omp parallel for schedule(static) if (PAR(M, M * N))
    for (int64_t m = 0; m < M; m++) {
        float t[accumulate ? N : 1];
        float *o = out + m * N;
        if (!accumulate) {
            load_row(y, ytype, m, N, 0, N, row_sz, col, o);
            continue;
        }
        load_row(y, ytype, m, N, 0, N, row_sz, col, t);
#pragma omp simd
        for (int64_t j = 0; j < N; j++) o[j] += t[j];
    }
}

/* SwiGLU on y = [gate | up] (M, 2F): a = silu(gate) * up (times colmul, if given), then quantized per row
 * (q (M, F), sz (M, 2)) when q != NULL, else written to out (M, F) as float32 (otype 0) or bfloat16 (otype 2). */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512 exp512_nonpos(__m512 t) { /* e^t for t <= 0; 0 below -87 (and for NaN) */
    const __mmask16 ok = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-87.f), _CMP_GT_OQ);
    t = _mm512_max_ps(t, _mm512_set1_ps(-87.f));
    const __m512 z = _mm512_mul_ps(t, _mm512_set1_ps(1.44269504f)); /* 2^z, z = n + f, |f| <= 1/2 */
    const __m512 n = _mm512_roundscale_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(z, n);
    /* 2^f = e^(f ln 2): Taylor to degree 7, error < 1e-8 on |f| <= 1/2 */
    __m512 p = _mm512_set1_ps(1.5252734e-5f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530e-4f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_maskz_mov_ps(ok, _mm512_scalef_ps(p, n));
}

/* one row of mc_swiglu's int32 → int8 form in two passes over 16 lanes instead of six: silu(g)·u·colmul (the
 * dequantization in load_row's order of operations) and its min/max, then quant_row's rounding. silu's
 * sigmoid from e^-|g| (exp512_nonpos), so e^x never overflows. */
static void swiglu_row_s8(const int32_t *yg, const int32_t *yu, float sc, float z, const float *t, const float *sum,
                          int64_t F, const float *colmul, float *a, int8_t *q, float *sz) {
    const __m512 vsc = _mm512_set1_ps(sc), vz = _mm512_set1_ps(z), one = _mm512_set1_ps(1.f);
    __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < F; j += 16) {
        const __m512 g = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(yg + j)), vsc),
                                                     _mm512_loadu_ps(t + j)),
                                       _mm512_mul_ps(vz, _mm512_loadu_ps(sum + j)));
        const __m512 u = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(yu + j)), vsc),
                                                     _mm512_loadu_ps(t + F + j)),
                                       _mm512_mul_ps(vz, _mm512_loadu_ps(sum + F + j)));
        const __m512 e = exp512_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g))); /* e^-|g| */
        const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
        const __m512 sig = _mm512_div_ps(_mm512_mask_blend_ps(neg, one, e), _mm512_add_ps(one, e));
        __m512 v = _mm512_mul_ps(_mm512_mul_ps(g, sig), u);
        if (colmul) v = _mm512_mul_ps(v, _mm512_loadu_ps(colmul + j));
        _mm512_storeu_ps(a + j, v);
        lo = _mm512_min_ps(lo, v);
        hi = _mm512_max_ps(hi, v);
    }
    const float mn = _mm512_reduce_min_ps(lo), mx = _mm512_reduce_max_ps(hi);
    const float zz = 0.5f * (mx + mn), s8 = mx - mn > 1e-30f ? (mx - mn) / 254.f : 1.f, inv = 1.f / s8;
#pragma omp simd
    for (int64_t j = 0; j < F; j++) q[j] = (int8_t)nearbyintf((a[j] - zz) * inv);
    sz[0] = s8;
    sz[1] = zz;
}
#endif

void mc_swiglu(const void *y, int ytype, const float *row_sz, const float *col, int64_t M, int64_t F,
               const float *colmul, int8_t *q, float *sz, void *out, int otype) {
#pragma omp parallel for schedule(static) if (PAR(M, M * F))
    for (int64_t m = 0; m < M; m++) {
        float g[F], u[F], a[F];
#if defined(__AVX512F__)
        if (ytype == 1 && q && F % 16 == 0) {
            swiglu_row_s8((const int32_t *)y + m * 2 * F, (const int32_t *)y + m * 2 * F + F, row_sz[2 * m],
                          row_sz[2 * m + 1], col, col + 2 * F, F, colmul, a, q + m * F, sz + 2 * m);
            continue;
        }
#endif
        load_row(y, ytype, m, 2 * F, 0, F, row_sz, col, g);
        load_row(y, ytype, m, 2 * F, F, F, row_sz, col, u);
#pragma omp simd
        for (int64_t j = 0; j < F; j++) a[j] = g[j] / (1.f + exp_f32(-g[j])) * u[j];
        if (colmul) {
#pragma omp simd
            for (int64_t j = 0; j < F; j++) a[j] *= colmul[j];
        }
        if (q) quant_row(a, F, q + m * F, sz + 2 * m);
        else if (otype == 0) memcpy((float *)out + m * F, a, F * sizeof(float));
        else for (int64_t j = 0; j < F; j++) ((uint16_t *)out)[m * F + j] = f32_to_bf16(a[j]);
    }
}

/* Per row, the index of the largest value (the first one on ties), as torch.argmax for finite input. */
void mc_argmax_rows(const float *x, int64_t M, int64_t V, int64_t *out) {
#pragma omp parallel for schedule(static) if (PAR(M, M * V))
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * V;
        float best = r[0];
#pragma omp simd reduction(max : best)
        for (int64_t j = 0; j < V; j++) best = r[j] > best ? r[j] : best;
        int64_t i = 0;
        while (i < V - 1 && !(r[i] == best)) i++;  /* a vectorized max, then one scan to its first place */
        out[m] = i;
    }
}

/* Sampling one token per row from softmax(x[m] * inv_temp[m]) by the inverse CDF: the first j whose running sum
 * of exp((x - max) * inv_temp) reaches u[m] times the row's total. It replaces four passes of torch ops over a
 * (rows, 49k) matrix (divide, softmax, cumsum, searchsorted: ~2 ms of a 32-row decode step) by three passes
 * that read the logits only. Entries at -inf (or below e^-87 of the maximum) have probability exactly 0;
 * a row whose entries are all -inf or NaN gets its argmax's place, 0. The running sum may end a rounding error
 * short of the target: then the last entry with a non-zero probability is taken. */

void mc_sample_rows(const float *x, int64_t M, int64_t V, const float *inv_temp, const float *u, int64_t *out) {
#pragma omp parallel for schedule(static) if (PAR(M, M * V))
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * V;
        const float it = inv_temp[m];
        float best = -INFINITY;
#pragma omp simd reduction(max : best)
        for (int64_t j = 0; j < V; j++) best = r[j] > best ? r[j] : best;
        int64_t arg = 0; /* no probabilities to draw from (all -inf, NaN or a temperature <= 0): the argmax */
        if (!(best > -INFINITY) || !(it > 0.f)) {
            while (best > -INFINITY && arg < V - 1 && !(r[arg] == best)) arg++;
            out[m] = arg;
            continue;
        }
#if defined(__AVX512F__)
        const __m512 mx = _mm512_set1_ps(best), itv = _mm512_set1_ps(it);
        __m512 acc = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= V; j += 16)
            acc = _mm512_add_ps(acc, exp512_nonpos(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(r + j), mx), itv)));
        const __mmask16 tail = (__mmask16)((1u << (V - j)) - 1u);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(tail, exp512_nonpos(_mm512_mul_ps(
                                                         _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, r + j), mx), itv))));
        const double total = _mm512_reduce_add_ps(acc);
        const double target = (double)u[m] * total;
        double run = 0.0;
        int64_t pick = -1, last_nz = 0;
        float e[16];
        for (j = 0; j < V && pick < 0; j += 16) {
            const __mmask16 k = V - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - j)) - 1u);
            const __m512 ev = _mm512_maskz_mov_ps(k, exp512_nonpos(_mm512_mul_ps(
                                                          _mm512_sub_ps(_mm512_maskz_loadu_ps(k, r + j), mx), itv)));
            const float blk = _mm512_reduce_add_ps(ev);
            if (blk > 0.f) {
                if (run + blk < target) { /* not in this block: remember its last non-zero entry */
                    _mm512_storeu_ps(e, ev);
                    for (int q = 15; q >= 0; q--) if (e[q] > 0.f) { last_nz = j + q; break; }
                    run += blk;
                    continue;
                }
                _mm512_storeu_ps(e, ev);
                for (int q = 0; q < 16 && j + q < V; q++) {
                    if (e[q] > 0.f) last_nz = j + q;
                    run += e[q];
                    if (run >= target && e[q] > 0.f) { pick = j + q; break; }
                }
            }
        }
        out[m] = pick >= 0 ? pick : last_nz;
#else
        double total = 0.0;
        for (int64_t j = 0; j < V; j++) total += r[j] - best > -1e30f ? exp((double)(r[j] - best) * it) : 0.0;
        const double target = (double)u[m] * total;
        double run = 0.0;
        int64_t pick = 0;
        for (int64_t j = 0; j < V; j++) {
            const double p = r[j] > -INFINITY ? exp((double)(r[j] - best) * it) : 0.0;
            if (p > 0.0) { pick = j; run += p; if (run >= target) break; }
        }
        out[m] = pick;
#endif
    }
}

/* The attention half of a decode step's qkv matmul, for rows m = 0..M-1 at positions pos[m]:
 * rotate-half RoPE on the query and key heads (x·cos + swap_halves(x)·sin, with sin's first half negated in
 * the table), the query heads also scaled by q_scale (1/√d folded in), written to q_out (M, H, D) as float32
 * (qtype 0) or bfloat16 (qtype 2); keys and values written into the layer's cache at [m, head, pos[m], :]
 * as float32 (ctype 0), bfloat16 (ctype 2) or int8 (ctype 3: a position's D values as int8, then their float32
 * scale, D + 4 bytes; see kv_store_s8). Cache strides are in elements (bytes for int8): row, head; the position
 * stride is kv_stride(ctype, D). */
/* a cached position's elements apart: D, or D + 4 bytes for int8 (the values, then their scale) */
static inline int64_t kv_stride(int ctype, int64_t D) { return ctype == 3 ? D + 4 : D; }

/* one key or value row as int8: symmetric, one scale per row (x ≈ q·scale, q = x / scale rounded to nearest
 * even, |q| <= 127), the scale stored as float32 after the D bytes. The scale is max|x| / 127 rounded to bfloat16:
 * a position's keys may differ in their last bits between two computations of the same prompt (position 0
 * runs alone or with other prompts), and as with a bf16 cache such differences then almost never reach the
 * stored bytes, so a prompt's logits stay the same however it was batched. Why int8: at batch 32 a decode step
 * reads ~70 MB of cache, and attention waits on that reading (fp32 took 1.9x bf16's time); int8 halves bf16's
 * bytes. engine._kv_quant computes the same bytes with torch ops. */
static inline void kv_store_s8(const float *x, int64_t D, int8_t *dst) {
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int64_t j = 0; j < D; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    const float scale = bf16_to_f32(f32_to_bf16(amax / 127.f)), inv = scale > 0.f ? 1.f / scale : 0.f;
#pragma omp simd
    for (int64_t j = 0; j < D; j++) {
        const float r = nearbyintf(x[j] * inv); /* the bf16 scale may leave max|x| at up to 127.5 steps */
        dst[j] = (int8_t)(r > 127.f ? 127.f : r < -127.f ? -127.f : r);
    }
    memcpy(dst + D, &scale, sizeof(float));
}

static inline float kv_scale_s8(const void *c, int64_t at, int64_t D) {
    float s;
    memcpy(&s, (const int8_t *)c + at + D, sizeof(float));
    return s;
}

void mc_qkv_rope_cache(const void *y, int ytype, const float *row_sz, const float *col, int64_t M,
                       int64_t H, int64_t Hkv, int64_t D, const float *cos_tab, const float *sin_tab,
                       const int64_t *pos, float q_scale, void *q_out, int qtype, void *kc, void *vc, int ctype,
                       int64_t row_stride, int64_t head_stride, const int64_t *slots) {
    /* row m's keys and values go to cache slot slots[m] (slot m when slots is NULL): a prompt's tokens, all
     * in one slot at consecutive positions, are then written like a decode step's rows */
    const int64_t W = (H + 2 * Hkv) * D, half = D / 2;
#pragma omp parallel for schedule(static) if (PAR(M, M * W))
    for (int64_t m = 0; m < M; m++) {
        float r[W], o[D];
        load_row(y, ytype, m, W, 0, W, row_sz, col, r);
        const float *c = cos_tab + pos[m] * D, *sn = sin_tab + pos[m] * D;
        for (int64_t h = 0; h < H + 2 * Hkv; h++) {
            const float *x = r + h * D;
            if (h < H + Hkv) {
                const float sc = h < H ? q_scale : 1.f;
                /* the halves apart, so that each loop vectorizes (the same arithmetic per element) */
#pragma omp simd
                for (int64_t j = 0; j < half; j++) o[j] = (x[j] * c[j] + x[j + half] * sn[j]) * sc;
#pragma omp simd
                for (int64_t j = half; j < D; j++) o[j] = (x[j] * c[j] + x[j - half] * sn[j]) * sc;
            } else {
                memcpy(o, x, D * sizeof(float));
            }
            if (h < H) {
                if (qtype == 0) memcpy((float *)q_out + (m * H + h) * D, o, D * sizeof(float));
                else for (int64_t j = 0; j < D; j++) ((uint16_t *)q_out)[(m * H + h) * D + j] = f32_to_bf16(o[j]);
                continue;
            }
            int64_t kvh = h < H + Hkv ? h - H : h - H - Hkv;
            int64_t at = (slots ? slots[m] : m) * row_stride + kvh * head_stride + pos[m] * kv_stride(ctype, D);
            void *cache = h < H + Hkv ? kc : vc;
            if (ctype == 0) memcpy((float *)cache + at, o, D * sizeof(float));
            else if (ctype == 3) kv_store_s8(o, D, (int8_t *)cache + at);
            else for (int64_t j = 0; j < D; j++) ((uint16_t *)cache)[at + j] = f32_to_bf16(o[j]);
        }
    }
}

/* 4-bit groups of 32 along each row of w (N, K): w ≈ (q - 8)·scale + zero with q in 0..15, scale and zero
 * rounded to bfloat16 (sz (K/32, N, 2), torch's int4 layout), q as int32 (N, K). Returns the largest
 * reconstruction error relative to max|w|: ~0 when w came from 4-bit groups (a Q4_1 GGUF). The same
 * arithmetic as engine._int4_groups, in one pass instead of ~15 whole-matrix torch ops. */
double mc_int4_groups(const float *w, int64_t N, int64_t K, int32_t *q, uint16_t *sz) {
    const int64_t G = K / 32;
    float err = 0.f, wmax = 0.f;
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < G; g++) {
            const float *x = w + n * K + g * 32;
            float lo = x[0], hi = x[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
            for (int j = 0; j < 32; j++) {
                lo = x[j] < lo ? x[j] : lo;
                hi = x[j] > hi ? x[j] : hi;
            }
            float d = (hi - lo) / 15.f;
            if (!(d > 0.f)) d = 1.f;
            const uint16_t sb = f32_to_bf16(d), zb = f32_to_bf16(lo + 8.f * d);
            sz[(g * N + n) * 2] = sb;
            sz[(g * N + n) * 2 + 1] = zb;
            const float ds = bf16_to_f32(sb), zs = bf16_to_f32(zb);
            int32_t *qr = q + n * K + g * 32;
#pragma omp simd reduction(max : err, wmax)
            for (int j = 0; j < 32; j++) {
                float v = nearbyintf((x[j] - lo) / d);
                v = v < 0.f ? 0.f : (v > 15.f ? 15.f : v);
                qr[j] = (int32_t)v;
                float e = fabsf((v - 8.f) * ds + zs - x[j]), a = fabsf(x[j]);
                err = e > err ? e : err;
                wmax = a > wmax ? a : wmax;
            }
        }
    }
    return (double)err / (wmax > 1e-12f ? wmax : 1e-12f);
}

/* Symmetric int8 per row of w (N, K): q = round(w / t), t = max|w_row| / 127 (1e-12 at least), as
 * torch.round(w / t[:, None]).clamp(-127, 127) computes it. */
void mc_int8_rows(const float *w, int64_t N, int64_t K, int8_t *q, float *t) {
    for (int64_t n = 0; n < N; n++) {
        const float *x = w + n * K;
        float amax = 0.f;
#pragma omp simd reduction(max : amax)
        for (int64_t j = 0; j < K; j++) {
            float a = fabsf(x[j]);
            amax = a > amax ? a : amax;
        }
        float sc = amax > 1e-12f ? amax : 1e-12f;
        sc = sc / 127.f;
#pragma omp simd
        for (int64_t j = 0; j < K; j++) {
            float v = nearbyintf(x[j] / sc);
            q[n * K + j] = (int8_t)(v < -127.f ? -127.f : (v > 127.f ? 127.f : v));
        }
        t[n] = sc;
    }
}

/* Decode attention over the KV cache: for rows m = 0..M-1, query head h (kv head h / (H/Hkv)) attends to the
 * cached positions 0..pos[m] of its row: out[m, h] = softmax(q·Kᵀ) V, q already scaled (1/√D folded in).
 * q and out are float32 (M, H, D); the cache is float32 (ctype 0) or bfloat16 (ctype 2) with strides in
 * elements for row and head (position stride D). Each row reads only its own positions, so rows of different
 * lengths need no mask. Why not SDPA: with one query per sequence its CPU kernel pays a fixed cost per
 * (row, kv head) pair that outweighs reading the pair's keys and values (batch 32, ~100 positions).
 * `scratch` holds (H/Hkv)·(max(pos) + 1) floats. */
static inline void load_kv_row(const void *c, int ctype, int64_t at, int64_t D, float *dst) {
    if (ctype == 0) {
        memcpy(dst, (const float *)c + at, D * sizeof(float));
    } else if (ctype == 3) {
        const int8_t *r = (const int8_t *)c + at;
        const float s = kv_scale_s8(c, at, D);
        for (int64_t d = 0; d < D; d++) dst[d] = (float)r[d] * s;
    } else {
        const uint16_t *r = (const uint16_t *)c + at;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) dst[d] = bf16_to_f32(r[d]);
    }
}

static void softmax_rows(float *s, int64_t G, int64_t n) {
    for (int64_t g = 0; g < G; g++, s += n) {
        float mx = s[0], sum = 0.f;
#pragma omp simd reduction(max : mx)
        for (int64_t j = 1; j < n; j++) mx = s[j] > mx ? s[j] : mx;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; j++) {
            s[j] = exp_f32(s[j] - mx);
            sum += s[j];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) s[j] *= inv;
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define ATT_MAXC 8 /* D up to 128 */
#define ATT_MAXG 8

static inline __m512 load16(const void *c, int ctype, int64_t at) {
    if (ctype == 0) return _mm512_loadu_ps((const float *)c + at);
    if (ctype == 3) /* the row's scale is applied to its score (keys) or its weight (values) */
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)c + at))));
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)c + at));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* softmax_rows in masked 16-lane blocks, inlined: no scalar remainder loops for the ~5 blocks of a row (perf:
 * the attention's share of a batch-32 step 15.0% -> 12.8%) */
static inline void softmax16(float *s, int64_t G, int64_t n) {
    for (int64_t g = 0; g < G; g++, s += n) {
        __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
            mx = _mm512_mask_max_ps(mx, k, mx, _mm512_maskz_loadu_ps(k, s + j));
        }
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
            const __m512 e = exp512_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), m));
            sum = _mm512_mask_add_ps(sum, k, sum, e);
            _mm512_mask_storeu_ps(s + j, k, e);
        }
        const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
            _mm512_mask_storeu_ps(s + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + j), inv));
        }
    }
}

/* one (row, kv head) pair with AVX-512: C = D/16 vectors per key; the G queries stay in registers */
static inline void prefetch_row(const void *c, int ctype, int64_t at, int64_t D) {
    const int64_t esz = ctype == 0 ? 4 : ctype == 3 ? 1 : 2, bytes = ctype == 3 ? D + 4 : D * esz;
    const char *p = (const char *)c + at * esz;
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
    if (bytes % 64 && (((uintptr_t)p + bytes - 1) >> 6) != (((uintptr_t)p + bytes / 64 * 64) >> 6))
        _mm_prefetch(p + bytes - 1, _MM_HINT_T0); /* an unaligned row's last line */
}

/* lane i of the result = the sum of the 16 lanes of v[i]: pairwise unpack/shuffle adds, each intermediate lane
 * holding a partial sum of one v[i] only */
static inline __m512 sum16(float v[16][16]) {
    __m512 x[8], y[4];
    for (int i = 0; i < 8; i++) {
        const __m512 a = _mm512_load_ps(v[2 * i]), b = _mm512_load_ps(v[2 * i + 1]);
        x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    for (int i = 0; i < 4; i++)
        y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44), _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
    const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
    const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88), _mm512_shuffle_f32x4(y[2], y[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xDD));
}

static inline __attribute__((always_inline)) void attend_pair_avx512(
    const float *qg, int64_t G, const int64_t C, const void *kc, const void *vc, int ctype, int64_t base,
    int64_t n, float *s, float *o, int64_t next_base, int64_t next_n) {
    __m512 qv[ATT_MAXG][ATT_MAXC], acc[ATT_MAXG][ATT_MAXC];
    for (int64_t g = 0; g < G; g++)
        for (int64_t c = 0; c < C; c++) qv[g][c] = _mm512_loadu_ps(qg + g * C * 16 + c * 16);
    /* the cache comes from beyond L2 (30 layers of it): prefetch the keys ahead, the values while the keys are
     * read, and the next pair's keys while these values are read (5 -> ? GB/s) */
    /* keys in blocks of 16: each key's G partial-sum vectors go to `part`, and one transposing add tree per
     * query head turns 16 of them into 16 scores (~3 instructions a score, against ~10 for a horizontal sum
     * per key); a partial block computes unused lanes from stale `part` rows and does not store them */
    float part[ATT_MAXG][16][16] __attribute__((aligned(64)));
    const int64_t D = C * 16, ps = kv_stride(ctype, D); /* a position's stride */
    float ksc[16] __attribute__((aligned(64))) = {0};  /* int8: the block's key scales */
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const int64_t nb = n - j0 < 16 ? n - j0 : 16;
        for (int64_t jj = 0; jj < nb; jj++) {
            const int64_t j = j0 + jj;
            __m512 kr[ATT_MAXC];
            if (j + 8 < n) prefetch_row(kc, ctype, base + (j + 8) * ps, D);
            prefetch_row(vc, ctype, base + j * ps, D);
            for (int64_t c = 0; c < C; c++) kr[c] = load16(kc, ctype, base + j * ps + c * 16);
            if (ctype == 3) ksc[jj] = kv_scale_s8(kc, base + j * ps, D);
            for (int64_t g = 0; g < G; g++) {
                __m512 a = _mm512_mul_ps(qv[g][0], kr[0]);
                for (int64_t c = 1; c < C; c++) a = _mm512_fmadd_ps(qv[g][c], kr[c], a);
                _mm512_store_ps(part[g][jj], a);
            }
        }
        const __mmask16 keep = (__mmask16)((1u << nb) - 1u);
        for (int64_t g = 0; g < G; g++) {
            __m512 sc = sum16(part[g]);
            if (ctype == 3) sc = _mm512_mul_ps(sc, _mm512_load_ps(ksc));
            _mm512_mask_storeu_ps(s + g * n + j0, keep, sc);
        }
    }
    softmax16(s, G, n);
    for (int64_t g = 0; g < G; g++)
        for (int64_t c = 0; c < C; c++) acc[g][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        __m512 vr[ATT_MAXC];
        if (j < next_n && j < 16) prefetch_row(kc, ctype, next_base + j * ps, D);
        for (int64_t c = 0; c < C; c++) vr[c] = load16(vc, ctype, base + j * ps + c * 16);
        const float vs = ctype == 3 ? kv_scale_s8(vc, base + j * ps, D) : 1.f;
        for (int64_t g = 0; g < G; g++) {
            const __m512 p = _mm512_set1_ps(ctype == 3 ? s[g * n + j] * vs : s[g * n + j]);
            for (int64_t c = 0; c < C; c++) acc[g][c] = _mm512_fmadd_ps(p, vr[c], acc[g][c]);
        }
    }
    for (int64_t g = 0; g < G; g++)
        for (int64_t c = 0; c < C; c++) _mm512_storeu_ps(o + g * C * 16 + c * 16, acc[g][c]);
}
#endif

#define ATT_PAIR_COST 8 /* a pair's fixed work (loading queries, softmax, stores) in keys' worth */
static inline void attend_one_pair(const float *q, int64_t pair, int64_t M, int64_t H, int64_t Hkv, int64_t D,
                                   const void *kc, const void *vc, int ctype, int64_t row_stride,
                                   int64_t head_stride, const int64_t *pos, float *out, float *sc,
                                   const int64_t *slots) {
    const int64_t G = H / Hkv;
    const int64_t m = pair / Hkv, kh = pair % Hkv, n = pos[m] + 1;
    const int64_t base = (slots ? slots[m] : m) * row_stride + kh * head_stride;
    const float *qg = q + (m * H + kh * G) * D;
    float *o = out + (m * H + kh * G) * D;
#if defined(__AVX512F__)
    if (D % 16 == 0 && D / 16 <= ATT_MAXC && G <= ATT_MAXG) {
        /* constant vector counts, so that the compiler unrolls and keeps everything in registers */
        const int64_t nm = kh + 1 < Hkv ? m : m + 1;
        const int64_t nb = (nm < M && slots ? slots[nm] : nm) * row_stride + (kh + 1 < Hkv ? kh + 1 : 0) * head_stride;
        const int64_t nn = nm < M ? pos[nm] + 1 : 0;
        /* the common head size with each cache type as a constant: no type branches in the inner loops */
        if (D == 64 && ctype == 3) attend_pair_avx512(qg, G, 4, kc, vc, 3, base, n, sc, o, nb, nn);
        else if (D == 64 && ctype == 2) attend_pair_avx512(qg, G, 4, kc, vc, 2, base, n, sc, o, nb, nn);
        else if (D == 64) attend_pair_avx512(qg, G, 4, kc, vc, ctype, base, n, sc, o, nb, nn);
        else if (D == 32) attend_pair_avx512(qg, G, 2, kc, vc, ctype, base, n, sc, o, nb, nn);
        else if (D == 128) attend_pair_avx512(qg, G, 8, kc, vc, ctype, base, n, sc, o, nb, nn);
        else attend_pair_avx512(qg, G, D / 16, kc, vc, ctype, base, n, sc, o, nb, nn);
        return;
    }
#endif
    float kv[D];
    for (int64_t j = 0; j < n; j++) { /* scores s[g, j] = q_g · k_j */
        load_kv_row(kc, ctype, base + j * kv_stride(ctype, D), D, kv);
        for (int64_t g = 0; g < G; g++) {
            const float *qq = qg + g * D;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < D; d++) acc += qq[d] * kv[d];
            sc[g * n + j] = acc;
        }
    }
    softmax_rows(sc, G, n);
    memset(o, 0, G * D * sizeof(float)); /* out_g = Σ_j p[g, j] v_j */
    for (int64_t j = 0; j < n; j++) {
        load_kv_row(vc, ctype, base + j * kv_stride(ctype, D), D, kv);
        for (int64_t g = 0; g < G; g++) {
            const float p = sc[g * n + j];
            float *og = o + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) og[d] += p * kv[d];
        }
    }
}

void mc_attend_decode(const float *q, int64_t M, int64_t H, int64_t Hkv, int64_t D, const void *kc,
                      const void *vc, int ctype, int64_t row_stride, int64_t head_stride, const int64_t *pos,
                      float *out, float *scratch, int64_t scratch_stride, int nthreads, const int64_t *slots) {
    /* row m attends to positions 0..pos[m] of cache slot slots[m] (slot m when slots is NULL): rows of one
     * prompt in one slot at consecutive positions attend causally, which is how a prefill uses this kernel.
     * (row, kv head) pairs split over the caller's threads (torch's own OpenMP runtime: the library links the
     * libgomp that torch has loaded, so no second thread team competes for the cores) in consecutive ranges of
     * equal cost, cost = cached positions + a fixed part: in a server the rows' lengths differ, and an equal
     * count of pairs left one thread waiting for the other */
    const int64_t P = M * Hkv;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int64_t t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        int64_t total = 0;
        for (int64_t m = 0; m < M; m++) total += (pos[m] + 1 + ATT_PAIR_COST) * Hkv;
        const int64_t lo = total * t / T, hi = total * (t + 1) / T;
        int64_t acc = 0;
        for (int64_t pair = 0; pair < P; pair++) { /* a pair is this thread's when its cost midpoint is */
            const int64_t c = pos[pair / Hkv] + 1 + ATT_PAIR_COST, mid = acc + c / 2;
            acc += c;
            if (mid < lo) continue;
            if (mid >= hi) break;
            attend_one_pair(q, pair, M, H, Hkv, D, kc, vc, ctype, row_stride, head_stride, pos, out,
                            scratch + t * scratch_stride, slots);
        }
    }
}

/* ---------------------------------------------------------------- int8 x int8 matmul (VNNI)
 * C (M, N) int32 = A (M, K) int8 · B (K, N) int8, the same integers torch._int_mm returns. B is prepacked as
 * panels of 64 columns, [N/64][K/4][64][4], so that one 64-byte load holds 4 consecutive k of 16 columns, as
 * vpdpbusd takes them; vpdpbusd multiplies unsigned by signed bytes, so A is shifted to u8 (a + 128) and
 * comp[n] = 128·Σ_k B[k][n] is subtracted at the end.
 * Why not _int_mm: at the decode batches of a server (5 to 64 rows) oneDNN reached ~120 GMAC/s per core here
 * against ~380 that a register-only vpdpbusd loop measures; this 6 × 64 register tile, with the next panel
 * prefetched while the current one is reused from L1, runs a batch-32 step's matmuls ~1.7× faster. Rows are
 * taken in blocks of 128 (bigger blocks re-read A from L2 for every panel and fell behind oneDNN). */
int mc_has_vnni(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#include <immintrin.h>
#include <stdlib.h>
#define G_NR 64
#define G_ZERO(i) __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
#define G_ROW(i)                                                                                               \
    x = _mm512_set1_epi32(*(const int32_t *)(a##i + 4 * k4));                                                  \
    c##i##0 = _mm512_dpbusd_epi32(c##i##0, x, b0);                                                             \
    c##i##1 = _mm512_dpbusd_epi32(c##i##1, x, b1);                                                             \
    c##i##2 = _mm512_dpbusd_epi32(c##i##2, x, b2);                                                             \
    c##i##3 = _mm512_dpbusd_epi32(c##i##3, x, b3);
#define G_STORE(i)                                                                                             \
    if (i < mr) {                                                                                              \
        const __m512i r0 = _mm512_sub_epi32(c##i##0, q0), r1 = _mm512_sub_epi32(c##i##1, q1),                  \
                      r2 = _mm512_sub_epi32(c##i##2, q2), r3 = _mm512_sub_epi32(c##i##3, q3);                  \
        if (!rs) {                                                                                             \
            int32_t *o = c + (int64_t)i * ldc;                                                                 \
            _mm512_storeu_si512(o, r0);                                                                        \
            _mm512_storeu_si512(o + 16, r1);                                                                   \
            _mm512_storeu_si512(o + 32, r2);                                                                   \
            _mm512_storeu_si512(o + 48, r3);                                                                   \
        } else {                                                                                               \
            float *o = (float *)c + (int64_t)i * ldc;                                                          \
            const __m512 s = _mm512_set1_ps(rs[2 * i]), z = _mm512_set1_ps(rs[2 * i + 1]);                     \
            G_DEQ(o, r0, 0) G_DEQ(o, r1, 16) G_DEQ(o, r2, 32) G_DEQ(o, r3, 48)                                 \
        }                                                                                                      \
    }
/* y·s·t + z·Σw in load_row's order of operations (no fused multiply-add), so the floats are the same */
#define G_DEQ(o, r, j)                                                                                         \
    _mm512_storeu_ps(o + j, _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(r), s),               \
                                                        _mm512_loadu_ps(ct + j)),                              \
                                          _mm512_mul_ps(z, _mm512_loadu_ps(csum + j))));

/* rows a (6 of them, K apart; the caller pads) times one panel bp -> mr rows of c; meanwhile npf lines of the
 * next panel (pf) are prefetched, one per k step. Separate variables, not an array: GCC kept an array of
 * accumulators on the stack and stored it back every iteration. */
static void gemm_tile(const uint8_t *a, int64_t K, const int8_t *bp, int32_t *c, int64_t ldc,
                      const int32_t *comp, int mr, const int8_t *pf, int64_t npf, const float *rs, const float *ct,
                      const float *csum) {
    const uint8_t *a0 = a, *a1 = a + K, *a2 = a + 2 * K, *a3 = a + 3 * K, *a4 = a + 4 * K, *a5 = a + 5 * K;
    G_ZERO(0) G_ZERO(1) G_ZERO(2) G_ZERO(3) G_ZERO(4) G_ZERO(5)
    for (int64_t k4 = 0; k4 < K / 4; k4++) {
        const int8_t *b = bp + k4 * 256;
        __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64), b2 = _mm512_loadu_si512(b + 128),
                b3 = _mm512_loadu_si512(b + 192), x;
        if (k4 < npf) _mm_prefetch((const char *)(pf + 64 * k4), _MM_HINT_T0);
        G_ROW(0) G_ROW(1) G_ROW(2) G_ROW(3) G_ROW(4) G_ROW(5)
    }
    __m512i q0 = _mm512_loadu_si512(comp), q1 = _mm512_loadu_si512(comp + 16), q2 = _mm512_loadu_si512(comp + 32),
            q3 = _mm512_loadu_si512(comp + 48);
    G_STORE(0) G_STORE(1) G_STORE(2) G_STORE(3) G_STORE(4) G_STORE(5)
}

/* the same for a last tile of 3 rows: half the multiply-adds of a padded tile */
static void gemm_tile3(const uint8_t *a, int64_t K, const int8_t *bp, int32_t *c, int64_t ldc,
                       const int32_t *comp, int mr, const int8_t *pf, int64_t npf, const float *rs,
                       const float *ct, const float *csum) {
    const uint8_t *a0 = a, *a1 = a + K, *a2 = a + 2 * K;
    G_ZERO(0) G_ZERO(1) G_ZERO(2)
    for (int64_t k4 = 0; k4 < K / 4; k4++) {
        const int8_t *b = bp + k4 * 256;
        __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64), b2 = _mm512_loadu_si512(b + 128),
                b3 = _mm512_loadu_si512(b + 192), x;
        if (k4 < npf) _mm_prefetch((const char *)(pf + 64 * k4), _MM_HINT_T0);
        G_ROW(0) G_ROW(1) G_ROW(2)
    }
    __m512i q0 = _mm512_loadu_si512(comp), q1 = _mm512_loadu_si512(comp + 16), q2 = _mm512_loadu_si512(comp + 32),
            q3 = _mm512_loadu_si512(comp + 48);
    G_STORE(0) G_STORE(1) G_STORE(2)
}

/* ... and of at most 2 rows (32 rows = 5 x 6 + 2: as a 3-row tile it took 70% of a full tile's time) */
static void gemm_tile2(const uint8_t *a, int64_t K, const int8_t *bp, int32_t *c, int64_t ldc,
                       const int32_t *comp, int mr, const int8_t *pf, int64_t npf, const float *rs,
                       const float *ct, const float *csum) {
    const uint8_t *a0 = a, *a1 = a + K;
    G_ZERO(0) G_ZERO(1)
    for (int64_t k4 = 0; k4 < K / 4; k4++) {
        const int8_t *b = bp + k4 * 256;
        __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64), b2 = _mm512_loadu_si512(b + 128),
                b3 = _mm512_loadu_si512(b + 192), x;
        if (k4 < npf) _mm_prefetch((const char *)(pf + 64 * k4), _MM_HINT_T0);
        G_ROW(0) G_ROW(1)
    }
    __m512i q0 = _mm512_loadu_si512(comp), q1 = _mm512_loadu_si512(comp + 16), q2 = _mm512_loadu_si512(comp + 32),
            q3 = _mm512_loadu_si512(comp + 48);
    G_STORE(0) G_STORE(1)
}
#endif

/* returns 0 when this build has no VNNI path (the caller uses torch._int_mm then); au: scratch of
 * ceil(min(M, 128) / 6) · 6 · K bytes */
int mc_gemm_s8(const int8_t *A, int64_t M, int64_t K, const int8_t *Bp, int64_t N, const int32_t *comp, int32_t *C,
               uint8_t *au, int nthreads, const float *rs, const float *cs) {
    /* with rs (M, 2) and cs (2, N) given, C is written as float32, dequantized as mc_dequant would: one pass
     * over a big output (the head's 49,152 columns) instead of three */
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
    if (K % 4 || N % G_NR) return 0;
    const int64_t P = N / G_NR, panel = K * G_NR, lines = panel / 64;
    for (int64_t m0 = 0; m0 < M; m0 += 128) {
        const int64_t mb = M - m0 < 128 ? M - m0 : 128, T = (mb + 5) / 6;
        for (int64_t i = 0; i < mb * K; i++) au[i] = (uint8_t)(A[m0 * K + i] ^ 0x80);
        memset(au + mb * K, 0, (T * 6 - mb) * K);
        const int64_t per = (lines + T - 1) / T; /* next-panel lines each tile prefetches */
        /* (panel, tile) units split statically: a thread's units are consecutive, so it runs whole panels
         * (the panel stays in its L1 across tiles, the next one is its own) and at most one panel is shared;
         * split by panels alone, 9 panels (N = 576) left one thread 5 and the other 4 */
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
        for (int64_t u = 0; u < P * T; u++) {
            const int64_t p = u / T, t = u % T;
            const int8_t *bp = Bp + p * panel, *next = p + 1 < P ? bp + panel : NULL;
            int64_t from = t * per, cnt = next == NULL || from >= lines ? 0 : (lines - from < per ? lines - from : per);
            if (cnt > K / 4) cnt = K / 4;
            const int mr = (int)(mb - t * 6 < 6 ? mb - t * 6 : 6);
            void (*tile)(const uint8_t *, int64_t, const int8_t *, int32_t *, int64_t, const int32_t *, int,
                         const int8_t *, int64_t, const float *, const float *, const float *) =
                mr <= 2 ? gemm_tile2 : mr <= 3 ? gemm_tile3 : gemm_tile;
            tile(au + t * 6 * K, K, bp, C + (m0 + t * 6) * N + p * G_NR, N, comp + p * G_NR, mr,
                 cnt ? next + from * 64 : NULL, cnt, rs ? rs + 2 * (m0 + t * 6) : NULL, rs ? cs + p * G_NR : NULL,
                 rs ? cs + N + p * G_NR : NULL);
        }
    }
    return 1;
#else
    (void)A; (void)M; (void)K; (void)Bp; (void)N; (void)comp; (void)C; (void)au; (void)nthreads; (void)rs;
    (void)cs;
    return 0;
#endif
}

/* ---------------------------------------------------------------- a whole fused decode pass (W8A8, VNNI)
 * Every layer of engine._decode_fused in one call: the same kernels in the same order, so the numbers are the
 * same bit for bit. Why: from Python the pass is ~360 calls (12 per layer and the matmuls' wrappers), each
 * paying ~4 µs of argument checks, allocation and ctypes conversion that the second core spends waiting at the
 * next barrier; and in the server the call runs without the GIL (loaded through ctypes.CDLL), so the event
 * loop streams tokens while the step runs instead of between its kernels. */
typedef struct {
    const float *attn_norm, *wo_inv, *mlp_norm, *down_inv;  /* norms with smoothing folded in; (K,) factors */
    const int8_t *qkv_p, *wo_p, *gu_p, *down_p;             /* prepacked panels (gemm_s8) */
    const int32_t *qkv_comp, *wo_comp, *gu_comp, *down_comp;
    const float *qkv_cs, *wo_cs, *gu_cs, *down_cs;          /* (2, N): scale and row sums per output */
} mc_layer_w8a8;

static inline size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* mc_decode_w8a8's workspace, carved in this order: int8 activations, their row scales, int32 matmul output,
 * queries, attention output, attention scratch, the matmul's unsigned rows; off[i] is where piece i starts,
 * the return value the bytes in all (one place for both the sizing and the carving) */
static size_t decode_layout(int64_t M, int64_t D, int64_t H, int64_t Hkv, int64_t hd, int64_t F, int64_t max_pos,
                            int nthreads, size_t off[7]) {
    const int64_t W = (H + 2 * Hkv) * hd, HD = H * hd;
    const int64_t K = D > F ? (D > HD ? D : HD) : (F > HD ? F : HD);     /* widest matmul input */
    const int64_t Y = W > 2 * F ? (W > D ? W : D) : (2 * F > D ? 2 * F : D); /* widest matmul output */
    const int64_t mt = ((M < 128 ? M : 128) + 5) / 6 * 6;
    const size_t sizes[7] = {align64(M * K), align64(M * 2 * 4), align64(M * Y * 4), align64(M * HD * 4),
                             align64(M * HD * 4), align64((size_t)nthreads * (H / Hkv) * (max_pos + 1) * 4),
                             align64(mt * K)};
    size_t at = 0;
    for (int i = 0; i < 7; i++) {
        off[i] = at;
        at += sizes[i];
    }
    return at;
}

/* bytes of workspace mc_decode_w8a8 needs */
int64_t mc_decode_w8a8_work(int64_t M, int64_t D, int64_t H, int64_t Hkv, int64_t hd, int64_t F, int64_t max_pos,
                            int nthreads) {
    size_t off[7];
    return (int64_t)decode_layout(M, D, H, Hkv, hd, F, max_pos, nthreads, off);
}

/* x (M, D) float32, the residual stream, updated in place through all nl layers; row m is at position pos[m]
 * of cache slot slots[m] (slot m when slots is NULL). kc/vc: the whole cache (layers, slots, Hkv, capacity,
 * hd) with strides in elements. Returns 0 when a matmul could not run (no VNNI build), else 1. */
int mc_decode_w8a8(const mc_layer_w8a8 *L, int64_t nl, float *x, int64_t M, int64_t D, int64_t H, int64_t Hkv,
                   int64_t hd, int64_t F, const int64_t *pos, const int64_t *slots, int64_t max_pos, void *kc,
                   void *vc, int ctype, int64_t layer_stride, int64_t row_stride, int64_t head_stride,
                   const float *cos_tab, const float *sin_tab, float q_scale, float eps, int nthreads, void *work) {
    const int64_t W = (H + 2 * Hkv) * hd, G = H / Hkv;
    size_t off[7];
    decode_layout(M, D, H, Hkv, hd, F, max_pos, nthreads, off);
    char *w = (char *)work;
    int8_t *aq = (int8_t *)(w + off[0]);
    float *as = (float *)(w + off[1]);
    int32_t *yi = (int32_t *)(w + off[2]);
    float *q = (float *)(w + off[3]), *att = (float *)(w + off[4]), *scratch = (float *)(w + off[5]);
    uint8_t *au = (uint8_t *)(w + off[6]);
    /* the thread counts kernels.py picks for the same calls */
    const int par = threads_allowed ? nthreads : 1;
#define GT(N, KK) ((N) > 64 && M * (N) * (KK) >= (1 << 20) ? par : 1)
    const int at = M * Hkv > 1 && M * Hkv * (max_pos + 1) >= 1024 ? par : 1;
    const int64_t esz = ctype == 0 ? 4 : ctype == 3 ? 1 : 2;
    for (int64_t li = 0; li < nl; li++) {
        const mc_layer_w8a8 *l = L + li;
        char *kl = (char *)kc + li * layer_stride * esz, *vl = (char *)vc + li * layer_stride * esz;
        mc_norm_quant(x, l->attn_norm, eps, 1, M, D, aq, as);
        if (!mc_gemm_s8(aq, M, D, l->qkv_p, W, l->qkv_comp, yi, au, GT(W, D), NULL, NULL)) return 0;
        mc_qkv_rope_cache(yi, 1, as, l->qkv_cs, M, H, Hkv, hd, cos_tab, sin_tab, pos, q_scale, q, 0, kl, vl, ctype,
                          row_stride, head_stride, slots);
        mc_attend_decode(q, M, H, Hkv, hd, kl, vl, ctype, row_stride, head_stride, pos, att, scratch,
                         G * (max_pos + 1), at, slots);
        mc_norm_quant(att, l->wo_inv, 0.f, 0, M, H * hd, aq, as);
        if (!mc_gemm_s8(aq, M, H * hd, l->wo_p, D, l->wo_comp, yi, au, GT(D, H * hd), NULL, NULL)) return 0;
        mc_dequant(yi, 1, as, l->wo_cs, M, D, x, 1);
        mc_norm_quant(x, l->mlp_norm, eps, 1, M, D, aq, as);
        if (!mc_gemm_s8(aq, M, D, l->gu_p, 2 * F, l->gu_comp, yi, au, GT(2 * F, D), NULL, NULL)) return 0;
        mc_swiglu(yi, 1, as, l->gu_cs, M, F, l->down_inv, aq, as, NULL, 0);
        if (!mc_gemm_s8(aq, M, F, l->down_p, D, l->down_comp, yi, au, GT(D, F), NULL, NULL)) return 0;
        mc_dequant(yi, 1, as, l->down_cs, M, D, x, 1);
    }
#undef GT
    return 1;
}

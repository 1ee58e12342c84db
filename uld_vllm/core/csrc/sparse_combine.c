/* The ULD logits of a confident batch in one call: per row, the plausibility filter's top k
 * (ties included; topk_ties.c), the check that the filter keeps exactly those, the
 * assistant's logit at each kept entry and the combined row: l - alpha * a on the kept
 * entries, -inf (generate) or the target's logit (score) elsewhere.
 *
 * Why one call: at decode sizes the combine's cost was mostly the Python and torch calls
 * around the C (~25 of them, each paid with cold caches after a step that streams the model's
 * weights). One call, reading the logits in their own dtype, leaves one.
 *
 * The assistant's logit at a kept entry is one dot product with its head row, read in place
 * (prefetched a few entries ahead: the rows are scattered over the head). A GEMM against the
 * gathered head rows of the batch's kept tokens (the torch code, uld_vllm/engine/combine.py)
 * computes n x U products for the batch's m kept entries and copies the rows first.
 * bf16 heads: the products are exact in float32 (vdpbf16ps where the CPU has AVX512-BF16,
 * which reads subnormal bf16 inputs as zero: a head has none), summed in float32 and rounded
 * to bf16, as the head's own bf16 GEMM rounds its logits. The sum's order differs from the
 * GEMM's, so an entry may differ from it by one bf16 rounding. float32 heads: a float32 sum in
 * another order than the GEMM's (a few ulp). The selection and the arithmetic around the dot
 * products are the torch code's, bit for bit: `l - alpha * a` rounds twice, as torch computes
 * it (the build turns floating-point contraction off).
 *
 * logits: [n, V], float32 or bf16 (logits_bf16); W: [V, H], float32 or bf16 (w_bf16); h:
 * [n, H] in W's dtype; out: [n, V] float32; kth, row_max: [n] float32. 1 <= k < V < 2^31.
 * Returns 0: out holds the ULD logits. 1: some row keeps more than its top k (its k-th largest
 * logit is above max + log_ratio, or is -inf): out is incomplete, but kth and row_max hold
 * every row's values, from which the caller builds the filter's mask. -1: out of memory. */
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "uld_native.h"

/* entries ahead whose head rows are prefetched: rows are ~1-2 KB apart in memory at random,
 * so the hardware prefetcher cannot guess them */
#define AHEAD 6

static inline void prefetch_row(const void *p, int64_t bytes)
{
    const char *c = (const char *)p;
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

static inline float bf16_to_f32(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to the nearest bf16, ties to even (torch's float -> bfloat16), as a float */
static inline float round_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) u |= 0x00400000u; /* NaN stays NaN */
    else u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float dot_bf16(const uint16_t *w, const uint16_t *x, int64_t H)
{
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= H; i += 64) {
        s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(w + i),
                              (__m512bh)_mm512_loadu_si512(x + i));
        s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_loadu_si512(w + i + 32),
                              (__m512bh)_mm512_loadu_si512(x + i + 32));
    }
    for (; i < H; i += 32) {
        __mmask32 k = H - i >= 32 ? 0xffffffffu : (1u << (H - i)) - 1u;
        s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_maskz_loadu_epi16(k, w + i),
                              (__m512bh)_mm512_maskz_loadu_epi16(k, x + i));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#else
    /* 16 independent sums: vectorisable without reassociating any one of them */
    float s[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= H; i += 16)
        for (int l = 0; l < 16; l++)
            s[l] += bf16_to_f32(w[i + l]) * bf16_to_f32(x[i + l]);
    for (; i < H; i++) s[i & 15] += bf16_to_f32(w[i]) * bf16_to_f32(x[i]);
    float t = 0.0f;
    for (int l = 0; l < 16; l++) t += s[l];
    return t;
#endif
}

static inline float dot_f32(const float *w, const float *x, int64_t H)
{
#if defined(__AVX512F__)
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= H; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), s1);
    }
    for (; i < H; i += 16) {
        __mmask16 k = H - i >= 16 ? 0xffffu : (__mmask16)((1u << (H - i)) - 1u);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, w + i), _mm512_maskz_loadu_ps(k, x + i),
                             s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#else
    float s[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= H; i += 16)
        for (int l = 0; l < 16; l++) s[l] += w[i + l] * x[i + l];
    for (; i < H; i++) s[i & 15] += w[i] * x[i];
    float t = 0.0f;
    for (int l = 0; l < 16; l++) t += s[l];
    return t;
#endif
}

int64_t uld_sparse_combine(float *out, const void *logits, int logits_bf16, int64_t n,
                           int64_t V, int64_t k, float log_ratio, const void *W, int w_bf16,
                           const void *h, int64_t H, float alpha, int fill, float *kth,
                           float *row_max)
{
    float *x32 = logits_bf16 ? malloc((size_t)V * sizeof(float)) : NULL;
    float *gm = malloc((size_t)(4 * k) * sizeof(float));
    float *cv = malloc((size_t)V * sizeof(float));
    int32_t *ci = malloc((size_t)V * sizeof(int32_t));
    if ((logits_bf16 && !x32) || !gm || !cv || !ci) {
        free(x32); free(gm); free(cv); free(ci);
        return -1;
    }
    const int64_t wbytes = H * (w_bf16 ? 2 : 4);
    int declined = 0;
    for (int64_t r = 0; r < n; r++) {
        const float *row;
        if (logits_bf16) {
            const uint16_t *src = (const uint16_t *)logits + r * V;
            for (int64_t i = 0; i < V; i++) x32[i] = bf16_to_f32(src[i]);
            row = x32;
        } else {
            row = (const float *)logits + r * V;
        }
        int64_t c = uld_row_top_k(row, V, k, gm, cv, ci, &kth[r], &row_max[r]);
        const float kv = kth[r];
        if (declined) continue; /* the bounds of every row are still needed */
        /* float arithmetic, as torch's `row_max + math.log(ratio)` on a float32 tensor */
        const float limit = row_max[r] + log_ratio;
        if (!(kv <= limit && kv > -INFINITY)) {
            declined = 1;
            continue;
        }
        float *o = out + r * V;
        if (fill) for (int64_t i = 0; i < V; i++) o[i] = -INFINITY;
        else memcpy(o, row, (size_t)V * sizeof(float));
        int64_t m = 0; /* the kept entries, moved to the front of cv/ci */
        for (int64_t j = 0; j < c; j++)
            if (cv[j] >= kv) { cv[m] = cv[j]; ci[m] = ci[j]; m++; }
        const char *wb = (const char *)W;
        for (int64_t e = 0; e < m && e < AHEAD; e++)
            prefetch_row(wb + ci[e] * wbytes, wbytes);
        for (int64_t e = 0; e < m; e++) {
            if (e + AHEAD < m) prefetch_row(wb + ci[e + AHEAD] * wbytes, wbytes);
            float a;
            if (w_bf16)
                a = round_to_bf16(dot_bf16((const uint16_t *)W + ci[e] * H,
                                           (const uint16_t *)h + r * H, H));
            else
                a = dot_f32((const float *)W + ci[e] * H, (const float *)h + r * H, H);
            /* two roundings, as torch's `l - alpha * a` (no contraction in this build) */
            float scaled = alpha * a;
            o[ci[e]] = cv[e] - scaled;
        }
    }
    free(x32); free(gm); free(cv); free(ci);
    return declined;
}

/* The assistant's logit at each kept entry: a[e] = W[cols[e]] . h[rows[e]], one dot product
 * per (row, column) the filter keeps, straight from the LM head's rows.
 *
 * The torch code gathers the head rows of the batch's kept columns (a memory-bound copy) and
 * multiplies them with all n rows, computing n x U products for the batch's m kept entries.
 * Here each entry reads its head row in place (prefetched a few entries ahead: the rows are
 * scattered over the head) and computes only its own product. On this project's Zen 5 core,
 * bf16, caches cold: batch 1 (~500 entries) ~0.06 ms a call against ~0.2 ms, batch 32 ~0.4
 * against ~0.9 ms (benchmarks/README.md, "Run J").
 *
 * bf16 heads: the products are exact in float32 (vdpbf16ps where the CPU has AVX512-BF16,
 * which reads subnormal bf16 inputs as zero: a head has none), summed in float32 and rounded
 * to bf16, as the head's own bf16 GEMM rounds its logits. The sum's order differs from the
 * GEMM's, so an entry may differ from it by one bf16 rounding. float32 heads: a float32 sum in
 * another order than the GEMM's (a few ulp). */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

static float dot_bf16(const uint16_t *w, const uint16_t *x, int64_t H)
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
        for (int l = 0; l < 16; l++) s[l] += bf16_to_f32(w[i + l]) * bf16_to_f32(x[i + l]);
    for (; i < H; i++) s[i & 15] += bf16_to_f32(w[i]) * bf16_to_f32(x[i]);
    float t = 0.0f;
    for (int l = 0; l < 16; l++) t += s[l];
    return t;
#endif
}

static float dot_f32(const float *w, const float *x, int64_t H)
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

/* W: [V, H] bf16 (as uint16), h: [n, H] bf16; a: [m] float32 (bf16 values) */
void uld_head_at_bf16(float *a, const uint16_t *W, const uint16_t *h, int64_t H, int64_t m,
                      const int64_t *rows, const int64_t *cols)
{
    for (int64_t e = 0; e < m && e < AHEAD; e++) prefetch_row(W + cols[e] * H, H * 2);
    for (int64_t e = 0; e < m; e++) {
        if (e + AHEAD < m) prefetch_row(W + cols[e + AHEAD] * H, H * 2);
        a[e] = round_to_bf16(dot_bf16(W + cols[e] * H, h + rows[e] * H, H));
    }
}

/* W: [V, H] float32, h: [n, H] float32; a: [m] float32 */
void uld_head_at_f32(float *a, const float *W, const float *h, int64_t H, int64_t m,
                     const int64_t *rows, const int64_t *cols)
{
    for (int64_t e = 0; e < m && e < AHEAD; e++) prefetch_row(W + cols[e] * H, H * 4);
    for (int64_t e = 0; e < m; e++) {
        if (e + AHEAD < m) prefetch_row(W + cols[e + AHEAD] * H, H * 4);
        a[e] = dot_f32(W + cols[e] * H, h + rows[e] * H, H);
    }
}

/* The k largest values of each row of a float32 [n, V] block, ties with the k-th included:
 * the selection of the plausibility filter
 * (uld_vllm/core/topk.py documents the method; this is its one-pass CPU version).
 *
 * Per row: a lower bound of the k-th largest value from the k-th largest of G = 4k strided
 * group maxima (one vectorised pass), every value >= the bound collected in a second pass
 * (AVX-512 compress where the compiler targets it), the k-th largest of those few, and the
 * entries >= it written out in column order. Both k-th values come from a bisection over the
 * floats' order-preserving integer keys (kth_largest).
 *
 * Plain C with no torch headers, so that it builds in about a second with the system's cc and
 * loads through ctypes (uld_vllm/core/native.py). NaN is not supported (vLLM's logits have
 * none); -inf is: a row with fewer than k finite values has a k-th value of -inf and lists
 * its whole row, as (x >= kth) does. */
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "uld_native.h"

/* floats as int32 keys in the same order (NaN aside): bisection over keys finds a value */
static inline int32_t key_of(float f)
{
    int32_t b;
    memcpy(&b, &f, sizeof b);
    return b ^ ((b >> 31) & 0x7fffffff);
}

static inline float float_of(int32_t key)
{
    int32_t b = key ^ ((key >> 31) & 0x7fffffff);
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static int64_t count_ge(const float *a, int64_t m, float t)
{
    int64_t c = 0;
    for (int64_t i = 0; i < m; i++) c += a[i] >= t;
    return c;
}

/* the k-th largest (1 <= k <= m) of a[0..m): the largest t with k values >= t, by bisection
 * over the keys between the minimum and the maximum. At most 32 counting passes, each a
 * vectorised compare over m values: cheaper than a quickselect's data-dependent swaps on the
 * few thousand values it sees here, and ties cost nothing extra. */
static float kth_largest(const float *a, int64_t m, int64_t k)
{
    float mn = a[0], mx = a[0];
    for (int64_t i = 1; i < m; i++) {
        mn = a[i] < mn ? a[i] : mn;
        mx = a[i] > mx ? a[i] : mx;
    }
    int64_t lo = key_of(mn), hi = key_of(mx); /* count_ge(float_of(lo)) = m >= k */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo + 1) / 2;
        if (count_ge(a, m, float_of((int32_t)mid)) >= k) lo = mid;
        else hi = mid - 1;
    }
    return float_of((int32_t)lo);
}

static void group_maxima(const float *row, int64_t G, int64_t s, float *gm)
{
    memcpy(gm, row, (size_t)G * sizeof(float));
    for (int64_t j = 1; j < s; j++) {
        const float *r = row + j * G;
        for (int64_t g = 0; g < G; g++) gm[g] = r[g] > gm[g] ? r[g] : gm[g];
    }
}

/* values >= bound and their columns; returns how many */
static int64_t collect(const float *row, int64_t V, float bound, float *cv, int32_t *ci)
{
    int64_t c = 0, i = 0;
#if defined(__AVX512F__)
    const __m512 b = _mm512_set1_ps(bound);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + 16 <= V; i += 16) {
        __m512 v = _mm512_loadu_ps(row + i);
        __mmask16 m = _mm512_cmp_ps_mask(v, b, _CMP_GE_OQ);
        if (m) {
            _mm512_mask_compressstoreu_ps(cv + c, m, v);
            _mm512_mask_compressstoreu_epi32(ci + c, m, idx);
            c += __builtin_popcount((unsigned)m);
        }
        idx = _mm512_add_epi32(idx, step);
    }
#endif
    for (; i < V; i++)
        if (row[i] >= bound) { cv[c] = row[i]; ci[c] = (int32_t)i; c++; }
    return c;
}

int64_t uld_row_top_k(const float *row, int64_t V, int64_t k, float *gm, float *cv,
                      int32_t *ci, float *kth, float *row_max)
{
    const int64_t G = 4 * k;
    const int64_t s = V / G; /* values per group; s < 2: no bound, the whole row is searched */
    float bound = -INFINITY, mx = -INFINITY;
    if (s >= 2) {
        group_maxima(row, G, s, gm);
        for (int64_t g = 0; g < G; g++) mx = gm[g] > mx ? gm[g] : mx;
        for (int64_t i = s * G; i < V; i++) mx = row[i] > mx ? row[i] : mx;
        /* k distinct entries are >= the k-th largest group maximum: a lower bound */
        bound = kth_largest(gm, G, k);
    } else {
        for (int64_t i = 0; i < V; i++) mx = row[i] > mx ? row[i] : mx;
    }
    int64_t c = collect(row, V, bound, cv, ci);
    *kth = kth_largest(cv, c, k);
    *row_max = mx;
    return c;
}

/* x: [n, V] row-major; 1 <= k < V < 2^31. Outputs per row: kth[n], row_max[n], counts[n];
 * per listed entry, row-major and in column order within a row: rows, cols, vals (room for
 * `capacity` entries). Returns the number of entries, which may exceed `capacity`: then
 * nothing past it was written and the caller runs again with room for them all. -1: out of
 * memory. */
int64_t uld_top_k_with_ties_f32(const float *x, int64_t n, int64_t V, int64_t k,
                                int64_t capacity, float *kth, float *row_max, int64_t *counts,
                                int64_t *rows, int64_t *cols, float *vals)
{
    float *gm = malloc((size_t)(4 * k) * sizeof(float));
    float *cv = malloc((size_t)V * sizeof(float));
    int32_t *ci = malloc((size_t)V * sizeof(int32_t));
    if (!gm || !cv || !ci) { free(gm); free(cv); free(ci); return -1; }
    int64_t total = 0;
    for (int64_t r = 0; r < n; r++) {
        int64_t c = uld_row_top_k(x + r * V, V, k, gm, cv, ci, &kth[r], &row_max[r]);
        const float kv = kth[r];
        int64_t cnt = 0;
        for (int64_t j = 0; j < c; j++) {
            if (cv[j] < kv) continue;
            if (total + cnt < capacity) {
                rows[total + cnt] = r;
                cols[total + cnt] = ci[j];
                vals[total + cnt] = cv[j];
            }
            cnt++;
        }
        counts[r] = cnt;
        total += cnt;
    }
    free(gm); free(cv); free(ci);
    return total;
}

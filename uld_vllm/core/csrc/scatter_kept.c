/* The sparse head's last step: ULD logits written into a [n, V] float32 block from the kept
 * entries of top_k_with_ties and the assistant's logit at each of them (head_at.c), in one
 * pass: out[r, c] = l[r, c] - alpha * a[e], -inf elsewhere (generate) or the target's logit
 * elsewhere (score: the caller passes a copy of the target's logits).
 *
 * torch spends five ops and their temporaries on this (a fill, a gather, a scale, a
 * subtraction, an index_put). The arithmetic is the same two roundings as torch's
 * `l - alpha * a` (the build turns floating-point contraction off: no fused multiply-add). */
#include <stdint.h>
#include <math.h>

void uld_scatter_kept_f32(float *out, int64_t n, int64_t V, int fill, int64_t total,
                          const int64_t *rows, const int64_t *cols, const float *vals,
                          const float *a, float alpha)
{
    if (fill)
        for (int64_t i = 0; i < n * V; i++) out[i] = -INFINITY;
    for (int64_t e = 0; e < total; e++) {
        float scaled = alpha * a[e];
        out[rows[e] * V + cols[e]] = vals[e] - scaled;
    }
}

/* What the C files of uld_vllm/core/csrc share: one row's kept-token selection (topk_ties.c),
 * which sparse_combine.c runs per row too. Internal to the library: only the uld_* entry
 * points of each file are called from Python (uld_vllm/core/native.py). */
#ifndef ULD_NATIVE_H
#define ULD_NATIVE_H

#include <stdint.h>

/* One row's k largest values, ties with the k-th included (topk_ties.c documents the
 * method). Scratch: gm (4k floats), cv and ci (V each). Writes the k-th largest value and
 * the maximum; returns c, the number of candidates left in cv/ci (values and columns, in
 * column order): the row's kept entries are those with cv[j] >= *kth. */
int64_t uld_row_top_k(const float *row, int64_t V, int64_t k, float *gm, float *cv,
                      int32_t *ci, float *kth, float *row_max);

#endif

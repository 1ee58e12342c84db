"""The k largest values of wide rows (a batch of vocabulary-sized logits), ties included,
without a full ``torch.topk``.

The plausibility filter of a confident model keeps each row's ``k = floor(r * V)`` largest
logits and whatever ties with the k-th (k = 491 of 49152 for SmolLM2 at r = 0.01).
``torch.topk`` on CPU pays a partial sort per row on top of its scan: 5.6 ms for
``[32, 49152]`` on this project's CPU, plus a second full pass to find the ties, 5 % of a
ULD decode step at batch 32. bf16 logits tie often (few distinct values), so the ties are
the common case there, not an exception.

``top_k_with_ties`` bounds the k-th largest value from below first, then selects among the
few values above the bound:

1. split each row into ``G`` disjoint groups (strided: group ``g`` holds ``x[g + j G]``, so
   the group maxima are an elementwise max of ``V // G`` contiguous slices) and take the
   k-th largest group maximum, ``bound``. The k groups above it hold k distinct values
   ``>= bound``, so ``bound <= kth_largest(row)``: every value ``>=`` the k-th is ``>= bound``;
2. collect the values ``>= bound`` (about 1.2 k a row with ``G = 4k`` on real logits) from
   the groups whose maximum reaches the bound (k, a few more where group maxima tie with it,
   as bf16 logits do) and the few values after the last whole group; only when more than 2k
   groups reach it, from the whole row;
3. pack them into a ``-inf``-padded ``[n, width]`` block, take its k-th largest value, and
   return every block entry ``>=`` it: all of the row's, since they are all in the block.

On CPU the same method runs as one C function (``csrc/topk_ties.c``, built on first use by
``uld_vllm.core.native``): a row at a time, two passes over the row and two small
bisections, where the torch version needs ~20 ops over the batch (``[32, 49152]``: 0.4-0.7
against 3.6 ms on this project's Zen 5 core). The torch version runs elsewhere, and where no
C compiler is found.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from uld_vllm.core import native

# groups per kept value: more groups tighten the bound (fewer candidates) but make the first
# selection wider; 3-8 measured within 10 % of each other on [32, 49152], k = 491
GROUPS_PER_K = 4


class TopKWithTies(NamedTuple):
    """Per row: the k-th largest value and the maximum (``[n, 1]``); then every entry
    ``>=`` its row's k-th largest value, as flat row-major ``rows``/``cols``/``values``
    (k a row, more where values tie with the k-th; rows in order, columns in no particular
    order within a row) and ``counts`` (``[n]``)."""

    kth: torch.Tensor
    row_max: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor


def top_k_with_ties(x: torch.Tensor, k: int) -> TopKWithTies:
    """The k largest values of each row of ``x`` ``[n, V]`` and every value tied with the
    k-th (``1 <= k < V``).

    ``kth`` equals ``torch.topk(x, k).values[:, -1:]``, and ``(rows, cols)`` lists exactly the
    entries of ``(x >= kth).nonzero()``, row by row, in no particular order within a row;
    ``values`` are those entries of ``x``, bit for bit. A row with fewer than k values above
    ``-inf`` has ``kth = -inf`` and lists its whole row. NaN is not supported (vLLM's logits
    have none)."""
    n, V = x.shape
    if not 1 <= k < V:
        raise ValueError(f"top_k_with_ties needs 1 <= k < V, got k={k}, V={V}")
    if x.device.type == "cpu" and x.is_floating_point() and V < 2**31:
        lib = native.library()
        if lib is not None:
            return _native(lib, x, k)
    G = GROUPS_PER_K * k
    s = V // G  # values per group; the V - s * G values after the groups stay out of the bound
    if s < 2 or n == 1:  # a bound would not leave much out, or cost more ops than it saves
        top = torch.topk(x, k, dim=-1, sorted=False).values
        kth = top.amin(dim=-1, keepdim=True)
        rows, cols = (x >= kth).nonzero(as_tuple=True)
        # the row's maximum is among its top k: no second pass over the row
        return TopKWithTies(kth, top.amax(dim=-1, keepdim=True), rows, cols, x[rows, cols],
                            torch.bincount(rows, minlength=n))
    grouped = x[:, :s * G].reshape(n, s, G)
    group_max = grouped.amax(dim=1)
    top_groups = torch.topk(group_max, k, dim=-1, sorted=False)
    bound = top_groups.values.amin(dim=-1, keepdim=True)
    # the groups reaching the bound: k, or more where group maxima tie with it (bf16)
    m = int((group_max >= bound).sum(dim=-1).max())
    if m <= 2 * k:
        # every value >= bound is in the m largest groups of its row or after the last group:
        # search those (about 1 / GROUPS_PER_K of the row), not the whole row
        if m > k:
            top_groups = torch.topk(group_max, m, dim=-1, sorted=False)
        picked = grouped.gather(2, top_groups.indices.unsqueeze(1).expand(n, s, m))
        pool = torch.cat([picked.reshape(n, s * m), x[:, s * G:]], dim=1)
        rows, pos = (pool >= bound).nonzero(as_tuple=True)
        # pool position -> column: entry (j, i) of picked is column j * G + (i-th group);
        # the values after the groups follow at column s * G on
        group_col = top_groups.indices[rows, pos % m] + (pos // m) * G
        cols = torch.where(pos < s * m, group_col, pos - s * m + s * G)
    else:  # many groups tied at the bound: the whole row
        pool = x
        rows, pos = (pool >= bound).nonzero(as_tuple=True)
        cols = pos
    counts = torch.bincount(rows, minlength=n)
    width = int(counts.max())
    # each candidate's slot in its row of the block: its rank among that row's candidates
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=x.device) - start[rows]
    block = torch.full((n, width), float("-inf"), dtype=x.dtype, device=x.device)
    block[rows, slot] = pool[rows, pos]
    block_cols = torch.full((n, width), V, dtype=torch.long, device=x.device)
    block_cols[rows, slot] = cols
    kth = torch.topk(block, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    # a pad (-inf) is >= kth only where kth is -inf; its column V marks it
    r, j = ((block >= kth) & (block_cols < V)).nonzero(as_tuple=True)
    return TopKWithTies(kth, block.amax(dim=-1, keepdim=True), r, block_cols[r, j], block[r, j],
                        torch.bincount(r, minlength=n))


def _native(lib: ctypes.CDLL, x: torch.Tensor, k: int) -> TopKWithTies:
    n, V = x.shape
    x32 = x.float().contiguous()  # exact for bf16/fp16; the values go back to x's dtype
    kth = torch.empty((n, 1), dtype=torch.float32)
    row_max = torch.empty((n, 1), dtype=torch.float32)
    counts = torch.empty(n, dtype=torch.int64)
    capacity = n * (k + k // 4 + 16)  # room for moderate ties; more takes a second call
    while True:
        rows = torch.empty(capacity, dtype=torch.int64)
        cols = torch.empty(capacity, dtype=torch.int64)
        vals = torch.empty(capacity, dtype=torch.float32)
        # a named range: the profiler sees no op inside a ctypes call
        with torch.profiler.record_function("uld::top_k_with_ties (C)"):
            total = lib.uld_top_k_with_ties_f32(
                x32.data_ptr(), n, V, k, capacity, kth.data_ptr(), row_max.data_ptr(),
                counts.data_ptr(), rows.data_ptr(), cols.data_ptr(), vals.data_ptr())
        if total < 0:
            raise MemoryError("top_k_with_ties: the C selection could not allocate its scratch "
                              "buffers (a few V-sized arrays); free memory, or set "
                              "ULD_NATIVE=0 to run the torch code")
        if total <= capacity:
            break
        capacity = total
    return TopKWithTies(kth.to(x.dtype), row_max.to(x.dtype), rows[:total], cols[:total],
                        vals[:total].to(x.dtype), counts)

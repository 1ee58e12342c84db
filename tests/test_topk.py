"""exact_top_k: the same elements as torch.topk, or None exactly when the k-th place ties."""

import math

import pytest
import torch

from uld_vllm.core.topk import GROUPS_PER_K, exact_top_k


def as_sets(vals, idx):
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), vals.gather(1, order)


def tied_at_kth(x, k):
    kth = torch.topk(x, k, dim=-1).values[:, -1:]
    return bool(((x >= kth).sum(dim=-1) > k).any())


def check_against_topk(x, k):
    got = exact_top_k(x, k)
    if tied_at_kth(x, k):
        assert got is None
        return
    assert got is not None
    ref = torch.topk(x, k, dim=-1)
    gi, gv = as_sets(got[0], got[1])
    ri, rv = as_sets(ref.values, ref.indices)
    assert torch.equal(gi, ri)
    assert torch.equal(gv, rv)  # the very elements, bit for bit
    assert gv.dtype == x.dtype


# V values: divisible into groups or not (a tail outside the groups), a few groups, too few
# for the bound (one plain top-k); k: 1, the filter's floor(0.01 V), large
@pytest.mark.parametrize("V", [7, 100, 1271, 4099, 49152])
@pytest.mark.parametrize("ratio", [None, 0.01, 0.1, 0.3])
@pytest.mark.parametrize("rows", [1, 5])
def test_same_elements_as_torch_topk(V, ratio, rows):
    g = torch.Generator().manual_seed(V + rows)
    x = torch.randn(rows, V, generator=g) * 4
    k = 1 if ratio is None else max(1, math.floor(ratio * V))
    check_against_topk(x, k)


def test_peaky_logits_of_a_head():
    # a confident model: a few large logits, the bulk near each other
    g = torch.Generator().manual_seed(1)
    W = torch.randn(20000, 64, generator=g)
    h = torch.randn(9, 64, generator=g) * 3
    check_against_topk(h @ W.T, 200)


def test_largest_values_in_the_tail_outside_the_groups():
    V, k = 1013, 10
    s = V // (GROUPS_PER_K * k)
    x = torch.randn(3, V)
    tail = s * GROUPS_PER_K * k
    assert tail < V
    x[:, tail:] = 100 + torch.arange(V - tail, dtype=x.dtype)  # all in the tail
    check_against_topk(x, k)
    got = exact_top_k(x, k)
    assert bool((got[1] >= tail).sum() == 3 * min(k, V - tail))


def test_a_tie_at_the_kth_place_returns_none_and_other_ties_do_not():
    x = torch.randn(4, 3000) * 0.1
    k = 30
    x[2, :k + 1] = 5.0  # k + 1 values equal and largest: tied at the k-th place
    assert exact_top_k(x, k) is None
    x[2, :k + 1] = torch.arange(k + 1, dtype=x.dtype) + 5.0
    x[2, :3] = 50.0  # ties among the top, above the k-th place: one set of k
    check_against_topk(x, k)
    assert exact_top_k(x, k) is not None


def test_group_maxima_tied_at_the_bound():
    # every group's maximum is the same value: the bound ties across all groups, and the
    # row's top k are that value's k copies plus whatever lies above it
    k, V = 5, 400
    G = GROUPS_PER_K * k
    x = torch.randn(3, V) - 10
    x[:, :G] = 1.0  # one copy per group (groups are strided: group g holds x[g + j G])
    assert exact_top_k(x, k) is None  # G copies of the k-th value: tied
    x[1, G + 3] = 2.0
    x[1, G + 8] = 3.0
    x[1, :G] = torch.arange(G, dtype=x.dtype) / G  # distinct group maxima below the two
    x[0] = torch.randn(V)
    x[2] = torch.randn(V)
    check_against_topk(x, k)
    assert exact_top_k(x, k) is not None


def test_group_maxima_tied_at_the_bound_without_a_tie_in_the_row():
    # the k-th largest group maximum is shared by many groups (the search then covers the
    # whole row), while the row's k-th value is unique: the answer is still exact
    k, V = 5, 400
    G = GROUPS_PER_K * k
    x = torch.randn(2, V) * 0.01
    x[:, :G] = 1.0                   # every group's maximum is 1.0 ...
    x[0, 0], x[0, G] = 13.0, 12.5    # ... but group 0 holds the two largest values
    x[0, 1], x[0, 2], x[0, 3] = 12.0, 11.0, 10.0
    x[1] = torch.randn(V)
    got = exact_top_k(x, k)
    assert got is not None
    assert sorted(got[1][0].tolist()) == [0, 1, 2, 3, G]
    check_against_topk(x, k)


@pytest.mark.parametrize("finite", [0, 3, 12, 40])
def test_minus_infinity_entries(finite):
    # masked logits (a logits processor's bans): fewer than k finite values tie at -inf
    k = 12
    x = torch.full((3, 2000), float("-inf"))
    x[:, :finite] = torch.randn(3, finite)
    x[1] = torch.randn(2000)  # one ordinary row among them
    check_against_topk(x, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rows_tie_often(dtype):
    # bf16 logits take few distinct values: ties at the k-th place are common and must be seen
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = (torch.randn(6, 5003, generator=g) * 3).to(dtype)
        check_against_topk(x, 50)


def test_bad_k():
    with pytest.raises(ValueError, match="1 <= k < V"):
        exact_top_k(torch.zeros(2, 5), 5)
    with pytest.raises(ValueError, match="1 <= k < V"):
        exact_top_k(torch.zeros(2, 5), 0)

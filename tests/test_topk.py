"""top_k_with_ties: the k-th value of torch.topk and exactly the entries >= it, ties included.

Every test runs three times: on the C selection (built by uld_vllm.core.native; it must build
here, as CI's machine has a C compiler), on the same C built without -march=native (no AVX-512
code), and on the torch code it falls back to (conftest's use_c_build)."""

import math

import pytest
import torch

from uld_vllm.core import native, topk
from uld_vllm.core.topk import GROUPS_PER_K, top_k_with_ties

_C_CALLS: list = []  # one entry per call of the C selection in the current test


@pytest.fixture(autouse=True, params=["native", "portable", "torch"])
def implementation(request, monkeypatch, use_c_build):
    monkeypatch.setenv("ULD_NATIVE", "0")
    if request.param != "torch":
        use_c_build(request.param)
    _C_CALLS.clear()
    real = topk._native
    monkeypatch.setattr(topk, "_native", lambda *a: _C_CALLS.append(1) or real(*a))
    return request.param


def check_against_torch(x, k):
    calls = len(_C_CALLS)
    got = top_k_with_ties(x, k)
    assert (len(_C_CALLS) > calls) == (native.library() is not None)  # the C code ran, or not
    kth = torch.topk(x, k, dim=-1).values[:, -1:]
    assert torch.equal(got.kth, kth)
    assert torch.equal(got.row_max, x.amax(dim=-1, keepdim=True))
    rows, cols = (x >= kth).nonzero(as_tuple=True)
    assert torch.equal(got.rows, rows)  # row by row
    order = torch.argsort(got.rows * x.shape[1] + got.cols)  # columns: any order in a row
    assert torch.equal(got.cols[order], cols)
    assert torch.equal(got.values, x[got.rows, got.cols])  # the very elements, bit for bit
    assert got.values.dtype == x.dtype
    assert torch.equal(got.counts, (x >= kth).sum(dim=-1))
    return got


# V values: divisible into groups or not (values after the last group), a few groups, too
# few for the bound (one plain top-k); k: 1, the filter's floor(0.01 V), large
@pytest.mark.parametrize("V", [7, 100, 1271, 4099, 49152])
@pytest.mark.parametrize("ratio", [None, 0.01, 0.1, 0.3])
@pytest.mark.parametrize("rows", [1, 5])
def test_same_as_torch_topk(V, ratio, rows):
    g = torch.Generator().manual_seed(V + rows)
    x = torch.randn(rows, V, generator=g) * 4
    k = 1 if ratio is None else max(1, math.floor(ratio * V))
    got = check_against_torch(x, k)
    assert bool((got.counts == k).all())  # random floats: no ties


def test_peaky_logits_of_a_head():
    # a confident model: a few large logits, the bulk near each other
    g = torch.Generator().manual_seed(1)
    W = torch.randn(20000, 64, generator=g)
    h = torch.randn(9, 64, generator=g) * 3
    check_against_torch(h @ W.T, 200)


def test_largest_values_after_the_last_group():
    V, k = 1013, 10
    s = V // (GROUPS_PER_K * k)
    x = torch.randn(3, V)
    tail = s * GROUPS_PER_K * k
    assert tail < V
    x[:, tail:] = 100 + torch.arange(V - tail, dtype=x.dtype)  # all after the groups
    got = check_against_torch(x, k)
    assert bool((got.cols >= tail).sum() == 3 * min(k, V - tail))


def test_ties_at_the_kth_place_are_all_listed():
    x = torch.randn(4, 3000) * 0.1
    k = 30
    x[2, :k + 4] = 5.0  # k + 4 equal largest values: all of them are kept
    x[1, :3] = 50.0     # ties above the k-th place: one set of k
    got = check_against_torch(x, k)
    assert got.counts.tolist() == [k, k, k + 4, k]


def test_group_maxima_tied_at_the_bound():
    # every group's maximum is the same value: the bound ties across all groups (the search
    # then covers the whole row) while the row's k-th value may or may not tie
    k, V = 5, 400
    G = GROUPS_PER_K * k
    x = torch.randn(3, V) * 0.01
    x[:, :G] = 1.0                   # every group's maximum is 1.0 ...
    x[0, 0], x[0, G] = 13.0, 12.5    # ... but in row 0 group 0 holds the two largest values
    x[0, 1], x[0, 2], x[0, 3] = 12.0, 11.0, 10.0
    x[2, :7] = torch.tensor([10.0, 9.0, 8.0, 7.0, 5.0, 5.0, 5.0])  # 3 groups tied at the bound
    got = check_against_torch(x, k)
    assert sorted(got.cols[got.rows == 0].tolist()) == [0, 1, 2, 3, G]
    assert int(got.counts[1]) == G  # row 1: G copies of its k-th value
    assert sorted(got.cols[got.rows == 2].tolist()) == list(range(7))
    x[:2] = torch.randn(2, V)  # only the few groups tied at the bound: no whole-row search
    check_against_torch(x, k)


@pytest.mark.parametrize("finite", [0, 3, 12, 40])
def test_minus_infinity_entries(finite):
    # masked logits (a logits processor's bans): fewer than k finite values -> kth is -inf
    k = 12
    x = torch.full((3, 2000), float("-inf"))
    x[:, :finite] = torch.randn(3, finite)
    x[1] = torch.randn(2000)  # one ordinary row among them
    check_against_torch(x, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rows_tie_often(dtype):
    # bf16 logits take few distinct values: ties at the k-th place are the common case
    g = torch.Generator().manual_seed(3)
    tied = 0
    for _ in range(5):
        x = (torch.randn(6, 5003, generator=g) * 3).to(dtype)
        tied += int((check_against_torch(x, 50).counts > 50).sum())
    assert tied > 0


def test_bad_k():
    with pytest.raises(ValueError, match="1 <= k < V"):
        top_k_with_ties(torch.zeros(2, 5), 5)
    with pytest.raises(ValueError, match="1 <= k < V"):
        top_k_with_ties(torch.zeros(2, 5), 0)


def test_many_ties_need_more_room_than_first_given():
    # whole rows tied (and a row of -inf): far more entries than the C selection's first
    # allocation (about 1.25 k a row), so it runs again with room for all of them
    x = torch.zeros(3, 1000)
    x[1] = torch.randn(1000)
    x[2] = float("-inf")
    got = check_against_torch(x, 10)
    assert got.counts.tolist() == [1000, 10, 1000]


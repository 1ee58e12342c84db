"""The engine's combine step: sparse assistant-head paths equal uld_logits."""

from types import SimpleNamespace

import pytest
import torch

from uld_vllm.core.logits import plausibility_mask, uld_logits
from uld_vllm.core.topk import top_k_with_ties
from uld_vllm.engine import combine
from uld_vllm.engine.combine import UldCombiner, _head_at, _kept_logits, _mask_from_top_k


def combiner(mode, ratio=0.01, alpha=0.8, frac=1.0):
    return UldCombiner(SimpleNamespace(alpha=alpha, filter_ratio=ratio, mode=mode,
                                       backend="auto"), sparse_fraction=frac)


def head(V=1271, H=64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, H, generator=g) * scale, torch.randn(7, H, generator=g), \
        torch.randn(7, H, generator=g)


def close(got, want):
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = ~torch.isinf(want)
    torch.testing.assert_close(got[fin], want[fin], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", ["generate", "score"])
@pytest.mark.parametrize("alpha", [0.8, 0.0])
@pytest.mark.parametrize("rows", [7, 1])  # one row takes its own shortcut (no union)
def test_top_k_rows_path_equals_uld_logits_on_confident_rows(mode, alpha, rows):
    W, h_t, h_a = head(scale=3.0)  # peaky rows: kept set == top-k
    h_t, h_a = h_t[:rows], h_a[:rows]
    lt, la = h_t @ W.T, h_a @ W.T
    c = combiner(mode, alpha=alpha)
    out = c._top_k_rows(lt, W, h_a)
    assert out is not None
    close(out, uld_logits(lt, la, alpha=alpha, filter_ratio=0.01, mode=mode))


def test_top_k_rows_path_declines_flat_rows():
    W, h_t, h_a = head(scale=0.01)  # flat rows: the ratio test keeps more than top-k
    assert combiner("generate")._top_k_rows(h_t @ W.T, W, h_a) is None


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_top_k_rows_path_keeps_ties_at_the_kth_place(mode):
    W, h_t, h_a = head(scale=3.0)
    lt = (h_t[:3] @ W.T).bfloat16().float()  # bf16 logits: few distinct values
    top = lt[1].max()
    lt[1, :5] = top + 10  # 5 far above the rest, then 20 equal values: k = 12 ties at 20
    lt[1, 5:25] = top
    la = h_a[:3] @ W.T
    keep = plausibility_mask(lt, 0.01)
    assert int(keep[1].sum()) >= 25  # the whole tie is kept
    out = combiner(mode)._top_k_rows(lt, W, h_a[:3])
    assert out is not None
    close(out, uld_logits(lt, la, alpha=0.8, filter_ratio=0.01, mode=mode))


def test_mask_from_top_k_is_the_plausibility_mask():
    W, h_t, _ = head(scale=3.0, seed=2)
    lt = h_t @ W.T
    lt[3] = lt[3] * 0.001                  # a flat row among confident ones
    lt[4, 6:] = float("-inf")              # fewer than k finite logits
    lt[5] = lt[5].bfloat16().float()       # ties
    k = int(0.01 * 1271)
    assert torch.equal(_mask_from_top_k(lt, top_k_with_ties(lt, k), 0.01),
                       plausibility_mask(lt, 0.01))


@pytest.mark.parametrize("mode", ["generate", "score"])
@pytest.mark.parametrize("scale", [0.01, 3.0])
def test_kept_logits_path_equals_uld_logits(mode, scale):
    W, h_t, h_a = head(scale=scale, seed=1)
    lt, la = h_t @ W.T, h_a @ W.T
    c = combiner(mode, ratio=0.1)
    keep = plausibility_mask(lt, 0.1)
    out = c._finish(lt, _kept_logits(W, h_a, keep), keep)
    close(out, uld_logits(lt, la, alpha=0.8, filter_ratio=0.1, mode=mode))


def test_plausibility_mask_mixed_short_and_long_rows():
    W, h_t, _ = head(scale=3.0, seed=2)
    lt = h_t @ W.T
    lt[3] = lt[3] * 0.001  # one flat row among confident ones
    keep = plausibility_mask(lt, 0.01)
    lp = torch.log_softmax(lt, -1)
    k = int(0.01 * 1271)
    thr = torch.minimum(lp.topk(k, -1).values[:, -1:], lp.max(-1, keepdim=True).values
                        + torch.log(torch.tensor(0.01)))
    assert torch.equal(keep, lp >= thr)
    assert keep[3].sum() > 5 * k and (keep.sum(-1)[[0, 1, 2, 4, 5, 6]] == k).all()


# the union GEMM in the head's dtype (bf16: rounded like the dense head's logits)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(atol=1e-4, rtol=1e-5)),
                                       (torch.bfloat16, dict(atol=5e-2, rtol=1e-2))])
def test_head_at_requested_pairs(dtype, tol):
    g = torch.Generator().manual_seed(4)
    W = torch.randn(1271, 64, generator=g).to(dtype)
    h = torch.randn(5, 64, generator=g).to(dtype)
    want = h.float() @ W.float().T
    cols = torch.stack([torch.randperm(1271, generator=g)[:9] for _ in range(5)])  # unsorted
    got = _head_at(W, h, cols)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.gather(1, cols), **tol)
    # flat pairs, rows keeping different numbers of tokens (one keeps none)
    counts = torch.tensor([3, 0, 1, 7, 2])
    rows = torch.repeat_interleave(torch.arange(5), counts)
    flat = torch.randint(0, 1271, (int(counts.sum()),), generator=g)
    torch.testing.assert_close(_head_at(W, h, flat, rows), want[rows, flat], **tol)
    # one row: its own head rows, no pattern or union
    torch.testing.assert_close(_head_at(W, h[2:3], cols[2:3]), want[2:3].gather(1, cols[2:3]),
                               **tol)


def integer_head(V, H, n, dtype, seed):
    """Small integers: every dot product is exact in float32, so the C head and torch's GEMM
    (then one rounding to the head's dtype) agree bit for bit."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randint(-3, 4, (V, H), generator=g).to(dtype)
    h_a = torch.randint(-2, 3, (n, H), generator=g).to(dtype)
    return W, h_a


def confident_logits(n, V, seed, dtype=torch.float32):
    """Peaky rows (the filter keeps exactly their top k) with bf16 ties at the k-th place."""
    W, h_t, _ = head(V=V, scale=3.0, seed=seed)
    return (h_t[:n] @ W.T).bfloat16().to(dtype)


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("mode", ["generate", "score"])
@pytest.mark.parametrize("head_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [7, 1])
def test_sparse_combine_c_equals_the_torch_ops(use_c_build, monkeypatch, build, mode,
                                               head_dtype, logits_dtype, rows):
    # the one C call against the torch code it replaces, bit for bit where the head's dot
    # products are exact (integers), within the C head's rounding otherwise
    lib = use_c_build(build)
    lt = confident_logits(rows, 1271, seed=rows, dtype=logits_dtype)
    k = int(0.01 * 1271)
    for W, h_a, same in ((*integer_head(1271, 67, rows, head_dtype, seed=5), torch.equal),
                         (head(scale=3.0)[0].to(head_dtype),
                          head(scale=3.0)[2][:rows].to(head_dtype), close)):
        got, kth, row_max = combine._sparse_combine_c(lib, lt, W, h_a, k, 0.01, 0.8, mode)
        assert got is not None and kth is None and row_max is None
        monkeypatch.setenv("ULD_NATIVE", "0")
        want = combiner(mode)._top_k_rows(lt.float(), W, h_a, 0.8, mode)
        monkeypatch.setenv("ULD_NATIVE", "1")
        assert got.dtype == torch.float32 and want is not None
        same(got, want)


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [576, 64, 67, 13])  # whole vectors, and tails of every kind
def test_sparse_combine_c_head_is_each_kept_entrys_dot_product(use_c_build, build, dtype, H):
    lib = use_c_build(build)
    g = torch.Generator().manual_seed(H)
    V, n, k = 3001, 4, 30
    W = torch.randn(V, H, generator=g).to(dtype)
    h_a = torch.randn(n, H, generator=g).to(dtype)
    # per row one logit far above k - 1 zeros (kept: the ties with the k-th) and the rest far
    # below; with alpha 1 a zero's ULD logit is minus the assistant's logit, exactly
    lt = torch.full((n, V), -100.0)
    cols = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(n)])
    lt.scatter_(1, cols, 0.0)
    lt[torch.arange(n), cols[:, 0]] = 10.0
    out, _, _ = combine._sparse_combine_c(lib, lt, W, h_a, k, 0.01, 1.0, "generate")
    assert out is not None
    assert torch.equal(torch.isfinite(out), lt > -100)
    got = -out.gather(1, cols[:, 1:])
    want = (h_a.double() @ W.double().T).gather(1, cols[:, 1:])
    if dtype == torch.bfloat16:
        # bf16 values, as the head's bf16 GEMM returns: within one bf16 rounding of the sum
        assert torch.equal(got.bfloat16().float(), got)
        torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=1e-6)
    else:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_sparse_combine_c_declines_a_batch_with_a_row_keeping_more(use_c_build):
    lib = use_c_build("native")
    W, h_t, h_a = head(scale=3.0, seed=2)
    lt = h_t @ W.T
    lt[3] = lt[3] * 0.001              # a flat row among confident ones
    lt[5, 6:] = float("-inf")          # fewer than k finite logits: -inf k-th value
    k = int(0.01 * 1271)
    for rows in ([3], [5], [0, 1, 2, 3, 4, 5, 6]):
        out, kth, row_max = combine._sparse_combine_c(lib, lt[rows], W, h_a[rows], k, 0.01, 0.8,
                                                      "generate")
        top = top_k_with_ties(lt[rows], k)
        assert out is None
        assert torch.equal(kth, top.kth) and torch.equal(row_max, top.row_max)


class _Head(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight


@pytest.mark.parametrize("native_flag", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flat_row", [False, True])
def test_combine_equals_uld_logits_on_every_path(monkeypatch, native_flag, dtype, flat_row):
    # the whole combine step: the one C call on confident rows; with a flat row among them, the
    # mask from the C call's bounds and the general path; the torch code without the C library
    monkeypatch.setenv("ULD_NATIVE", native_flag)
    monkeypatch.setattr(combine, "_plain_head", lambda logits_processor, lm_head: True)
    W, h_t, h_a = head(scale=3.0, seed=3)
    W, h_t, h_a = W.to(dtype), h_t.to(dtype), h_a.to(dtype)
    if flat_row:
        h_t[2] = h_t[2] * 0.001

    def logits_processor(lm_head, h):
        return h @ lm_head.weight.T

    c = combiner("generate", frac=0.05)
    got = c(logits_processor, _Head(W), h_t, h_a)
    want = uld_logits((h_t @ W.T).float(), (h_a @ W.T).float(), alpha=0.8, filter_ratio=0.01,
                      mode="generate")
    # the assistant's bf16 logits: the C head's and the GEMM's may differ by one rounding
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = ~torch.isinf(want)
    tol = dict(atol=0.1, rtol=0.02) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got[fin], want[fin], **tol)
    assert c.stats["c_finish"] == int(native_flag == "1" and not flat_row)
    assert c.stats["sparse"] + c.stats["dense"] == 1

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


@pytest.mark.parametrize("mode", ["generate", "score"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [7, 1])
def test_top_k_rows_c_finish_equals_the_torch_ops(monkeypatch, mode, dtype, rows):
    # the C selection, kept-token head and scatter (uld_vllm.core.native) against the torch
    # code they replace: the selection and scatter bit for bit (given the torch head's values),
    # the whole within the C head's rounding
    W, h_t, h_a = head(scale=3.0)
    W, h_t, h_a = W.to(dtype), h_t[:rows].to(dtype), h_a[:rows].to(dtype)
    lt = (h_t @ W.T).bfloat16().float()  # few distinct values: ties at the k-th place
    c_head_calls = []
    real_c_head = combine._head_at_c

    def torch_head(lib, weight, h, top):
        c_head_calls.append(1)
        return _head_at(weight, h, top.cols, top.rows)

    got = {}
    for key, flag, c_head in (("C", "1", real_c_head), ("C, torch head", "1", torch_head),
                              ("torch", "0", real_c_head)):
        monkeypatch.setenv("ULD_NATIVE", flag)
        monkeypatch.setattr(combine, "_head_at_c", c_head)
        c = combiner(mode)
        got[key] = c._top_k_rows(lt, W, h_a)
        assert got[key] is not None
        assert c.stats["c_finish"] == (flag == "1")
    assert c_head_calls == [1]
    assert torch.equal(got["C, torch head"], got["torch"])
    close(got["C"], got["torch"])


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [576, 64, 67, 13])  # whole vectors, and tails of every kind
def test_head_at_c_is_each_entrys_dot_product(use_c_build, build, dtype, H):
    lib = use_c_build(build)
    g = torch.Generator().manual_seed(H)
    V = 3001
    W = torch.randn(V, H, generator=g).to(dtype)
    h = torch.randn(4, H, generator=g)
    # rows keeping different numbers of tokens (one keeps none), columns in no order, repeats
    counts = torch.tensor([5, 0, 40, 1])
    rows = torch.repeat_interleave(torch.arange(4), counts)
    cols = torch.randint(0, V, (int(counts.sum()),), generator=g)
    top = SimpleNamespace(rows=rows, cols=cols)
    got = combine._head_at_c(lib, W, h, top)
    assert got.dtype == torch.float32 and got.shape == (int(counts.sum()),)
    # exact products of the values the head sees (h in the head's dtype), summed in float64
    want = (h.to(dtype).double() @ W.double().T)[rows, cols]
    if dtype == torch.bfloat16:
        # bf16 values, as the head's bf16 GEMM returns: within one bf16 rounding of the sum
        assert torch.equal(got.bfloat16().float(), got)
        torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=1e-6)
    else:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

"""uld_logits against a literal, slow transcription of the reference doc's formulas (§3)."""

import math

import pytest
import torch

from uld_vllm import uld_logits

NEG = float("-inf")


def literal_uld(l_row, a_row, alpha, r, mode):
    """Line-by-line from the reference doc, on Python floats (float64), one row."""
    V = len(l_row)
    finite = [x for x in l_row if x != NEG]
    if not finite:
        return [NEG] * V
    m = max(finite)
    lse = m + math.log(sum(math.exp(x - m) for x in finite))
    lp = [x - lse if x != NEG else NEG for x in l_row]
    if r == 0:
        fa = [x for x in a_row if x != NEG]
        ma = max(fa)
        lse_a = ma + math.log(sum(math.exp(x - ma) for x in fa))
        out = []
        for v in range(V):
            if lp[v] == NEG or (a_row[v] == NEG and alpha != 0):
                out.append(NEG)
            else:
                la = a_row[v] - lse_a if a_row[v] != NEG else 0.0
                out.append(lp[v] - alpha * la)
        return out
    k = max(1, math.floor(r * V))
    kth_largest = sorted(lp, reverse=True)[k - 1]
    thr = min(kth_largest, max(lp) + math.log(r))
    out = []
    for v in range(V):
        kept = lp[v] >= thr and lp[v] != NEG and not (a_row[v] == NEG and alpha != 0)
        if kept:
            out.append(l_row[v] - alpha * a_row[v])
        elif mode == "generate":
            out.append(NEG)
        else:
            out.append(l_row[v])
    return out


def check(l, a, alpha, r, mode, atol=1e-4):
    got = uld_logits(l, a, alpha=alpha, filter_ratio=r, mode=mode)
    assert got.dtype == torch.float32 and got.shape == l.shape
    assert not torch.isnan(got).any()
    alphas = alpha.tolist() if isinstance(alpha, torch.Tensor) else [alpha] * l.shape[0]
    for i in range(l.shape[0]):
        want = torch.tensor(literal_uld(l[i].double().tolist(), a[i].double().tolist(),
                                        alphas[i], r, mode), dtype=torch.float64)
        g = got[i].double()
        assert torch.equal(torch.isneginf(g), torch.isneginf(want)), f"mask differs in row {i}"
        fin = ~torch.isneginf(want)
        torch.testing.assert_close(g[fin], want[fin], atol=atol, rtol=1e-5)
    return got


@pytest.mark.parametrize("r", [0.1, 0.01, 0.0])
@pytest.mark.parametrize("mode", ["generate", "score"])
@pytest.mark.parametrize("B,V", [(1, 1271), (5, 1271), (3, 97)])
def test_random_logits_match_literal(B, V, r, mode):
    g = torch.Generator().manual_seed(B * 1000 + V)
    l = torch.randn(B, V, generator=g) * 3
    a = torch.randn(B, V, generator=g) * 3
    check(l, a, 0.8, r, mode)


@pytest.mark.parametrize("r", [0.1, 0.01, 0.0])
def test_per_row_alpha(r):
    g = torch.Generator().manual_seed(7)
    l, a = torch.randn(4, 1271, generator=g) * 2, torch.randn(4, 1271, generator=g) * 2
    alpha = torch.tensor([0.0, 0.7, 1.0, 2.5])
    got = check(l, a, alpha, r, "generate")
    # row 0 has alpha 0: kept scores are the target's own values (log-probs when r == 0)
    ref0 = torch.log_softmax(l[:1], -1) if r == 0 else l[:1]
    kept = ~torch.isneginf(got[0])
    torch.testing.assert_close(got[0][kept], ref0[0][kept])


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_ties_at_the_kth_place_are_all_kept(mode):
    # integer logits tie massively; the kth-largest rule keeps every tied token
    g = torch.Generator().manual_seed(3)
    l = torch.randint(-3, 4, (6, 1271), generator=g).float()
    a = torch.randint(-3, 4, (6, 1271), generator=g).float()
    got = check(l, a, 0.8, 0.01, mode)
    if mode == "generate":
        kept = (~torch.isneginf(got)).sum(-1)
        assert (kept > math.floor(0.01 * 1271)).all()


@pytest.mark.parametrize("r", [0.1, 0.01, 0.0])
@pytest.mark.parametrize("mode", ["generate", "score"])
def test_neg_inf_entries_and_rows(r, mode):
    g = torch.Generator().manual_seed(11)
    l, a = torch.randn(4, 1271, generator=g), torch.randn(4, 1271, generator=g)
    l[0, ::3] = NEG            # target rules tokens out
    a[1, :50] = NEG            # assistant rules tokens out (undefined difference -> masked)
    l[2, :] = NEG
    l[2, 5] = 1.0              # only one finite target token
    a[3] = a[3].clamp(max=0)
    check(l[:2], a[:2], 0.8, r, mode)
    check(l[2:], a[2:], 0.8, r, mode)
    # a row with only one candidate keeps exactly that one
    got = uld_logits(l[2:3], a[2:3], alpha=0.8, filter_ratio=r, mode="generate")
    assert (~torch.isneginf(got)).sum() == 1 and got.argmax() == 5
    # alpha == 0 ignores the assistant's -inf entirely (no 0 * inf NaN)
    got0 = uld_logits(l[1:2], a[1:2], alpha=0.0, filter_ratio=r, mode=mode)
    assert not torch.isnan(got0).any()


def test_all_neg_inf_row_gives_neg_inf_not_nan():
    l = torch.full((2, 1271), NEG)
    a = torch.randn(2, 1271)
    for r in (0.1, 0.0):
        for mode in ("generate", "score"):
            out = uld_logits(l, a, alpha=1.0, filter_ratio=r, mode=mode)
            assert torch.isneginf(out).all()


def test_masked_token_never_wins_even_when_all_kept_scores_are_negative():
    # the reference took argmax(s * ~mask): with negative kept scores a masked token (score 0)
    # won. Here the assistant dominates every kept token, so every kept score is negative.
    g = torch.Generator().manual_seed(5)
    l = torch.randn(8, 1271, generator=g)
    a = l.abs() * 10 + 5
    lp = torch.log_softmax(l, -1)
    out = uld_logits(l, a, alpha=1.0, filter_ratio=0.1, mode="generate")
    kept = ~torch.isneginf(out)
    assert (out[kept] < 0).all()
    winners = out.argmax(-1)
    assert kept.gather(-1, winners[:, None]).all()
    buggy = (out.masked_fill(~kept, 0.0)).argmax(-1)  # what the reference would pick
    assert not kept.gather(-1, buggy[:, None]).all()
    # the plausibility rule itself: kept = top-k plus p >= r * p_max
    k = math.floor(0.1 * 1271)
    thr = torch.minimum(lp.topk(k, -1).values[:, -1:], lp.max(-1, keepdim=True).values
                        + math.log(0.1))
    assert torch.equal(kept, lp >= thr)


def test_score_mode_keeps_target_logits_on_masked_tokens():
    g = torch.Generator().manual_seed(9)
    l, a = torch.randn(3, 1271, generator=g), torch.randn(3, 1271, generator=g)
    gen = uld_logits(l, a, alpha=0.8, filter_ratio=0.1, mode="generate")
    score = uld_logits(l, a, alpha=0.8, filter_ratio=0.1, mode="score")
    kept = ~torch.isneginf(gen)
    assert torch.equal(score[kept], gen[kept])
    assert torch.equal(score[~kept], l[~kept])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_inputs_compute_in_fp32(dtype):
    g = torch.Generator().manual_seed(13)
    l, a = torch.randn(3, 1271, generator=g), torch.randn(3, 1271, generator=g)
    l, a = l.to(dtype), a.to(dtype)
    out = uld_logits(l, a, alpha=0.8, filter_ratio=0.01, mode="generate")
    ref = uld_logits(l.float(), a.float(), alpha=0.8, filter_ratio=0.01, mode="generate")
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)


def test_bad_arguments_are_rejected():
    l = torch.randn(2, 10)
    with pytest.raises(ValueError, match="mode"):
        uld_logits(l, l, mode="sample")
    with pytest.raises(ValueError, match="same shape"):
        uld_logits(l, l[:1])
    with pytest.raises(ValueError, match="filter_ratio"):
        uld_logits(l, l, filter_ratio=1.5)
    with pytest.raises(ValueError, match="alpha"):
        uld_logits(l, l, alpha=torch.ones(3))


# --- the gated rule: a confidence gate on alpha and the above-uniform penalty ---------------

def literal_gated(l_row, a_row, alpha, r, mode, penalty, gate):
    """The gated rule line by line on Python floats, one row: the weight from KL(p_a || U),
    then the paper's filter and the penalty."""
    V = len(a_row)
    fa = [x for x in a_row if x != NEG]
    ma = max(fa)
    lse_a = ma + math.log(sum(math.exp(x - ma) for x in fa))
    lpa = [x - lse_a if x != NEG else NEG for x in a_row]
    kl = math.log(V) + sum(math.exp(x) * x for x in lpa if x != NEG)
    if gate is not None:
        lo, hi = gate
        alpha = alpha * min(1.0, max(0.0, (kl - lo) / (hi - lo)))
    if penalty == "logit":
        return literal_uld(l_row, a_row, alpha, r, mode)
    pen = [max(0.0, x + math.log(V)) if x != NEG else 0.0 for x in lpa]
    finite = [x for x in l_row if x != NEG]
    m = max(finite)
    lse = m + math.log(sum(math.exp(x - m) for x in finite))
    lp = [x - lse if x != NEG else NEG for x in l_row]
    if r == 0:
        return [lp[v] - alpha * pen[v] if lp[v] != NEG else NEG for v in range(V)]
    k = max(1, math.floor(r * V))
    thr = min(sorted(lp, reverse=True)[k - 1], max(lp) + math.log(r))
    return [l_row[v] - alpha * pen[v] if lp[v] >= thr and lp[v] != NEG
            else (NEG if mode == "generate" else l_row[v]) for v in range(V)]


def gated_rows(V=1271, seed=21):
    """Rows of every kind the gate sees: a near-uniform assistant (gate closed), a
    half-confident one (in between), a confident one (open), one with -inf entries."""
    g = torch.Generator().manual_seed(seed)
    l = torch.randn(4, V, generator=g) * 3
    a = torch.randn(4, V, generator=g)
    a[0] *= 0.01
    a[1] *= 1.5
    a[2] *= 6
    a[3, :40] = NEG
    a[3] *= 4
    return l, a


@pytest.mark.parametrize("penalty", ["above_uniform", "logit"])
@pytest.mark.parametrize("gate", [(1.0, 3.0), None])
@pytest.mark.parametrize("r", [0.01, 0.1, 0.0])
@pytest.mark.parametrize("mode", ["generate", "score"])
def test_gated_rule_matches_literal(penalty, gate, r, mode):
    from uld_vllm.core.logits import kl_from_uniform

    l, a = gated_rows()
    kl = kl_from_uniform(a)
    assert kl[0] < 1.0 < kl[1] < 3.0 < kl[2]  # closed, in between, open
    got = uld_logits(l, a, alpha=0.8, filter_ratio=r, mode=mode, penalty=penalty, gate=gate)
    assert not torch.isnan(got).any()
    for i in range(l.shape[0]):
        want = torch.tensor(literal_gated(l[i].double().tolist(), a[i].double().tolist(), 0.8,
                                          r, mode, penalty, gate), dtype=torch.float64)
        g_ = got[i].double()
        assert torch.equal(torch.isneginf(g_), torch.isneginf(want)), i
        fin = ~torch.isneginf(want)
        torch.testing.assert_close(g_[fin], want[fin], atol=1e-4, rtol=1e-5)


def test_a_closed_gate_leaves_the_targets_greedy_token_and_an_open_one_does_not():
    l, a = gated_rows()
    a[2] = l[2] * 2  # a confident assistant that agrees with the target's favourite
    out = uld_logits(l, a, alpha=0.8, filter_ratio=0.01, penalty="above_uniform",
                     gate=(1.0, 3.0))
    assert out[0].argmax() == l[0].argmax()
    assert out[2].argmax() != l[2].argmax()
    # the above-uniform penalty never raises a token above its target logit
    kept = ~torch.isneginf(out)
    assert (out[kept] <= l[kept]).all()


def test_bad_gates_and_penalties_are_rejected():
    l = torch.randn(2, 10)
    for gate in [(3.0, 1.0), (-1.0, 2.0), (1.0,), (1.0, float("inf")), "1,3"]:
        with pytest.raises(ValueError, match="gate"):
            uld_logits(l, l, gate=gate)
    with pytest.raises(ValueError, match="penalty"):
        uld_logits(l, l, penalty="relu")

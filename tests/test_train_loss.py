"""The ULD loss on plain tensors: L = L_f + beta * L_r."""

import math

import pytest
import torch

from uld_vllm.train.loss import IGNORE_INDEX, UldLoss


def _batch(B=3, T=5, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    return logits, labels, mask


def test_kl_is_zero_for_uniform_logits():
    logits = torch.full((2, 4, 11), 3.25)  # any constant row is the uniform distribution
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    for all_positions in (False, True):
        kl = UldLoss.retain_kl(logits, mask, all_positions=all_positions)
        assert abs(float(kl)) < 1e-6


def test_kl_matches_hand_computation_on_non_padding_positions():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, 9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the last position is padding

    def kl_uniform(row):
        p = [math.exp(x) / sum(math.exp(y) for y in row) for x in row]
        return sum((1 / 3) * math.log((1 / 3) / pv) for pv in p)

    per_pos = [kl_uniform(r) for r in logits[0].tolist()]
    got = UldLoss.retain_kl(logits, mask)
    assert float(got) == pytest.approx((per_pos[0] + per_pos[1]) / 2, rel=1e-5)
    # the reference's variant averages over every position, padding included
    got_all = UldLoss.retain_kl(logits, mask, all_positions=True)
    assert float(got_all) == pytest.approx(sum(per_pos) / 3, rel=1e-5)
    assert float(got_all) != pytest.approx(float(got), rel=1e-3)


def test_ce_ignores_prompt_and_padding_labels():
    logits, labels, mask = _batch(B=2, T=6, V=9)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 5] = IGNORE_INDEX  # padding
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    got = UldLoss.forget_ce(logits, labels)
    assert float(got) == pytest.approx(float(ref), rel=1e-6)
    # hand count: scored positions t predict labels[t+1] for labels[t+1] != -100
    terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
             for b in range(2) for t in range(5) if labels[b, t + 1] != IGNORE_INDEX]
    assert len(terms) == 5
    assert float(got) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-5)
    # logits at positions that predict a masked label do not matter
    changed = logits.clone()
    changed[:, :2] += 100 * torch.randn_like(changed[:, :2])
    changed[1, 4] -= 50
    assert float(UldLoss.forget_ce(changed, labels)) == pytest.approx(float(got), rel=1e-6)


def test_beta_scales_only_the_retain_term():
    logits, labels, mask = _batch(B=4, T=5, V=6, seed=1)
    labels[:, :2] = IGNORE_INDEX
    is_retain = torch.tensor([False, True, False, True])
    outs = {b: UldLoss.compute(logits, labels, mask, is_retain, retain_weight=b)
            for b in (0.0, 1.0, 5.0)}
    for b, out in outs.items():
        assert float(out.forget) == pytest.approx(float(outs[0.0].forget))
        assert float(out.retain) == pytest.approx(float(outs[0.0].retain))
        assert float(out.loss) == pytest.approx(float(out.forget + b * out.retain), rel=1e-6)
    assert float(outs[0.0].forget) > 0 and float(outs[0.0].retain) > 0
    # each term only looks at its own rows
    assert float(outs[1.0].forget) == pytest.approx(
        float(UldLoss.forget_ce(logits[[0, 2]], labels[[0, 2]])))
    assert float(outs[1.0].retain) == pytest.approx(
        float(UldLoss.retain_kl(logits[[1, 3]], mask[[1, 3]])))


@pytest.mark.parametrize("retain_only", [False, True])
def test_batch_with_one_side_only(retain_only):
    logits, labels, mask = _batch(B=3, T=4, V=5, seed=2)
    logits.requires_grad_(True)
    is_retain = torch.full((3,), retain_only)
    out = UldLoss.compute(logits, labels, mask, is_retain, retain_weight=5.0)
    absent = out.forget if retain_only else out.retain
    present = out.retain if retain_only else out.forget
    assert absent.item() == 0.0
    assert present.item() > 0.0
    assert out.loss.item() == pytest.approx(present.item() * (5.0 if retain_only else 1.0))
    out.loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_forget_rows_without_answer_tokens_give_zero_not_nan():
    logits, labels, mask = _batch(B=2, T=4, V=5)
    labels[:] = IGNORE_INDEX  # e.g. a prompt longer than --max-length
    out = UldLoss.compute(logits, labels, mask, torch.tensor([False, False]))
    assert float(out.forget) == 0.0 and float(out.loss) == 0.0


def test_retain_padding_does_not_change_default_loss():
    logits, labels, mask = _batch(B=1, T=4, V=5, seed=3)
    padded = torch.cat([logits, torch.randn(1, 3, 5)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    assert float(UldLoss.retain_kl(padded, padded_mask)) == pytest.approx(
        float(UldLoss.retain_kl(logits, mask)), rel=1e-6)


def test_selected_positions_give_the_same_loss_as_full_logits():
    logits, labels, mask = _batch(B=4, T=6, V=9, seed=3)
    labels[:, :2] = IGNORE_INDEX          # prompt
    labels[3, 4:] = IGNORE_INDEX          # padding of row 3
    mask[3, 4:] = 0
    is_retain = torch.tensor([False, True, False, True])
    for where in ("tokens", "all"):
        full = UldLoss.compute(logits, labels, mask, is_retain, retain_weight=2.0,
                               retain_positions=where)
        f = UldLoss.forget_ce(logits[[0, 2]], labels[[0, 2]])
        r = UldLoss.retain_kl(logits[[1, 3]], mask[[1, 3]], all_positions=where == "all")
        assert float(full.forget) == pytest.approx(float(f), rel=1e-5)
        assert float(full.retain) == pytest.approx(float(r), rel=1e-5)
        assert float(full.loss) == pytest.approx(float(f + 2.0 * r), rel=1e-5)
    # "answer": retain KL only where the next label is an answer token (t predicts t+1)
    sel, targets, retain_pos = UldLoss.select_positions(labels, mask, is_retain, "answer")
    want = [(b, t) for b in (1, 3) for t in range(5) if labels[b, t + 1] != IGNORE_INDEX]
    assert sorted(zip(*[x.tolist() for x in (sel & retain_pos).nonzero(as_tuple=True)])) == want
    per_pos = [float(UldLoss.kl_to_uniform(logits[b, t])) for b, t in want]
    out = UldLoss.from_selected(logits[sel], targets[sel], retain_pos[sel], retain_weight=1.0)
    assert float(out.retain) == pytest.approx(sum(per_pos) / len(per_pos), rel=1e-5)
    assert float(out.forget) == pytest.approx(
        float(UldLoss.forget_ce(logits[[0, 2]], labels[[0, 2]])), rel=1e-5)
    # the head-on-selected-rows path: logits of other positions never matter
    changed = logits.clone()
    changed[~sel] += 100 * torch.randn_like(changed[~sel])
    again = UldLoss.compute(changed, labels, mask, is_retain, retain_positions="answer")
    assert float(again.loss) == pytest.approx(float(UldLoss.compute(
        logits, labels, mask, is_retain, retain_positions="answer").loss), rel=1e-6)


def test_kl_to_uniform_equals_the_log_softmax_form():
    z = torch.randn(5, 13) * 3
    ref = -math.log(13) - torch.log_softmax(z, -1).mean(-1)
    torch.testing.assert_close(UldLoss.kl_to_uniform(z), ref, rtol=1e-5, atol=1e-6)

"""Per-request ULD controls without an engine: parsing, the per-row state, the combiner."""

from types import SimpleNamespace

import pytest
import torch

from uld_vllm.core.logits import uld_logits
from uld_vllm.engine.combine import UldCombiner
from uld_vllm.engine.request_controls import (
    RowControls,
    UldRequestControls,
    parse_extra_args,
)


@pytest.mark.parametrize("extra, want", [
    (None, {}),
    ({}, {}),
    ({"other_key": 3}, {}),  # not ours: left to whoever reads it
    ({"uld_alpha": 0}, {"alpha": 0.0}),
    ({"uld_alpha": 2, "uld_mode": "score"}, {"alpha": 2.0, "mode": "score"}),
    ({"uld_mode": "generate"}, {"mode": "generate"}),
    ({"uld_penalty": "logit", "uld_gate": "off"}, {"penalty": "logit", "gate": None}),
    ({"uld_gate": [0.5, 2]}, {"gate": (0.5, 2.0)}),
])
def test_valid_extra_args(extra, want):
    assert parse_extra_args(extra) == want


@pytest.mark.parametrize("extra, words", [
    ({"uld_alhpa": 0.5}, ["unknown", "'uld_alhpa'", "uld_alpha", "uld_mode"]),
    ({"uld_alpha": "0.5"}, ["uld_alpha", "JSON number"]),
    ({"uld_alpha": True}, ["uld_alpha", "bool"]),
    ({"uld_alpha": -0.1}, ["uld_alpha", ">= 0"]),
    ({"uld_alpha": float("nan")}, ["uld_alpha", "finite"]),
    ({"uld_mode": "sample"}, ["uld_mode", "'generate'", "'score'"]),
    ({"uld_penalty": "relu"}, ["uld_penalty", "'above_uniform'"]),
    ({"uld_gate": [3, 1]}, ["uld_gate", "low < high", "'off'"]),
    ({"uld_gate": "1,3"}, ["uld_gate", "[1, 3]"]),
    ({"uld_gate": [1, True]}, ["uld_gate"]),
])
def test_invalid_extra_args_name_the_key_and_the_fix(extra, words):
    with pytest.raises(ValueError) as e:
        parse_extra_args(extra)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_uld_keys_with_prompt_logprobs_are_refused():
    from vllm import SamplingParams

    UldRequestControls.validate_params(SamplingParams(prompt_logprobs=0))
    UldRequestControls.validate_params(SamplingParams(extra_args={"uld_alpha": 0.5}))
    with pytest.raises(ValueError, match="prompt_logprobs always use the engine's"):
        UldRequestControls.validate_params(
            SamplingParams(prompt_logprobs=0, extra_args={"uld_alpha": 0.5}))


def _update(rc, size, added=(), removed=(), moved=()):
    from vllm.v1.sample.logits_processor import BatchUpdate

    rc.update(BatchUpdate(batch_size=size, removed=list(removed), moved=list(moved),
                          added=[(i, p, None, []) for i, p in added]))


def test_row_controls_follow_adds_removes_and_moves():
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import MoveDirectionality

    def sp(**xa):
        return SamplingParams(extra_args=xa or None)

    rc = RowControls()
    assert rc.take(3) is None  # no step yet (warm-up calls): the engine's settings
    _update(rc, 3, added=[(0, sp(uld_alpha=0.0)), (1, sp()), (2, sp(uld_mode="score"))])
    assert rc.take(3) == {0: {"alpha": 0.0}, 2: {"mode": "score"}}
    assert rc.take(3) is None  # later calls in the same step: prompt log-probs
    # row 0 finishes, the last row moves into its slot
    _update(rc, 2, removed=[0], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)])
    assert rc.take(2) == {0: {"mode": "score"}}
    _update(rc, 2, moved=[(0, 1, MoveDirectionality.SWAP)])
    assert rc.take(2) == {1: {"mode": "score"}}
    rc.update(None)  # a step without batch changes re-arms with the same rows
    assert rc.take(2) == {1: {"mode": "score"}}
    rc.update(None)
    with pytest.raises(RuntimeError, match="3 sampled rows for a batch of 2"):
        rc.take(3)


class _Head:
    """A plain matrix as the LM head; the combiner's dense path only calls the processor."""

    def __init__(self, W):
        self.weight = W


@pytest.mark.parametrize("ratio", [0.1, 0.0])
def test_mixed_rows_equal_each_rows_own_settings(ratio):
    g = torch.Generator().manual_seed(0)
    V, H, n = 300, 16, 8
    W = torch.randn(V, H, generator=g) * 2
    h_t = torch.randn(n, H, generator=g)
    # an assistant sure of the target's own top tokens: the penalty bites on the kept ones
    h_a = 3 * h_t + torch.randn(n, H, generator=g)
    engine = dict(alpha=0.8, mode="generate", penalty="above_uniform", gate=(0.5, 2.0))
    c = UldCombiner(SimpleNamespace(filter_ratio=ratio, backend="torch", **engine))

    def lp(head, h):
        return h @ head.weight.T

    rows = {0: {"alpha": 0.5}, 2: {"alpha": 0.0}, 3: {"mode": "score"},
            5: {"alpha": 2.0, "mode": "score"}, 6: {"penalty": "logit", "gate": None},
            7: {"gate": (6.0, 8.0)}}  # above log V: closed, where the engine's is open
    got = c(lp, _Head(W), h_t, h_a, rows)
    lt, la = h_t @ W.T, h_a @ W.T
    for i in range(n):
        own = {**engine, **rows.get(i, {})}
        if own["alpha"] == 0.0:  # the target's own logits: no filter
            want = lt[i]
        else:
            want = uld_logits(lt[i:i + 1], la[i:i + 1], filter_ratio=ratio, **own)[0]
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), i
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[i][fin], want[fin], atol=1e-5, rtol=1e-5)
    assert c.stats["per_request"] == 1 and c.stats["target"] == 1
    # no per-request rows: the engine's settings for all, one group
    torch.testing.assert_close(c(lp, _Head(W), h_t, h_a, None),
                               uld_logits(lt, la, filter_ratio=ratio, **engine))
    # the rows' own rules really differ from the engine's (else this test proves nothing)
    for i in (6, 7):
        assert not torch.equal(got[i], c(lp, _Head(W), h_t[i:i + 1], h_a[i:i + 1], None)[0])

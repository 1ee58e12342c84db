"""The engine's combine step and its settings: one head GEMM on both streams, then uld_logits;
the backend and every other setting from additional_config["uld"] only."""

from types import SimpleNamespace

import pytest
import torch

from uld_vllm.core.logits import uld_logits
from uld_vllm.engine import settings
from uld_vllm.engine.combine import UldCombiner, _pick_backend
from uld_vllm.engine.settings import UldSettings, warn_removed_env
from uld_vllm.errors import UldError


class _Head(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight


def _logits_processor(lm_head, h):
    return h @ lm_head.weight.T


RULES = [{"penalty": "logit", "gate": None}, {"penalty": "above_uniform", "gate": (1.0, 3.0)}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["generate", "score"])
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.0])
@pytest.mark.parametrize("rule", RULES, ids=["reference", "gated"])
def test_combine_is_uld_logits_of_both_streams(dtype, mode, ratio, rule):
    g = torch.Generator().manual_seed(3)
    W = (torch.randn(1271, 64, generator=g) * 3).to(dtype)
    h_t, h_a = (torch.randn(7, 64, generator=g).to(dtype) for _ in range(2))
    h_a[:3] *= 0.01  # rows whose assistant is near uniform: a closed gate
    c = UldCombiner(SimpleNamespace(alpha=0.8, filter_ratio=ratio, mode=mode, backend="torch",
                                    **rule))
    got = c(_logits_processor, _Head(W), h_t, h_a)
    want = uld_logits(h_t @ W.T, h_a @ W.T, alpha=0.8, filter_ratio=ratio, mode=mode, **rule)
    # one GEMM on the stacked rows may round differently from two
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], atol=1e-4, rtol=1e-5)
    assert c.stats == {"combined": 1, "target": 0, "per_request": 0}


def test_alpha_zero_serves_the_targets_own_logits():
    g = torch.Generator().manual_seed(0)
    W, h_t, h_a = torch.randn(50, 8, generator=g), torch.randn(3, 8, generator=g), \
        torch.randn(3, 8, generator=g)
    c = UldCombiner(SimpleNamespace(alpha=0.0, filter_ratio=0.1, mode="generate",
                                    backend="torch", **RULES[1]))
    assert torch.equal(c(_logits_processor, _Head(W), h_t, h_a), h_t @ W.T)
    assert c.stats["target"] == 1


def test_backend_choice():
    assert _pick_backend("auto") == "torch"  # no CUDA here
    assert _pick_backend("torch") == "torch"
    with pytest.raises(UldError, match="unknown"):
        _pick_backend("cuda")


def test_settings_come_from_additional_config_and_the_adapters_defaults():
    adapter = SimpleNamespace(alpha=0.7, filter_ratio=0.05, penalty="logit", gate=[2, 4])
    s = UldSettings.from_dict({"adapter": "/a", "backend": "torch"}, adapter)
    assert (s.alpha, s.filter_ratio, s.mode, s.backend) == (0.7, 0.05, "generate", "torch")
    assert (s.penalty, s.gate) == ("logit", (2.0, 4.0))
    s = UldSettings.from_dict({"adapter": "/a", "gate": None, "penalty": "above_uniform"},
                              adapter)
    assert (s.penalty, s.gate) == ("above_uniform", None)  # null: the gate is off
    # an adapter written before the rule existed decodes with today's defaults
    old = SimpleNamespace(alpha=0.7, filter_ratio=0.05)
    s = UldSettings.from_dict({"adapter": "/a"}, old)
    assert (s.penalty, s.gate) == ("above_uniform", (1.0, 3.0))
    s = UldSettings.from_dict({"adapter": "/a", "alpha": 0.5, "filter_ratio": 0.1}, adapter)
    assert (s.alpha, s.filter_ratio) == (0.5, 0.1)


@pytest.mark.parametrize("raw,match", [
    ({"adapter": "/a", "alpha": 1, "filter_ratio": 0.1, "sparse_head_fraction": 1},
     "unknown keys"),
    ({"adapter": "/a", "alpha": 1, "filter_ratio": 0.1, "backend": "cuda"}, "backend"),
    ({"adapter": "/a", "alpha": "1", "filter_ratio": 0.1}, "alpha"),
    ({"adapter": "/a", "alpha": 1}, "lacks"),
    ({"adapter": "/a", "alpha": 1, "filter_ratio": 0.1, "gate": [3, 1]}, "gate"),
    ({"adapter": "/a", "alpha": 1, "filter_ratio": 0.1, "penalty": "relu"}, "penalty"),
    ({"alpha": 1}, "no 'uld'"),
])
def test_bad_settings_are_one_line(raw, match):
    with pytest.raises(UldError, match=match) as e:
        UldSettings.from_dict(raw)
    assert "\n" not in str(e.value)


def test_removed_environment_variables_get_one_warning_each(monkeypatch, capsys):
    monkeypatch.setattr(settings, "_warned_env", False)
    env = {"ULD_BACKEND": "triton", "ULD_NATIVE": "0", "PATH": "/bin"}
    lines = warn_removed_env(env)
    assert len(lines) == 2 and "additional_config['uld']['backend']" in lines[0]
    assert capsys.readouterr().err.splitlines() == lines
    warn_removed_env(env)  # once per process
    assert capsys.readouterr().err == ""

"""uld_vllm.core.native: the C library's build, its cache and the fallback without a compiler."""

import pytest
import torch

from uld_vllm.core import native, topk
from uld_vllm.core.topk import top_k_with_ties


def _no_c_selection(*args):
    pytest.fail("the C selection ran")


def test_without_a_compiler_the_torch_code_runs(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("ULD_VLLM_HOME", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_state", {})
    with caplog.at_level("WARNING", logger="uld_vllm"):
        assert native.library() is None
    assert "no-such-cc" in native.status()
    assert "torch code runs instead" in caplog.text
    monkeypatch.setattr(topk, "_native", _no_c_selection)  # the torch code runs
    x = torch.randn(4, 3000)
    got = top_k_with_ties(x, 30)
    assert torch.equal(got.kth, torch.topk(x, 30).values[:, -1:])


def test_the_library_is_built_once_then_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("ULD_VLLM_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    assert native.status().startswith("built ")
    assert len(list((tmp_path / "native").glob("*.so"))) == 1
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    assert native.status().startswith("cached ")


def test_an_unwritable_cache_falls_back_with_the_reason(monkeypatch, tmp_path):
    blocker = tmp_path / "home"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("ULD_VLLM_HOME", str(blocker))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is None
    assert "cannot create" in native.status() and str(blocker) in native.status()


def test_ULD_NATIVE_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("ULD_NATIVE", "0")
    assert native.library() is None
    assert native.status() == "off (ULD_NATIVE=0)"
    monkeypatch.setattr(topk, "_native", _no_c_selection)
    top_k_with_ties(torch.randn(2, 500), 5)

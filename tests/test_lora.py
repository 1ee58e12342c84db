"""The assistant's LoRA delta: the base projection's output plus B (A x), out of place."""

from types import SimpleNamespace

import pytest
import torch

from uld_vllm.engine.lora import LoRALayer


def _vllm_cpu_linear(weight):
    """A module whose weight vLLM's CPU dispatch repacked (oneDNN here) and dropped, as it
    does for every linear of a CPU engine, the LoRA ones included."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    m = torch.nn.Module()
    m.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(m, remove_weight=True)
    if (m.weight.numel() and weight.dtype == torch.bfloat16
            and not torch.cpu._is_avx512_bf16_supported()):
        # oneDNN has no bf16 GEMM on this CPU: vLLM keeps the weight and falls back to torch's
        # linear, so the case under test (the weight gone, only the packed copy) cannot arise
        pytest.skip("vLLM does not repack bf16 weights on a CPU without avx512_bf16")
    assert m.weight.numel() == 0  # only the repacked copy is left
    m.quant_method = UnquantizedLinearMethod()
    return m


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("cpu_gemm", [False, True])  # plain weights / vLLM's CPU GEMM
def test_lora_is_base_plus_b_of_a_x_and_leaves_base_alone(dtype, tol, rows, cpu_gemm):
    g = torch.Generator().manual_seed(0)
    wa = torch.randn(6, 23, generator=g).to(dtype)   # [r', in]
    wb = torch.randn(37, 6, generator=g).to(dtype)   # [out, r']
    if cpu_gemm:
        a, b = _vllm_cpu_linear(wa), _vllm_cpu_linear(wb)
    else:
        a, b = SimpleNamespace(weight=wa), SimpleNamespace(weight=wb)
    x = torch.randn(rows, 23, generator=g).to(dtype)
    stacked = torch.randn(2 * rows, 37, generator=g).to(dtype)  # [target; assistant] rows
    before = stacked.clone()
    got = LoRALayer._plus(SimpleNamespace(_cpu_gemm=cpu_gemm), stacked[rows:], x, a, b,
                          reduce=False)
    want = before[rows:].float() + (x.float() @ wa.float().T) @ wb.float().T
    assert torch.equal(stacked, before)  # neither stream's base output is written
    assert got.shape == (rows, 37) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=tol * 10, rtol=tol)

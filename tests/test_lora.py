"""The assistant's LoRA delta, added in place into the base projection's output rows."""

from types import SimpleNamespace

import pytest
import torch

from uld_vllm.engine.lora import LoRALayer


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 5])
def test_add_is_base_plus_b_of_a_x_on_the_assistant_rows_only(dtype, tol, rows):
    g = torch.Generator().manual_seed(0)
    a = SimpleNamespace(weight=torch.randn(6, 23, generator=g).to(dtype))   # [r', in]
    b = SimpleNamespace(weight=torch.randn(37, 6, generator=g).to(dtype))   # [out, r']
    x = torch.randn(rows, 23, generator=g).to(dtype)
    base = torch.randn(2 * rows, 37, generator=g).to(dtype)  # [target; assistant] rows
    out = base.clone()
    LoRALayer._add(out[rows:], x, a, b, reduce=False)
    want = base[rows:].float() + (x.float() @ a.weight.float().T) @ b.weight.float().T
    assert torch.equal(out[:rows], base[:rows])  # the target's rows are untouched
    torch.testing.assert_close(out[rows:].float(), want, atol=tol * 10, rtol=tol)

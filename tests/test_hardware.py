"""Machine checks without the machine: fake /proc/cpuinfo texts, a stand-in engine config, and
the experiment's eval-time core binding (set during one eval, restored after)."""

import os
from types import SimpleNamespace

import pytest
import torch

from uld_vllm.core.hardware import cpu_has_native_bf16, slow_engine_dtype
from uld_vllm.jobs.spec import engine_on_every_core, warn_if_slow_dtype

AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
AVX512_BF16 = "flags : avx512f avx512_bf16\n"


def test_native_bf16_flags():
    assert not cpu_has_native_bf16(AVX2)
    assert cpu_has_native_bf16(AMX) and cpu_has_native_bf16(AVX512_BF16)
    assert not cpu_has_native_bf16("")


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "torch.bfloat16"])
def test_bf16_engine_on_avx2_cpu_is_named_with_the_fix(dtype):
    line = slow_engine_dtype(dtype, "cpu", AVX2)
    assert line.startswith("uld-vllm: WARNING") and "--dtype float32" in line


@pytest.mark.parametrize("dtype,device,cpu", [(torch.float32, "cpu", AVX2),
                                              (torch.float16, "cuda", AVX2),
                                              (torch.bfloat16, "cuda", AVX2),
                                              (torch.bfloat16, "cpu", AMX)])
def test_no_warning_where_the_dtype_runs_natively(dtype, device, cpu):
    assert slow_engine_dtype(dtype, device, cpu) is None


def _llm(dtype, device):
    cfg = SimpleNamespace(model_config=SimpleNamespace(dtype=dtype),
                          device_config=SimpleNamespace(device_type=device))
    return SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=cfg))


def test_engine_build_prints_the_warning_on_stderr(capsys):
    assert warn_if_slow_dtype(_llm(torch.bfloat16, "cpu"), AVX2)
    assert "--dtype float32" in capsys.readouterr().err
    assert warn_if_slow_dtype(_llm(torch.float32, "cpu"), AVX2) is None
    assert capsys.readouterr().err == ""


KEYS = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or torch.cuda.is_available(),
                    reason="binds only on a CPU machine with >= 2 cores")
def test_eval_binding_covers_every_core_and_is_restored(monkeypatch):
    monkeypatch.delenv(KEYS[0], raising=False)
    monkeypatch.setenv(KEYS[1], "1")  # a user's value comes back afterwards
    lines = []
    with engine_on_every_core(lines.append):
        cores = os.environ[KEYS[0]].split(",")
        assert sorted(int(c) for c in cores) == sorted(os.sched_getaffinity(0))
        assert os.environ[KEYS[1]] == "0"
    assert KEYS[0] not in os.environ and os.environ[KEYS[1]] == "1"
    assert lines and "VLLM_CPU_OMP_THREADS_BIND" in lines[0]


def test_eval_binding_leaves_a_users_choice(monkeypatch):
    monkeypatch.setenv(KEYS[0], "0")
    monkeypatch.delenv(KEYS[1], raising=False)
    with engine_on_every_core(print):
        assert os.environ[KEYS[0]] == "0" and KEYS[1] not in os.environ
    assert os.environ[KEYS[0]] == "0"

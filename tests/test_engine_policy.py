"""The request policy is each engine's own: two offline engines in one process, one given a
policy and one in the plain-vLLM form (which is served safe when its config does not say),
refuse what their policy refuses while an open engine beside them serves it."""

import pytest
from engine_helpers import ENGINE_KW, shutdown

pytestmark = pytest.mark.engine

PROMPT = "Question: What did the river do? Answer:"


def greedy(llm, extra=None, **kw):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, extra_args=extra, **kw)
    return list(llm.generate([PROMPT], sp, use_tqdm=False)[0].outputs[0].token_ids)


@pytest.fixture(scope="module")
def engines(tiny_llama, llama_adapter):
    import vllm

    import uld_vllm
    from uld_vllm.engine.request_controls import FQCN
    from uld_vllm.engine.settings import v1_model_runner

    kw = dict(ENGINE_KW, max_model_len=256)
    made = {}
    try:
        made["open"] = uld_vllm.LLM(str(tiny_llama), uld_adapter=str(llama_adapter),
                                    uld_alpha=0.8, uld_filter_ratio=0.1, **kw)
        made["strengthen"] = uld_vllm.LLM(
            str(tiny_llama), uld_adapter=str(llama_adapter), uld_alpha=0.8,
            uld_filter_ratio=0.1, uld_request_policy="strengthen", uld_alpha_range=(0.8, 3),
            **kw)
        with v1_model_runner():
            made["plain_form"] = vllm.LLM(
                str(tiny_llama), hf_overrides={"architectures": ["UldLlamaForCausalLM"]},
                additional_config={"uld": {"adapter": str(llama_adapter), "alpha": 0.8,
                                           "filter_ratio": 0.1}},
                logits_processors=[FQCN], **kw)
        yield made
    finally:
        for llm in made.values():
            shutdown(llm)


def refused(llm, extra, **kw) -> str:
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError) as e:
        greedy(llm, extra, **kw)
    return str(e.value)


def test_the_open_engine_serves_the_target_the_guarded_ones_refuse(engines, tiny_llama):
    from uld_vllm.core.reference import ReferenceDecoder

    target = ReferenceDecoder.load(tiny_llama).generate([PROMPT], max_new_tokens=6,
                                                        ignore_eos=True)[0].token_ids
    assert greedy(engines["open"], {"uld_alpha": 0}) == target
    for name in ("strengthen", "plain_form"):
        msg = refused(engines[name], {"uld_alpha": 0})
        assert "uld_alpha 0 is below the served 0.8" in msg and "--uld-request-policy any" \
            in msg
        assert "uld_mode 'score'" in refused(engines[name], {"uld_mode": "score"})


def test_stronger_requests_are_served_and_the_range_bounds_them(engines):
    llm = engines["strengthen"]
    assert greedy(llm, {"uld_alpha": 2.0}) == greedy(engines["open"], {"uld_alpha": 2.0})
    assert greedy(llm, {"uld_alpha": 0.8, "uld_mode": "generate"}) == greedy(llm)
    assert "[0.8, 3]" in refused(llm, {"uld_alpha": 3.5})
    # prompt_logprobs use the engine's values: asking for them is fine, with uld_* keys not
    assert "prompt_logprobs" in refused(llm, {"uld_alpha": 2.0}, prompt_logprobs=1)
    assert len(greedy(llm, prompt_logprobs=1)) == 6  # and the engine still serves

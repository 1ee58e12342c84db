"""Every channel of an offline ULD engine that reports a distribution reports the ULD one,
never the target's: sample log-probs and top log-probs, prompt log-probs, each
``logprobs_mode``, n > 1 samples, beam search; checked against the two-model reference
decoder (and shown to differ from the target alone).

The engines run the paper's rule (no gate): it moves every row, so each channel is shown to
differ from the target on most positions. The default gated rule gives the barely trained test
assistant little weight; its exactness is tests/test_engine.py's."""

import pytest
import torch
from engine_helpers import ENGINE_KW, PROMPTS, shutdown

from uld_vllm.core.reference import ReferenceDecoder

pytestmark = pytest.mark.engine

MODES = ["raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"]
TEMPERATURE = 0.7  # makes the processed modes differ from the raw ones
STEPS = 6
TOL = 2e-4
RULE = dict(penalty="logit", gate=None)


@pytest.fixture(scope="module")
def refs(tiny_llama, llama_adapter):
    return {"uld": ReferenceDecoder.load(tiny_llama, llama_adapter, alpha=0.8,
                                         filter_ratio=0.1, **RULE),
            "target": ReferenceDecoder.load(tiny_llama)}


def expected(ref, ids, mode):
    """What ``mode`` reports for the token after ``ids`` under ``ref``'s distribution."""
    scores = ref.next_token_scores(ids, [])
    if mode.startswith("processed"):
        scores = scores / TEMPERATURE
    return scores if mode.endswith("logits") else torch.log_softmax(scores, -1)


def close(got: float, want: float) -> bool:
    if want == float("-inf"):
        return got == float("-inf") or got <= -9999  # vLLM's JSON clamp, for the record
    return abs(got - want) <= TOL + TOL * abs(want)


@pytest.fixture(scope="module")
def runs(tiny_llama, llama_adapter):
    """One engine per logprobs_mode: sampled + greedy requests with sample and prompt
    log-probs; the raw_logprobs engine also runs a beam search."""
    from vllm import SamplingParams
    from vllm.sampling_params import BeamSearchParams

    import uld_vllm

    out = {}
    for mode in MODES:
        llm = uld_vllm.LLM(str(tiny_llama), uld_adapter=str(llama_adapter), uld_alpha=0.8,
                           uld_filter_ratio=0.1, uld_penalty="logit", uld_gate="off",
                           logprobs_mode=mode, **ENGINE_KW)
        try:
            sp = SamplingParams(max_tokens=STEPS, temperature=TEMPERATURE, seed=4, n=3,
                                logprobs=3, prompt_logprobs=3, ignore_eos=True)
            out[mode] = llm.generate(PROMPTS[:2], sp, use_tqdm=False)
            if mode == "raw_logprobs":
                out["beams"] = llm.beam_search(
                    [{"prompt": p} for p in PROMPTS[:2]],
                    BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True))
        finally:
            shutdown(llm)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_sample_and_top_logprobs_are_the_uld_distribution(runs, refs, mode):
    mismatched_target = 0
    for out in runs[mode]:
        assert len(out.outputs) == 3  # n samples, each checked
        for c in out.outputs:
            ids = list(out.prompt_token_ids)
            for step, tok in enumerate(c.token_ids):
                want = expected(refs["uld"], ids, mode)
                target = expected(refs["target"], ids, mode)
                entries = c.logprobs[step]
                assert tok in entries and len(entries) >= 3
                assert want[tok] > float("-inf")  # never a token ULD filtered out
                for t, lp in entries.items():
                    assert close(lp.logprob, float(want[t])), (mode, step, t)
                    mismatched_target += not close(lp.logprob, float(target[t]))
                ids.append(tok)
    assert mismatched_target > 10  # the target's values would not have passed


@pytest.mark.parametrize("mode", MODES)
def test_prompt_logprobs_are_the_uld_distribution(runs, refs, mode):
    # vLLM applies no sampling processors to prompt tokens: processed_* report raw values
    raw = mode.replace("processed", "raw")
    mismatched_target = 0
    for out in runs[mode]:
        ids = list(out.prompt_token_ids)
        assert out.prompt_logprobs[0] is None
        for pos in range(1, len(ids)):
            want = expected(refs["uld"], ids[:pos], raw)
            target = expected(refs["target"], ids[:pos], raw)
            for t, lp in out.prompt_logprobs[pos].items():
                assert close(lp.logprob, float(want[t])), (mode, pos, t)
                mismatched_target += not close(lp.logprob, float(target[t]))
    assert mismatched_target > 10


def test_beam_search_scores_beams_with_the_uld_distribution(runs, refs):
    mismatched_target = 0
    for out, prompt in zip(runs["beams"], PROMPTS[:2], strict=True):
        n_prompt = len(refs["uld"].encode(prompt))
        assert len(out.sequences) == 3
        for seq in out.sequences:
            gen = seq.tokens[n_prompt:]
            assert len(gen) == 4
            lps = [float(expected(refs["uld"], seq.tokens[:n_prompt + i], "raw_logprobs")[t])
                   for i, t in enumerate(gen)]
            assert all(lp > float("-inf") for lp in lps)  # no filtered-out token in a beam
            assert seq.cum_logprob == pytest.approx(sum(lps), abs=1e-3)
            target = sum(float(expected(refs["target"], seq.tokens[:n_prompt + i],
                                        "raw_logprobs")[t]) for i, t in enumerate(gen))
            mismatched_target += abs(seq.cum_logprob - target) > 1e-2
    assert mismatched_target >= 4

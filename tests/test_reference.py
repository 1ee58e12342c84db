"""The HF reference decoder: the oracle the vLLM engine is checked against."""

import pytest
import torch

from uld_vllm.core.reference import ReferenceDecoder

PROMPTS = ["The author wrote", "Hello", "Question: What did the river do? Answer:",
           "In 1907 a quiet librarian studied the history of science and"]


@pytest.fixture(scope="module")
def uld(tiny_llama, llama_adapter):
    return ReferenceDecoder.load(tiny_llama, llama_adapter, alpha=0.8, filter_ratio=0.1)


def test_alpha_zero_reproduces_plain_hf_greedy(tiny_llama, llama_adapter):
    dec = ReferenceDecoder.load(tiny_llama, llama_adapter, alpha=0.0)
    outs = dec.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    tok = dec.tokenizer
    for p, o in zip(PROMPTS, outs):  # one prompt at a time: HF's own unpadded greedy path
        enc = tok(p, return_tensors="pt")
        ref = dec.target.generate(**enc, max_new_tokens=12, do_sample=False,
                                  min_new_tokens=12)[0, enc.input_ids.shape[1]:]
        assert o.token_ids == ref.tolist()


def test_uld_changes_the_output(uld, tiny_llama):
    plain = ReferenceDecoder.load(tiny_llama)
    a = [o.token_ids for o in uld.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)]
    b = [o.token_ids for o in plain.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)]
    assert a != b


def test_shared_tensor_assistant_equals_explicit_merged_copy(uld, tiny_llama, llama_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # the assistant's frozen parts are the target's tensors, not copies
    base = uld.assistant.get_base_model()
    assert base.model.embed_tokens.weight is uld.target.model.embed_tokens.weight
    assert base.lm_head.weight is uld.target.lm_head.weight
    assert base.model.norm.weight is uld.target.model.norm.weight
    q = base.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight is uld.target.model.layers[0].self_attn.q_proj.weight
    # the target itself carries no LoRA
    assert type(uld.target.model.layers[0].self_attn.q_proj) is torch.nn.Linear

    explicit = AutoModelForCausalLM.from_pretrained(tiny_llama, num_hidden_layers=2,
                                                    dtype=torch.float32)
    assert len(explicit.model.layers) == 2
    merged = PeftModel.from_pretrained(explicit, str(llama_adapter)).merge_and_unload().eval()
    ids = uld.tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        got = uld.assistant(input_ids=ids).logits
        want = merged(input_ids=ids).logits
        tgt = uld.target(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - tgt).abs().max() > 1e-2  # the LoRA matters


def test_scoring_matches_generation_step_distribution(uld):
    outs = uld.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)
    scored = uld.score(PROMPTS, [o.token_ids for o in outs], mode="generate")
    for o, s in zip(outs, scored):
        assert s.shape == (10,)
        torch.testing.assert_close(s, torch.tensor(o.logprobs), atol=1e-4, rtol=1e-4)
        assert torch.isfinite(s).all()


def test_score_mode_is_the_full_vocabulary_softmax(uld):
    ids = uld.tokenizer(PROMPTS[0]).input_ids
    cont = uld.tokenizer(" wrote about the river").input_ids
    (s,) = uld.score([ids], [cont], mode="score")
    with torch.no_grad():
        full = torch.tensor([ids + cont])
        t = uld.target(input_ids=full).logits[0].float()
        a = uld.assistant(input_ids=full).logits[0].float()
    from uld_vllm import uld_logits

    rows = slice(len(ids) - 1, len(ids) + len(cont) - 1)
    comb = uld_logits(t[rows], a[rows], alpha=0.8, filter_ratio=0.1, mode="score",
                      penalty=uld.penalty, gate=uld.gate)
    want = torch.log_softmax(comb, -1).gather(-1, torch.tensor(cont)[:, None])[:, 0]
    torch.testing.assert_close(s, want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(s).all()  # score semantics never give -inf to a real token


def test_sampling_is_reproducible_with_a_seed_and_varies_without(uld):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, ignore_eos=True)
    a = [o.token_ids for o in uld.generate(PROMPTS, seed=123, **kw)]
    b = [o.token_ids for o in uld.generate(PROMPTS, seed=123, **kw)]
    c = [o.token_ids for o in uld.generate(PROMPTS, seed=321, **kw)]
    assert a == b
    assert a != c


def test_sampled_tokens_respect_the_plausibility_filter(uld):
    # at temperature 1 a sampled token must be in the kept set of its step: its ULD
    # generation log-prob is finite
    outs = uld.generate(PROMPTS, max_new_tokens=8, temperature=1.5, seed=1, ignore_eos=True)
    for o in outs:
        assert all(lp > float("-inf") for lp in o.logprobs)


def test_batched_generation_equals_one_by_one(uld):
    batched = [o.token_ids for o in uld.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)]
    single = [uld.generate([p], max_new_tokens=10, ignore_eos=True)[0].token_ids
              for p in PROMPTS]
    assert batched == single

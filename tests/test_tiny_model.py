"""make-tiny-model: deterministic, loads in transformers and in vLLM, and generates."""

import gc
import hashlib

import pytest
import torch

from uld_vllm.dev.tiny import make_tiny_model
from uld_vllm.errors import UldError


def digest(folder):
    h = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def test_same_seed_same_files_other_seed_other_weights(tmp_path):
    a = make_tiny_model(tmp_path / "a", seed=5, layers=2)
    b = make_tiny_model(tmp_path / "b", seed=5, layers=2)
    c = make_tiny_model(tmp_path / "c", seed=6, layers=2)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_loads_in_transformers_and_generates(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = make_tiny_model(tmp_path / arch, arch=arch, layers=2, kv_heads=2, vocab=700,
                          tie_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == arch and model.config.num_key_value_heads == 2
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(tok) == 700 == model.config.vocab_size
    text = "The young poet returned to the streets of Cairo."
    assert tok.decode(tok(text).input_ids) == text
    ids = model.generate(**tok("The author", return_tensors="pt"), max_new_tokens=5,
                         do_sample=False, min_new_tokens=5)
    assert ids.shape[1] == len(tok("The author").input_ids) + 5
    # every id the model can emit decodes (the vocab is padded with reserved tokens)
    assert all(tok.decode([i]) for i in range(700))


def test_custom_corpus(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("zyxwv zyxwv zyxwv qqq\n" * 50)
    from transformers import AutoTokenizer

    out = make_tiny_model(tmp_path / "m", corpus_file=corpus, layers=1)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok("zyxwv").input_ids) == 1  # learned from the given corpus
    assert tok.decode([1023]) == "<|reserved_1023|>"  # padded up to the model's vocab


def test_bad_shapes_are_one_line_errors(tmp_path):
    with pytest.raises(UldError, match="unknown architecture"):
        make_tiny_model(tmp_path / "x", arch="gpt2")
    with pytest.raises(UldError, match="multiple of heads"):
        make_tiny_model(tmp_path / "x", hidden=100, heads=3)
    with pytest.raises(UldError, match="empty"):
        (tmp_path / "empty.txt").write_text("")
        make_tiny_model(tmp_path / "x", corpus_file=tmp_path / "empty.txt")


@pytest.mark.engine
def test_loads_in_vllm_and_matches_hf_greedy(tiny_llama, tiny_qwen2):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    prompts = ["The author wrote", "Question: What did the river do? Answer:"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for folder in (tiny_llama, tiny_qwen2):
        llm = LLM(str(folder), dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
        outs = llm.generate(prompts, params, use_tqdm=False)
        del llm
        gc.collect()
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder)
        for p, o in zip(prompts, outs):
            enc = tok(p, return_tensors="pt")
            want = hf.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            assert list(o.outputs[0].token_ids) == want[0, enc.input_ids.shape[1]:].tolist()

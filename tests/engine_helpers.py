"""Shared pieces of the vLLM engine tests (not a test module)."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# lets llm.apply_model / collective_rpc ship uld_vllm.engine.inspect functions to the worker
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

# mixed lengths; several share long prefixes so prefix caching has something to hit
_STORY = ("The author wrote about the northern sea in 1907. Her father studied the history of "
          "science and the young poet returned to the streets of Cairo in 1921.")
PROMPTS = [
    "Hello",
    "The author wrote",
    "Question: What did the river do? Answer:",
    "In 1907 a quiet librarian studied the history of science and",
    _STORY,
    _STORY + " Question: Where was the poet born?",
    _STORY + " Every reader never forgot",
    "12 13 14 15",
    "An old sailor dreamed of mountain villages",
    "The committee published a book on the art of translation in 1950. " * 3,
]
ENGINE_KW = dict(dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
# block_size 32 (CPU default 128) so the ~40-token shared prefixes fill cacheable blocks
CHUNKED_KW = dict(enable_prefix_caching=True, enable_chunked_prefill=True,
                  max_num_batched_tokens=16, max_num_seqs=16, block_size=32)
NEAR_TIE = 1e-4


def shutdown(llm) -> None:
    """Stop the engine processes now (not at interpreter exit), freeing cores and KV memory."""
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def assert_greedy_matches(engine_tokens, ref, prompts, max_new_tokens) -> int:
    """Token-identical greedy outputs, except after a near-tie that the reference shows.

    Returns the number of near-tie divergences (each asserted: top-2 margin < 1e-4 in the
    reference at the first differing step), so callers can also bound it.
    """
    want = ref.generate(prompts, max_new_tokens=max_new_tokens, ignore_eos=True)
    ties = 0
    for p, got, w in zip(prompts, engine_tokens, want, strict=True):
        got = list(got)
        assert len(got) == max_new_tokens
        if got == w.token_ids:
            continue
        j = next(i for i, (a, b) in enumerate(zip(got, w.token_ids)) if a != b)
        scores = ref.next_token_scores(p, w.token_ids[:j])
        top2 = scores.topk(2).values
        margin = float(top2[0] - top2[1])
        assert margin < NEAR_TIE, (
            f"prompt {p[:40]!r}: engine diverges at step {j} ({got[j]} vs {w.token_ids[j]}) "
            f"with a clear reference margin {margin:.3g}")
        ties += 1
    return ties

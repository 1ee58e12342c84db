"""Streaming work through a built engine: results as requests finish, not in input order.

Work is a list of *items* ``{"key": int, "prompt_token_ids": [...]}`` (scoring items also carry
``"start"``: the index of the first scored token). Callers write each result as soon as it
exists; the same item lists run unchanged on N Ray replicas (``uld_vllm.jobs.replicas``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator

from uld_vllm.errors import UldError

GENERATE, SCORE = "generate", "score"


class Progress:
    """A rows bar with tokens/s: generated tokens when generating, scored ones when scoring."""

    def __init__(self, total: int, desc: str, enabled: bool = True, done: int = 0):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, desc=desc, unit="row", disable=not enabled,
                        dynamic_ncols=True)
        self.tokens, self.t0 = 0, time.perf_counter()

    def update(self, rows: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()


def sampling_params(kind: str, sampling: dict | None):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    if kind == SCORE:  # one throw-away token; the answer's log-probs come with the prompt
        return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                              detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)
    return SamplingParams(**(sampling or {}), output_kind=RequestOutputKind.FINAL_ONLY)


def result_of(kind: str, key: int, out, start: int = 0) -> dict:
    """A finished vLLM RequestOutput as a plain dict (what travels back from replicas)."""
    if kind == SCORE:
        ids, lps = out.prompt_token_ids, out.prompt_logprobs
        vals = [lps[i][ids[i]].logprob for i in range(max(start, 1), len(ids))]
        return {"key": key, "logprob_sum": float(sum(vals)), "num_tokens": len(vals)}
    comps = out.outputs
    return {"key": key, "prompt_tokens": len(out.prompt_token_ids or []),
            "texts": [c.text for c in comps],
            "completion_tokens": [len(c.token_ids) for c in comps],
            "finish_reasons": [c.finish_reason for c in comps]}


def result_tokens(kind: str, res: dict) -> int:
    return res["num_tokens"] if kind == SCORE else sum(res["completion_tokens"])


def stream(llm, kind: str, items: Iterable[dict], sampling: dict | None = None,
           progress: Progress | None = None, window: int | None = None) -> Iterator[dict]:
    """Run ``items`` through ``llm``'s engine with continuous batching; yield results as the
    requests finish. At most ``window`` requests wait in the engine at once, so a huge input
    does not all sit in the scheduler (and an interrupted run has little in flight)."""
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = sampling_params(kind, sampling)
    max_seqs = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    window = window or max(64, 4 * max_seqs)
    todo, pending = iter(items), {}
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < window:
                item = next(todo, None)
                if item is None:
                    exhausted = True
                    break
                key = str(item["key"])
                if key in pending:
                    raise UldError(f"work item key {key} appears twice", "keys must be unique")
                try:
                    engine.add_request(
                        key, TokensPrompt(prompt_token_ids=item["prompt_token_ids"]), params)
                except ValueError as exc:  # e.g. longer than the model's context
                    msg = " ".join(str(exc).split())[:300]
                    raise UldError(f"vLLM rejected request {key} ({msg})",
                                   "shorten it or raise --max-model-len") from None
                pending[key] = item
            if not pending:
                return
            for out in engine.step():
                if not out.finished:
                    continue
                item = pending.pop(out.request_id)
                res = result_of(kind, item["key"], out, item.get("start", 0))
                if progress is not None:
                    progress.update(1, result_tokens(kind, res))
                yield res
    finally:
        if pending:  # interrupted: leave the engine clean for the caller's next job
            engine.abort_request(list(pending))


@dataclasses.dataclass
class Job:
    """One kind of work on the engine: ``mode`` switches a ULD engine's semantics first."""

    kind: str
    items: list[dict]
    sampling: dict | None = None
    mode: str | None = None

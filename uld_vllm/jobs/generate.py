"""`uld-vllm generate`: batch generation over a JSONL file (or Hub dataset) through the ULD
engine (plain vLLM without ``--uld-adapter``), with continuous batching.

One output row per input row::

    {"id": ..., "prompt": ..., "generation": ..., "prompt_tokens": n, "completion_tokens": m,
     "finish_reason": "stop" | "length"}

(with ``--n`` > 1, ``generation``, ``completion_tokens`` and ``finish_reason`` are lists).
Rows are appended to ``OUT.partial`` as requests finish; when every row is there, ``OUT`` is
written in input order and the partial file removed. Rerunning the same command after an
interruption skips the rows already written (`uld_vllm.jobs.partial`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from uld_vllm.core.prompts import PromptFormatter
from uld_vllm.core.rows import read_rows
from uld_vllm.errors import UldError
from uld_vllm.jobs.partial import PartialJsonl, key_of
from uld_vllm.jobs.run import run_jobs
from uld_vllm.jobs.spec import add_engine_args, add_model_args, engine_spec, shutdown
from uld_vllm.jobs.stream import GENERATE, Job, Progress


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="batch generation over a JSONL file (ULD or plain)")
    add_model_args(p, "ULD adapter folder (omit: plain vLLM)")
    p.add_argument("--input", required=True,
                   help="JSONL file, one object per line, or Hub dataset NAME[:CONFIG][@SPLIT]")
    p.add_argument("--output", required=True, help="JSONL; complete once it exists")
    p.add_argument("--prompt-field", default="prompt", help="field holding the prompt text")
    p.add_argument("--id-field", default="id", help="field holding the row id (else: index)")
    p.add_argument("--chat-template", dest="chat", action=argparse.BooleanOptionalAction,
                   default=False,
                   help="wrap each prompt as a user message with the tokenizer's chat template")
    p.add_argument("--overwrite", action="store_true",
                   help="start over even if OUT or OUT.partial exists")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    s = p.add_argument_group("sampling (vLLM SamplingParams)")
    s.add_argument("--n", type=int, default=1, help="completions per prompt")
    s.add_argument("--max-tokens", type=int, default=200)
    s.add_argument("--min-tokens", type=int, default=0)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="0: off")
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--ignore-eos", action="store_true")
    add_engine_args(p)
    p.set_defaults(func=run_generate)


def sampling_of(a) -> dict:
    if a.n < 1 or a.max_tokens < 1:
        raise UldError("--n and --max-tokens must be at least 1", "pass positive values")
    return {"n": a.n, "max_tokens": a.max_tokens, "min_tokens": a.min_tokens,
            "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k or 0,
            "min_p": a.min_p, "repetition_penalty": a.repetition_penalty,
            "presence_penalty": a.presence_penalty, "frequency_penalty": a.frequency_penalty,
            "stop": a.stop, "seed": a.seed, "ignore_eos": a.ignore_eos}


def prompts_of(rows: list[dict], source: str, field: str, id_field: str) -> list[tuple]:
    """``(id, prompt)`` per row; ids must be unique (resume finds rows by id)."""
    out, seen = [], set()
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get(field), str):
            raise UldError(f"{source} line {n} has no string field {field!r}",
                           "name the prompt field with --prompt-field")
        rid = row.get(id_field, n - 1)
        if key_of(rid) in seen:
            raise UldError(f"{source} line {n} repeats id {rid!r}",
                           "ids must be unique: fix the data or pick another --id-field")
        seen.add(key_of(rid))
        out.append((rid, row[field]))
    if not out:
        raise UldError(f"{source} holds no rows", "pass a non-empty JSONL file")
    return out


def encode_prompts(model: str, prompts: list[str], chat: bool, revision=None,
                   trust_remote_code=False) -> list[list[int]]:
    """Token ids the way vLLM would make them from text (so resume needs no engine)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, revision=revision,
                                        trust_remote_code=trust_remote_code)
    fmt = PromptFormatter.for_generation(tok, chat, model)
    return [fmt.encode_prompt(p) for p in prompts]


def output_row(rid, prompt: str, res: dict) -> dict:
    one = len(res["texts"]) == 1
    pick = (lambda v: v[0]) if one else (lambda v: v)
    return {"id": rid, "prompt": prompt, "generation": pick(res["texts"]),
            "prompt_tokens": res["prompt_tokens"],
            "completion_tokens": pick(res["completion_tokens"]),
            "finish_reason": pick(res["finish_reasons"])}


def run_generate(a: argparse.Namespace) -> None:
    rows = prompts_of(read_rows(a.input, "input"), f"input {a.input}", a.prompt_field,
                      a.id_field)
    sampling = sampling_of(a)
    spec = engine_spec(a)
    src = str(Path(a.input).resolve()) if Path(a.input).exists() else a.input
    settings = {"model": a.model, "uld_adapter": a.uld_adapter and str(
                Path(a.uld_adapter).resolve()), "uld_alpha": a.uld_alpha,
                "uld_filter_ratio": a.uld_filter_ratio, "input": src,
                "prompt_field": a.prompt_field, "id_field": a.id_field, "chat": a.chat,
                "dtype": a.dtype, "sampling": sampling}
    out = PartialJsonl(a.output, settings, overwrite=a.overwrite)
    if out.complete:
        print(f"{a.output} is already complete; pass --overwrite to generate it again")
        return
    done = out.load()
    ids = {key_of(rid) for rid, _ in rows}
    if set(done) - ids:
        raise UldError(f"{out.partial} holds ids that are not in the input",
                       "pass --overwrite to start over")
    todo = [i for i, (rid, _) in enumerate(rows) if key_of(rid) not in done]
    if done:
        print(f"resuming: {len(done)} of {len(rows)} rows already in {out.partial}",
              file=sys.stderr)
    out.open()
    llm = None
    try:
        if todo:
            token_ids = encode_prompts(a.model, [rows[i][1] for i in todo], a.chat,
                                       spec.vllm_kwargs.get("revision"), a.trust_remote_code)
            items = [{"key": i, "prompt_token_ids": t} for i, t in zip(todo, token_ids)]
            if a.replicas == 1:
                llm = spec.build()
            progress = Progress(len(rows), "generate", a.progress, done=len(done))
            try:
                for _, res in run_jobs(llm or spec, [Job(GENERATE, items, sampling)],
                                       replicas=a.replicas, progress=progress):
                    rid, prompt = rows[res["key"]]
                    out.write(output_row(rid, prompt, res))
            finally:
                progress.close()
        n = out.finish([rid for rid, _ in rows])
    except KeyboardInterrupt:
        out.close()
        sys.exit(f"interrupted: {len(out.done)} of {len(rows)} rows are in {out.partial}; "
                 "rerun the same command to resume")
    finally:
        out.close()
        if llm is not None:
            shutdown(llm)
    print(f"wrote {n} rows to {a.output}")

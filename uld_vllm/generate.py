"""`uld-vllm generate`: batch generation over a JSONL file through the (ULD) vLLM engine.

One output row per input row, in input order::

    {"id": ..., "prompt": ..., "generation": ..., "prompt_tokens": n, "completion_tokens": m,
     "finish_reason": "stop" | "length"}

The output file is written atomically (temporary file + rename): a file at ``--output`` is
always complete.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from uld_vllm.errors import UldError


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="batch generation over a JSONL file (ULD or plain)")
    p.add_argument("--model", required=True, help="target model: hub id or folder")
    p.add_argument("--uld-adapter", default=None, help="ULD adapter folder (omit: plain vLLM)")
    p.add_argument("--uld-alpha", type=float, default=None)
    p.add_argument("--uld-filter-ratio", type=float, default=None)
    p.add_argument("--input", required=True, help="JSONL, one object per line")
    p.add_argument("--output", required=True, help="JSONL written atomically")
    p.add_argument("--prompt-field", default="prompt", help="field holding the prompt text")
    p.add_argument("--id-field", default="id", help="field holding the row id (else: index)")
    p.add_argument("--chat-template", dest="chat", action="store_true",
                   help="wrap each prompt as a user message with the tokenizer's chat template")
    s = p.add_argument_group("sampling (vLLM SamplingParams)")
    s.add_argument("--max-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="0: off")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--ignore-eos", action="store_true")
    e = p.add_argument_group("engine (vLLM EngineArgs)")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--tensor-parallel-size", type=int, default=1)
    e.add_argument("--enforce-eager", action="store_true")
    e.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.set_defaults(func=run_generate)


def read_prompts(path: Path, field: str, id_field: str) -> list[tuple[object, str]]:
    if not path.is_file():
        raise UldError(f"input file {path} does not exist", "pass a JSONL file with --input")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UldError(f"{path} line {n} is not valid JSON ({exc.msg})",
                           "fix that line; the input must be JSON Lines") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise UldError(f"{path} line {n} has no string field {field!r}",
                           "name the prompt field with --prompt-field")
        rows.append((row.get(id_field, len(rows)), row[field]))
    if not rows:
        raise UldError(f"input file {path} holds no rows", "pass a non-empty JSONL file")
    return rows


def run_generate(a: argparse.Namespace) -> None:
    from vllm import SamplingParams

    from uld_vllm.llm import LLM

    rows = read_prompts(Path(a.input), a.prompt_field, a.id_field)
    out = Path(a.output)
    if not out.parent.exists():
        raise UldError(f"output folder {out.parent} does not exist", "create it first")
    kw = {"dtype": a.dtype, "tensor_parallel_size": a.tensor_parallel_size,
          "enforce_eager": a.enforce_eager}
    if a.max_model_len:
        kw["max_model_len"] = a.max_model_len
    if a.gpu_memory_utilization:
        kw["gpu_memory_utilization"] = a.gpu_memory_utilization
    llm = LLM(a.model, uld_adapter=a.uld_adapter, uld_alpha=a.uld_alpha,
              uld_filter_ratio=a.uld_filter_ratio, **kw)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                            top_k=a.top_k if a.top_k > 0 else 0, seed=a.seed,
                            ignore_eos=a.ignore_eos)
    prompts = [p for _, p in rows]
    if a.chat:
        msgs = [[{"role": "user", "content": p}] for p in prompts]
        results = llm.chat(msgs, params, use_tqdm=True)
    else:
        results = llm.generate(prompts, params, use_tqdm=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            for (rid, prompt), r in zip(rows, results, strict=True):
                c = r.outputs[0]
                f.write(json.dumps({
                    "id": rid, "prompt": prompt, "generation": c.text,
                    "prompt_tokens": len(r.prompt_token_ids or []),
                    "completion_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                }) + "\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {len(rows)} rows to {out}")

"""`uld-vllm eval tofu`: TOFU's metrics for a target model, with or without a ULD adapter.

One engine does both halves: teacher-forced scoring of the answer, the paraphrased answer and
every perturbed answer under ULD's *score* semantics (vLLM prompt log-probs), then greedy
generation (ROUGE-L recall) under ULD's *generate* semantics; the mode is switched on the
running engine, so prefixes cached while scoring are reused while generating. With
``--replicas N`` both halves run on N Ray replicas.

Output folder: the four per-split logs in the reference-log JSON format (so this run can be
the ``--retain-reference`` of another), ``eval_log_aggregated.json``, ``aggregated_stat.csv``,
``summary.json``, ``summary.md`` (also printed) and ``summary.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from uld_vllm.errors import UldError
from uld_vllm.eval import metrics as M
from uld_vllm.eval.tofu_data import FORGET_SPLITS, EvalExample, load_sets
from uld_vllm.jobs.run import run_jobs
from uld_vllm.jobs.spec import EngineSpec, add_engine_args, add_model_args, engine_spec, shutdown
from uld_vllm.jobs.stream import GENERATE, SCORE, Job, Progress, result_tokens


def add_tofu_parser(sub) -> None:
    p = sub.add_parser("tofu", help="TOFU forget/retain metrics (ROUGE-L, probability, truth "
                                    "ratio, forget quality, model utility)")
    add_model_args(p, "ULD adapter folder (omit: evaluate the plain target)")
    p.add_argument("--data-dir", default=None,
                   help="folder with TOFU's JSONL files (omit: read locuslab/TOFU from the Hub)")
    p.add_argument("--forget-split", default="forget10", choices=FORGET_SPLITS)
    p.add_argument("--retain-reference", default=None,
                   help="eval-log folder of a retain model on the same forget split (for "
                        "forget quality), e.g. the output of this command for a retain model, "
                        "or a retain model's OpenUnlearning TOFU_EVAL.json (or its folder)")
    p.add_argument("--openunlearning-out", default=None, metavar="DIR",
                   help="also write OpenUnlearning's TOFU_EVAL.json and TOFU_SUMMARY.json "
                        "here (uld_vllm/eval/openunlearning.py lists the keys)")
    p.add_argument("--max-examples", type=int, default=300,
                   help="first N rows of each set (the reference evaluates 300); 0: all")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--prompt-template", default=None,
                   help="prompt with a {question} field; default: the tokenizer's chat "
                        "template if it has one, else '[INST] {question} [/INST]' (as training)")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=DIR",
                   help="add another eval's summary as a column of the table and plot")
    p.add_argument("--output", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_engine_args(p)
    p.set_defaults(func=run_tofu)


def build_items(sets: dict[str, list[EvalExample]], formatter):
    """Scoring and generation work items, and what each key stands for."""
    score, gen, what = [], [], []
    for log_name, examples in sets.items():
        for i, ex in enumerate(examples):
            prompt = formatter.encode_prompt(ex.question)
            gen.append({"key": len(what), "prompt_token_ids": prompt})
            what.append((log_name, i, "generation", 0))
            texts = [("answer", ex.answer), ("paraphrased", ex.paraphrased)]
            texts += [("perturbed", p) for p in ex.perturbed]
            for j, (role, text) in enumerate(texts):
                answer = formatter.encode_answer(text, ex.question, eos=True)
                score.append({"key": len(what), "prompt_token_ids": prompt + answer,
                              "start": len(prompt)})
                what.append((log_name, i, role, j - 2 if role == "perturbed" else 0))
    return score, gen, what


def collect(sets, what, score_results, gen_results, formatter) -> dict[str, dict]:
    """Per-split logs in the reference format from the engine's results."""
    acc = {n: [{"perturbed": [None] * len(ex.perturbed)} for ex in exs]
           for n, exs in sets.items()}
    for res in score_results:
        log_name, i, role, j = what[res["key"]]
        val = (res["logprob_sum"], res["num_tokens"])
        if role == "perturbed":
            acc[log_name][i]["perturbed"][j] = val
        else:
            acc[log_name][i][role] = val
    for res in gen_results:
        log_name, i, _, _ = what[res["key"]]
        acc[log_name][i]["generation"] = res["texts"][0]
    logs = {}
    for log_name, examples in sets.items():
        rows = []
        for ex, a in zip(examples, acc[log_name]):
            rows.append(M.ExampleScores(
                prompt=formatter.prompt_text(ex.question), generation=a["generation"],
                answer=ex.answer, answer_logprob=a["answer"][0], answer_tokens=a["answer"][1],
                paraphrased_logprob=a["paraphrased"][0],
                paraphrased_tokens=a["paraphrased"][1],
                perturbed_logprobs=[p[0] for p in a["perturbed"]],
                perturbed_tokens=[p[1] for p in a["perturbed"]]))
        logs[log_name] = M.build_split_log(rows)
    return logs


def evaluate(spec: EngineSpec, sets, formatter, *, max_new_tokens: int = 200,
             replicas: int = 1, progress: bool = True) -> tuple[dict, dict]:
    """Run scoring and generation; returns (logs by file name, timings in seconds)."""
    score, gen, what = build_items(sets, formatter)
    uld = spec.uld_adapter is not None
    timings = {}
    t0 = time.perf_counter()
    llm = spec.build() if replicas == 1 else None
    timings["engine_start_s"] = time.perf_counter() - t0
    jobs = [Job(SCORE, score, None, SCORE if uld else None),
            Job(GENERATE, gen, {"max_tokens": max_new_tokens, "temperature": 0.0},
                GENERATE if uld else None)]
    results = {SCORE: [], GENERATE: []}
    bar = Progress(len(score) + len(gen), "eval (score, then generate)", progress)
    t = time.perf_counter()
    try:
        for j, res in run_jobs(llm or spec, jobs, replicas=replicas, progress=bar):
            kind = jobs[j].kind
            if replicas == 1 and kind == GENERATE and not results[GENERATE]:
                timings["score_s"] = time.perf_counter() - t  # one engine: scoring is done
            results[kind].append(res)
    finally:
        bar.close()
        if llm is not None:
            shutdown(llm)
    timings["work_s"] = time.perf_counter() - t
    if replicas == 1:  # replicas interleave the two phases
        timings.setdefault("score_s", timings["work_s"])
        timings["generate_s"] = timings["work_s"] - timings["score_s"]
    for kind in (SCORE, GENERATE):
        timings[f"{kind}_requests"] = len(results[kind])
        timings[f"{kind}_tokens"] = sum(result_tokens(kind, r) for r in results[kind])
    timings["total_s"] = time.perf_counter() - t0
    return collect(sets, what, results[SCORE], results[GENERATE], formatter), timings


def _compare(specs: list[str]) -> dict[str, dict]:
    out = {}
    for s in specs:
        name, sep, folder = s.partition("=")
        path = Path(folder) / "summary.json"
        if not sep or not path.is_file():
            raise UldError(f"--compare {s!r} is not NAME=DIR with DIR/summary.json",
                           "pass e.g. --compare target=runs/target_eval")
        out[name] = json.loads(path.read_text())["metrics"]
    return out


def run_tofu(a: argparse.Namespace) -> None:
    """`uld-vllm eval tofu`: the parsed flags to ``tofu_eval``."""
    tofu_eval(engine_spec(a), a.output, data_dir=a.data_dir, forget_split=a.forget_split,
              retain_reference=a.retain_reference, openunlearning_out=a.openunlearning_out,
              max_examples=a.max_examples, max_new_tokens=a.max_new_tokens,
              prompt_template=a.prompt_template, compare=a.compare, overwrite=a.overwrite,
              replicas=a.replicas, progress=a.progress)


def tofu_eval(spec: EngineSpec, output, *, data_dir=None, forget_split: str = "forget10",
              retain_reference=None, openunlearning_out=None, max_examples: int = 300,
              max_new_tokens: int = 200, prompt_template: str | None = None,
              compare=(), overwrite: bool = False, replicas: int = 1, progress: bool = True,
              log=print) -> dict:
    """TOFU's metrics for the engine ``spec`` builds, written to ``output``; returns the
    summary. Every argument is the flag of the same name."""
    from transformers import AutoTokenizer

    from uld_vllm.core.adapter import atomic_output_dir, load_adapter
    from uld_vllm.core.prompts import PromptFormatter

    if max_new_tokens < 1:
        raise UldError("--max-new-tokens must be at least 1", "pass a positive number")
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:  # before minutes of work
        raise UldError(f"output folder {out} already exists and is not empty",
                       "choose another --output or pass --overwrite")
    from uld_vllm.eval import openunlearning as OU

    ou_out = Path(openunlearning_out) if openunlearning_out else None
    if ou_out is not None and not overwrite and any(
            (ou_out / f).exists() for f in (OU.EVAL_FILE, OU.SUMMARY_FILE)):
        raise UldError(f"{ou_out} already holds OpenUnlearning result files",
                       "choose another --openunlearning-out or pass --overwrite")
    ou_reference = bool(retain_reference) and OU.is_openunlearning(retain_reference)
    reference = M.load_log_dir(retain_reference) \
        if retain_reference and not ou_reference else None
    compare = _compare(compare)
    sets, sources = load_sets(forget_split, data_dir, max_examples or None)
    if ou_reference:
        reference = OU.load_reference(retain_reference, [ex.question for ex in sets[M.FORGET]])
    kw = spec.vllm_kwargs
    tok = AutoTokenizer.from_pretrained(spec.model, revision=kw.get("revision"),
                                        trust_remote_code=kw.get("trust_remote_code", False))
    formatter = PromptFormatter(tok, prompt_template)
    if reference is not None:  # now, not after minutes of scoring and generation
        stub = {"avg_gt_loss": [0.0] * len(sets[M.FORGET]),
                "generated_text": [[formatter.prompt_text(ex.question), "", ex.answer]
                                   for ex in sets[M.FORGET]]}
        M.reference_for(stub, reference[M.FORGET])
    logs, timings = evaluate(spec, sets, formatter, max_new_tokens=max_new_tokens,
                             replicas=replicas, progress=progress)
    metrics = M.aggregate(logs, reference)
    name = "ULD" if spec.uld_adapter else "target"
    warning = load_adapter(spec.uld_adapter).config.warning if spec.uld_adapter else None
    summary = {
        "run": name, "model": spec.model, "uld_adapter": spec.uld_adapter,
        "uld_alpha": spec.uld_alpha, "uld_filter_ratio": spec.uld_filter_ratio,
        "uld_rule": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.uld_rule.items()},
        "forget_split": forget_split, "max_examples": max_examples,
        "examples": {k: len(v) for k, v in sets.items()}, "sources": sources,
        "retain_reference": None if retain_reference is None else str(retain_reference),
        "prompt_format": formatter.description, "max_new_tokens": max_new_tokens,
        "replicas": replicas, "engine": spec.vllm_kwargs, "timings": timings,
        "adapter_warning": warning, "metrics": metrics}
    table = M.markdown_table({name: metrics, **compare})
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        M.write_log_dir(logs, tmp)
        M.write_summary_csv(metrics, tmp / "aggregated_stat.csv")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        (tmp / "summary.md").write_text(table + "\n")
        M.plot_summary({name: metrics, **compare}, tmp / "summary.png")
    if ou_out is not None:
        OU.write_openunlearning(logs, ou_out, reference[M.FORGET] if reference else None)
    log(table)
    log(f"\n{name}: model utility {metrics['Model Utility']:.4f}" + (
        f", forget quality {metrics['Forget Quality']:.3g}" if reference else
        " (no --retain-reference: forget quality not computed)"))
    if warning:
        log(f"WARNING: this adapter did not converge in training: {warning}")
    log(f"eval took {timings['total_s']:.1f} s (engine start {timings['engine_start_s']:.1f} "
        f"s, then scoring and generation {timings['work_s']:.1f} s); wrote {out}")
    return summary

"""TOFU metrics from per-example eval logs kept in the reference's own JSON format.

The aggregation follows the code that produced the shipped retain90 ``aggregated_stat.csv``,
which is the ground truth here. One place where it differs from locuslab/tofu's
``aggregate_eval_stat.py``: probability is the plain ``exp(-avg NLL)`` on the retain split only,
while forget, real authors and world facts use ``p_true / (p_true + sum p_perturbed)``. TOFU's
test ``'eval_log' in name`` would also give forget the plain form, which yields 0.1436 instead of
the CSV's 0.3636 on the retain90 logs.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from uld_vllm.errors import UldError

RETAIN = "eval_log.json"
FORGET = "eval_log_forget.json"
REAL_AUTHORS = "eval_real_author_wo_options.json"
WORLD_FACTS = "eval_real_world_wo_options.json"
AGGREGATED = "eval_log_aggregated.json"
LOG_FILES = (RETAIN, REAL_AUTHORS, WORLD_FACTS, FORGET)
SPLIT_LABELS = {RETAIN: "Retain", REAL_AUTHORS: "Real Authors", WORLD_FACTS: "Real World",
                FORGET: "Forget"}
SPLIT_METRICS = ("ROUGE", "Probability", "Truth Ratio")
FQ_KEYS = ("Forget Quality", "KS Test PVal Forget", "KS Test Forget")
COLUMNS = (tuple(f"{SPLIT_LABELS[f]} {m}" for f in LOG_FILES for m in SPLIT_METRICS)
           + ("Model Utility",) + FQ_KEYS)
LOG_KEYS = ("avg_gt_loss", "gt_loss", "num_token_gt", "rouge1_recall", "rougeL_recall",
            "average_perturb_loss", "avg_paraphrased_loss", "paraphrased_loss", "perturb_loss",
            "num_token_paraphrased", "num_token_perturb", "generated_text")
_NEEDED = ("avg_gt_loss", "rougeL_recall", "average_perturb_loss", "avg_paraphrased_loss")
_FIX_LOG = "pass a TOFU eval log (a JSON object of per-example lists, like eval_log_forget.json)"
_FIX_REF = "pass the retain reference for the same forget split"

Log = dict[str, list]


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_l_recall(generation: str, answer: str) -> float:
    """ROUGE-L recall of ``generation`` against ``answer`` (stemmed), as TOFU scores answers."""
    # score(target, prediction): recall is measured over the answer's tokens
    return _scorer().score(answer, generation)["rougeL"].recall


def rouge_recalls(generations: Sequence[str], answers: Sequence[str]) -> dict[str, list[float]]:
    """Per-example ``rouge1_recall`` and ``rougeL_recall`` lists, keyed as in the eval logs."""
    if len(generations) != len(answers):
        raise UldError(f"{len(generations)} generations but {len(answers)} answers",
                       "pass one generation per answer")
    out: dict[str, list[float]] = {"rouge1_recall": [], "rougeL_recall": []}
    for gen, ans in zip(generations, answers):
        scores = _scorer().score(ans, gen)
        out["rouge1_recall"].append(scores["rouge1"].recall)
        out["rougeL_recall"].append(scores["rougeL"].recall)
    return out


@dataclasses.dataclass
class ExampleScores:
    """One evaluated question: its texts and the log-probabilities summed over answer tokens."""

    prompt: str
    generation: str
    answer: str
    answer_logprob: float
    answer_tokens: int
    paraphrased_logprob: float
    paraphrased_tokens: int
    perturbed_logprobs: Sequence[float]
    perturbed_tokens: Sequence[int]


def _loss(logprob: float, tokens: Any, what: str, i: int) -> float:
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
        raise UldError(f"example {i}: {what} token count {tokens!r} is not a positive integer",
                       "pass how many answer tokens the log-prob sum covers")
    lp = float(logprob)
    # a positive sum means a loss was passed where a log-prob belongs (the sign flips metrics)
    if math.isnan(lp) or lp > 1e-3:
        raise UldError(f"example {i}: {what} log-prob sum {lp} is positive or NaN",
                       "pass the sum of the answer tokens' log-probabilities (<= 0), not a loss")
    return max(0.0, -lp)


def build_split_log(examples: Sequence[ExampleScores]) -> Log:
    """The eval log of one split, in the reference JSON format (losses are negated log-probs)."""
    if not examples:
        raise UldError("no examples to log", "evaluate at least one example")
    log: Log = {k: [] for k in LOG_KEYS}
    n_perturbed = len(examples[0].perturbed_logprobs)
    for i, ex in enumerate(examples):
        if len(ex.perturbed_logprobs) != len(ex.perturbed_tokens) or not ex.perturbed_tokens:
            raise UldError(f"example {i}: {len(ex.perturbed_logprobs)} perturbed log-probs but "
                           f"{len(ex.perturbed_tokens)} token counts",
                           "pass one log-prob sum and one token count per perturbed answer")
        if len(ex.perturbed_tokens) != n_perturbed:
            raise UldError(f"example {i} has {len(ex.perturbed_tokens)} perturbed answers, "
                           f"example 0 has {n_perturbed}",
                           "every example of a split needs the same number of perturbed answers")
        gt = _loss(ex.answer_logprob, ex.answer_tokens, "answer", i)
        para = _loss(ex.paraphrased_logprob, ex.paraphrased_tokens, "paraphrased answer", i)
        pert = [_loss(lp, n, f"perturbed answer {j}", i)
                for j, (lp, n) in enumerate(zip(ex.perturbed_logprobs, ex.perturbed_tokens))]
        log["avg_gt_loss"].append(gt / ex.answer_tokens)
        log["gt_loss"].append(gt)
        log["num_token_gt"].append(int(ex.answer_tokens))
        log["average_perturb_loss"].append([p / n for p, n in zip(pert, ex.perturbed_tokens)])
        log["avg_paraphrased_loss"].append(para / ex.paraphrased_tokens)
        log["paraphrased_loss"].append(para)
        log["perturb_loss"].append(pert)
        log["num_token_paraphrased"].append(int(ex.paraphrased_tokens))
        log["num_token_perturb"].append([int(n) for n in ex.perturbed_tokens])
        log["generated_text"].append([ex.prompt, ex.generation, ex.answer])
    log.update(rouge_recalls([e.generation for e in examples], [e.answer for e in examples]))
    return log


def _as_list(key: str, value: Any, where: str) -> tuple[list, list]:
    if isinstance(value, list):
        return value, list(range(len(value)))
    if isinstance(value, dict):  # retain95's *_new.json keys each metric by example index
        try:
            index = sorted(value, key=int)
        except (TypeError, ValueError):
            raise UldError(f"{where}: {key} is keyed by {next(iter(value))!r}, not example "
                           "indices", _FIX_LOG) from None
        return [value[k] for k in index], [int(k) for k in index]
    raise UldError(f"{where}: {key} is a {type(value).__name__}, not a per-example list", _FIX_LOG)


def check_log(raw: Any, where: str = "eval log") -> Log:
    """Validate one split's log and return it with every metric as a list in example order."""
    if not isinstance(raw, dict):
        raise UldError(f"{where} is not a JSON object", _FIX_LOG)
    if any(k in LOG_FILES for k in raw):
        raise UldError(f"{where} holds several logs keyed by file name (like {AGGREGATED})",
                       "pass one split's log, e.g. its eval_log_forget.json entry")
    missing = [k for k in _NEEDED if k not in raw]
    if missing:
        raise UldError(f"{where} lacks {', '.join(missing)}", _FIX_LOG)
    log: Log = {}
    first, first_index = None, None
    for key in LOG_KEYS:
        if key not in raw:
            continue
        log[key], index = _as_list(key, raw[key], where)
        if first is None:
            first, first_index = key, index
        elif len(log[key]) != len(log[first]):
            raise UldError(f"{where}: {key} has {len(log[key])} entries, {first} "
                           f"{len(log[first])}", _FIX_LOG)
        elif index != first_index:
            raise UldError(f"{where}: {key} and {first} cover different examples", _FIX_LOG)
    if not log[first]:
        raise UldError(f"{where} has no examples", "evaluate at least one example")
    for key, ndim in (("avg_gt_loss", 1), ("avg_paraphrased_loss", 1), ("rougeL_recall", 1),
                      ("average_perturb_loss", 2)):
        try:
            ok = np.asarray(log[key], dtype=float).ndim == ndim
        except (TypeError, ValueError):
            ok = False
        if not ok:
            what = "a list of numbers of one length" if ndim == 2 else "a number"
            raise UldError(f"{where}: {key} is not {what} per example", _FIX_LOG)
    return log


def load_log(path: str | os.PathLike) -> Log:
    """Read one split's eval log (list format or dict keyed by example index)."""
    path = Path(path)
    if not path.is_file():
        raise UldError(f"eval log {path} does not exist", _FIX_LOG)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UldError(f"{path} is not valid JSON ({e})", _FIX_LOG) from None
    return check_log(raw, str(path))


def load_log_dir(directory: str | os.PathLike) -> dict[str, Log]:
    """The four TOFU logs of a folder, keyed by their canonical file names."""
    directory = Path(directory)
    fix = f"pass a folder holding {', '.join(LOG_FILES)}"
    if not directory.is_dir():
        raise UldError(f"eval log folder {directory} does not exist", fix)
    missing = [f for f in LOG_FILES if not (directory / f).is_file()]
    if missing:
        raise UldError(f"{directory} lacks {', '.join(missing)}", fix)
    return {f: load_log(directory / f) for f in LOG_FILES}


def write_log_dir(logs: Mapping[str, Log], directory: str | os.PathLike) -> Path:
    """Write each log under its file name plus eval_log_aggregated.json, as TOFU lays them out."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, log in logs.items():
        (directory / name).write_text(json.dumps(log, indent=4))
    (directory / AGGREGATED).write_text(json.dumps(dict(logs), indent=4))
    return directory


def truth_ratios(log: Mapping[str, Sequence]) -> np.ndarray:
    """Per-example ``R = exp(mean_j avg_perturb_loss_j - avg_paraphrased_loss)``."""
    perturbed = np.asarray(log["average_perturb_loss"], dtype=float).mean(axis=-1)
    with np.errstate(over="ignore"):  # R = inf is a legitimate (if extreme) value
        return np.exp(perturbed - np.asarray(log["avg_paraphrased_loss"], dtype=float))


def truth_ratio_stat(log: Mapping[str, Sequence], *, forget: bool) -> float:
    """Forget: mean ``min(R, 1/R)``; other splits: mean ``max(0, 1 - 1/R)``."""
    r = truth_ratios(log)
    with np.errstate(divide="ignore"):
        if forget:
            return float(np.mean(np.minimum(r, 1 / r)))
        return float(np.mean(np.maximum(0, 1 - 1 / r)))


def probability(log: Mapping[str, Sequence], *, normalised: bool) -> float:
    """Mean ``exp(-avg_gt_loss)``; ``normalised``: mean ``p_true / (p_true + sum p_perturbed)``."""
    p_true = np.exp(-np.asarray(log["avg_gt_loss"], dtype=float))
    if not normalised:
        return float(np.mean(p_true))
    p_false = np.exp(-np.asarray(log["average_perturb_loss"], dtype=float))
    # same summation order as the reference, so the CSV reproduces to the last bits
    p_all = np.concatenate([p_true[:, None], p_false], axis=1).sum(-1)
    return float(np.mean(p_true / p_all))


def rouge_mean(log: Mapping[str, Sequence]) -> float:
    """Mean ROUGE-L recall of a split."""
    return float(np.mean(np.asarray(log["rougeL_recall"], dtype=float)))


def split_metrics(log: Mapping[str, Sequence], name: str) -> dict[str, float]:
    """ROUGE, Probability and Truth Ratio of the split stored under file ``name``."""
    if name not in LOG_FILES:
        raise UldError(f"unknown eval log name {name!r}", f"use one of {', '.join(LOG_FILES)}")
    return {"ROUGE": rouge_mean(log),
            "Probability": probability(log, normalised=name != RETAIN),
            "Truth Ratio": truth_ratio_stat(log, forget=name == FORGET)}


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (a model useless on one axis has no utility)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0 or np.any(v < 0) or np.any(np.isnan(v)):
        raise UldError(f"cannot take the harmonic mean of {list(values)}",
                       "pass non-negative numbers")
    return 0.0 if np.any(v == 0) else float(v.size / np.sum(1.0 / v))


class ForgetQuality(NamedTuple):
    pvalue: float
    statistic: float


def forget_quality(unlearn_r: Sequence[float], retain_r: Sequence[float]) -> ForgetQuality:
    """Two-sample KS test between the unlearned and the retain model's forget truth ratios."""
    from scipy.stats import ks_2samp

    if len(unlearn_r) == 0 or len(retain_r) == 0:
        raise UldError("forget quality needs truth ratios from both models", _FIX_REF)
    res = ks_2samp(np.asarray(unlearn_r, dtype=float), np.asarray(retain_r, dtype=float))
    return ForgetQuality(float(res.pvalue), float(res.statistic))


def _question(prompt: str) -> str:
    for tag in ("<s>", "[INST]", "[/INST]"):
        prompt = prompt.replace(tag, " ")
    return " ".join(prompt.split())


def _differs(a: Any, b: Any) -> bool:
    """Whether two generated_text entries ask different questions."""
    a, b = (e[0] if isinstance(e, (list, tuple)) and e else None for e in (a, b))
    if not isinstance(a, str) or not isinstance(b, str) or not a.strip() or not b.strip():
        return False
    # containment, not equality: the reference wraps questions in Llama-2 tags, a run may not
    qa, qb = _question(a), _question(b)
    return qa not in qb and qb not in qa


def check_same_split(run_forget: Mapping[str, Sequence], reference_forget: Mapping[str, Sequence]
                     ) -> None:
    """Refuse a reference forget log that covers other questions than this run's forget log."""
    n_run, n_ref = len(run_forget["avg_gt_loss"]), len(reference_forget["avg_gt_loss"])
    pairs = zip(run_forget.get("generated_text", []), reference_forget.get("generated_text", []))
    i = next((i for i, (a, b) in enumerate(pairs) if _differs(a, b)), None)
    if n_run != n_ref:
        fix = _FIX_REF if i is not None else \
            f"evaluate the same {n_ref} examples as the reference, or {_FIX_REF}"
        raise UldError(f"the reference log covers {n_ref} examples, this run {n_run}", fix)
    if i is not None:
        a, b = run_forget["generated_text"][i][0], reference_forget["generated_text"][i][0]
        raise UldError(f"the reference forget log asks a different question at example {i} "
                       f"({_question(b)[:60]!r} vs this run's {_question(a)[:60]!r})", _FIX_REF)


def reference_for(run_forget: Mapping[str, Sequence], reference_forget: Log) -> Log:
    """The reference forget log cut to this run's examples: a run over the first M examples
    (--max-examples) is compared with the reference's first M. Raises if they are not the
    same questions (another forget split, another order)."""
    n_run = len(run_forget["avg_gt_loss"])
    if len(reference_forget["avg_gt_loss"]) > n_run:
        reference_forget = {k: v[:n_run] for k, v in reference_forget.items()}
    check_same_split(run_forget, reference_forget)
    return reference_forget


def aggregate(logs: Mapping[str, Mapping[str, Sequence]],
              reference_forget_log: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The aggregated_stat.csv row: 12 split metrics, Model Utility and, given a retain model's
    forget log (or its four logs), Forget Quality with the KS p-value and statistic."""
    missing = [f for f in LOG_FILES if f not in logs]
    if missing:
        raise UldError(f"aggregate lacks the {', '.join(missing)} log",
                       f"pass logs keyed by {', '.join(LOG_FILES)}")
    checked = {f: check_log(logs[f], f) for f in LOG_FILES}
    out: dict[str, float] = {}
    for f in LOG_FILES:
        for metric, value in split_metrics(checked[f], f).items():
            out[f"{SPLIT_LABELS[f]} {metric}"] = value
    out["Model Utility"] = harmonic_mean([out[f"{SPLIT_LABELS[f]} {m}"] for f in LOG_FILES
                                          if f != FORGET for m in SPLIT_METRICS])
    if reference_forget_log is not None:
        ref = reference_forget_log.get(FORGET, reference_forget_log)
        ref = reference_for(checked[FORGET], check_log(ref, "reference forget log"))
        fq = forget_quality(truth_ratios(checked[FORGET]), truth_ratios(ref))
        out.update(zip(FQ_KEYS, (fq.pvalue, fq.pvalue, fq.statistic)))
    return out


def write_summary_csv(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """One header line and one row, columns ordered as the reference aggregated_stat.csv."""
    path = Path(path)
    keys = [c for c in COLUMNS if c in summary] + [k for k in summary if k not in COLUMNS]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        writer.writerow([summary[k] for k in keys])
    return path


def _runs(summaries: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    if not summaries:
        raise UldError("no summaries to show", "pass the output of aggregate()")
    if all(isinstance(v, Mapping) for v in summaries.values()):
        return dict(summaries)
    return {"value": summaries}  # a single bare summary


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    if not isinstance(value, (int, float, np.floating)):
        return str(value)
    v = float(value)
    # p-values span tens of orders of magnitude; fixed point would print them all as 0
    return f"{v:.{digits}f}" if v == 0 or abs(v) >= 10 ** -(digits - 1) else f"{v:.2e}"


def markdown_table(summaries: Mapping[str, Any], *, digits: int = 4) -> str:
    """A markdown table with one row per metric and one column per run ({run: summary}); a bare
    summary renders as a single column."""
    runs = _runs(summaries)
    keys = [c for c in COLUMNS if any(c in s for s in runs.values())]
    keys += [k for s in runs.values() for k in s if k not in COLUMNS and k not in keys]
    lines = ["| metric | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(s.get(k), digits) for s in runs.values())
                     + " |")
    return "\n".join(lines) + "\n"


def plot_summary(summaries: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """PNG bar chart: the 12 split metrics and Model Utility per run, Forget Quality (log scale)
    in a panel of its own."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    runs = _runs(summaries)
    keys = list(COLUMNS[:13])
    fig = Figure(figsize=(15, 5.5), layout="constrained")
    ax, ax_fq = fig.subplots(1, 2, width_ratios=[6, 1])
    x = np.arange(len(keys))
    width = 0.8 / len(runs)
    for i, (name, s) in enumerate(runs.items()):
        vals = [np.nan if s.get(k) is None else float(s[k]) for k in keys]
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(x, keys, rotation=40, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title("TOFU metrics")
    ax.legend()
    fq = [runs[r].get("Forget Quality") for r in runs]
    heights = [v if v is not None and v > 0 else np.nan for v in fq]
    ax_fq.bar(list(runs), heights, color=[f"C{i}" for i in range(len(runs))])
    if any(not math.isnan(h) for h in heights):
        ax_fq.set_yscale("log")
        ax_fq.axhline(0.05, color="grey", linestyle="--", linewidth=1)
    for i, v in enumerate(fq):
        ax_fq.annotate(_fmt(v, 3), (i, 0.5), xycoords=("data", "axes fraction"), ha="center")
    ax_fq.set_title("Forget Quality (KS p)")
    ax_fq.tick_params(axis="x", rotation=40)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path

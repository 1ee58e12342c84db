"""OpenUnlearning's TOFU result files, written from (and read back into) our eval logs.

Format read from github.com/locuslab/open-unlearning (commit d3d7cf9): ``configs/eval/tofu.yaml``
and ``configs/eval/tofu_metrics/*.yaml`` name the metrics; ``src/evals/base.py`` writes
``TOFU_EVAL.json`` (every metric *and* every pre-computed metric it depends on, keys sorted,
each ``{"agg_value": ..., "value_by_index": {"<row index>": {...}}}``) and
``TOFU_SUMMARY.json`` (``{metric: agg_value}`` for the metrics listed in ``tofu.yaml``).

Keys written (prefix ``forget`` = the forget split, ``retain`` = ``retain_perturbed``, ``ra`` =
real authors, ``wf`` = world facts), and where they come from in our per-split logs
(``uld_vllm.eval.metrics``; ``avg_*`` are per-token NLLs of the answer):

* ``{p}_Q_A_Prob``: per row ``{"prob": exp(-avg_gt_loss), "avg_loss": avg_gt_loss}``; agg the
  mean prob. NB: for ``forget`` this is the *plain* probability, while our ``Forget
  Probability`` is normalised over the perturbed answers (TOFU's shipped CSV); ``retain``
  equals our ``Retain Probability``.
* ``{p}_Q_A_PERT_Prob``: per row ``{"prob": [...], "avg_loss": [...]}`` over the perturbed
  answers (``average_perturb_loss``); agg the mean over rows of the row means.
* ``forget_Q_A_PARA_Prob``, ``retain_Q_A_PARA_Prob``: the same from ``avg_paraphrased_loss``.
* ``{p}_Q_A_ROUGE``: per row ``rouge1_recall``, ``rougeL_f1``, ``rougeL_recall``, ``input``
  (our prompt text), ``ground_truth``, ``generation``; agg the mean ``rougeL_recall`` (= our
  ``... ROUGE``).
* ``forget_truth_ratio`` (lower case, as its config's package says), ``retain_Truth_Ratio``,
  ``ra_Truth_Ratio``, ``wf_Truth_Ratio``: per row ``{"score": p_wrong / (p_correct + 1e-10)}``
  with ``p_wrong = exp(-mean_j avg_perturb_loss_j)`` and ``p_correct = exp(-avg_paraphrased_loss)``
  (on ra/wf our eval scores the answer itself as the "paraphrased" answer, as TOFU's configs do,
  which is OpenUnlearning's ``ra_Q_A_Prob``). That score is ``1 / R`` for our
  truth ratio ``R``. agg: forget ``mean(min(s, 1/(s+1e-10)))``, others ``mean(max(0, 1-s))``
  (= our ``... Truth Ratio``).
* ``ra_Q_A_Prob_normalised``, ``wf_Q_A_Prob_normalised``: per row ``{"prob": p / (p + sum
  p_perturbed + 1e-10)}`` (= our ``Real Authors/Real World Probability``).
* ``model_utility``: ``{"agg_value": hmean}`` of the 9 retain/ra/wf values (= our ``Model
  Utility``, up to the 1e-10 terms).
* ``forget_quality``: ``{"agg_value": KS p-value}`` of the forget truth-ratio scores against the
  retain model's (None without a reference, as OpenUnlearning does). The KS test only sees
  ranks, so testing ``1/R`` gives our ``Forget Quality`` (exactly, unless the 1e-10 guard
  reorders two rows whose ratios agree to that precision).

Not written: ``privleak``, ``extraction_strength`` (in ``tofu.yaml``'s list, but they need
membership-inference / per-token statistics this eval does not compute) and the MIA metrics.

``TOFU_SUMMARY.json`` holds ``forget_Q_A_Prob``, ``forget_Q_A_ROUGE``, ``forget_quality``,
``forget_truth_ratio`` and ``model_utility``.

Reading (``--retain-reference`` given a ``TOFU_EVAL.json`` file or a folder holding one): the
retain model's forget truth ratios are rebuilt from ``forget_Q_A_PARA_Prob`` /
``forget_Q_A_PERT_Prob`` (per-row losses) when present, else from ``forget_truth_ratio``'s
scores; that is all forget quality needs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from uld_vllm.errors import UldError
from uld_vllm.eval import metrics as M

EVAL_FILE = "TOFU_EVAL.json"
SUMMARY_FILE = "TOFU_SUMMARY.json"
PREFIX = {M.FORGET: "forget", M.RETAIN: "retain", M.REAL_AUTHORS: "ra", M.WORLD_FACTS: "wf"}
SUMMARY_KEYS = ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_quality", "forget_truth_ratio",
                "model_utility")
UTILITY_KEYS = tuple(f"{p}_{m}" for p in ("retain", "ra", "wf") for m in (
    ("Q_A_Prob" if p == "retain" else "Q_A_Prob_normalised"), "Q_A_ROUGE", "Truth_Ratio"))
_EPS = 1e-10  # OpenUnlearning's guard terms, kept so its numbers are reproduced exactly
_FIX = ("pass OpenUnlearning's TOFU_EVAL.json of a retain model (or a folder holding it), or a "
        "folder of TOFU eval logs")


def _by_index(values) -> dict[str, Any]:
    return {str(i): v for i, v in enumerate(values)}


def _prob_entry(avg_losses) -> dict:
    losses = [float(x) for x in avg_losses]
    return {"agg_value": float(np.mean([math.exp(-x) for x in losses])),
            "value_by_index": _by_index({"prob": math.exp(-x), "avg_loss": x} for x in losses)}


def _pert_entry(avg_losses) -> dict:
    rows = [[float(x) for x in r] for r in avg_losses]
    probs = [[math.exp(-x) for x in r] for r in rows]
    return {"agg_value": float(np.mean([np.mean(p) for p in probs])),
            "value_by_index": _by_index({"prob": p, "avg_loss": r} for p, r in zip(probs, rows))}


def truth_ratio_scores(correct_avg_loss, perturbed_avg_losses) -> np.ndarray:
    """OpenUnlearning's per-row truth-ratio score ``p_wrong / (p_correct + 1e-10)``."""
    wrong = np.exp(-np.asarray(perturbed_avg_losses, dtype=float).mean(axis=-1))
    correct = np.exp(-np.asarray(correct_avg_loss, dtype=float))
    return wrong / (correct + _EPS)


def _rouge_entry(log: Mapping[str, Any]) -> dict:
    scorer = M._scorer()
    texts = log.get("generated_text") or [None] * len(log["rougeL_recall"])
    r1s = log.get("rouge1_recall") or [None] * len(log["rougeL_recall"])
    rows = []
    for r1, rl, text in zip(r1s, log["rougeL_recall"], texts):
        prompt, gen, truth = text if isinstance(text, (list, tuple)) and len(text) == 3 \
            else (None, None, None)
        rows.append({"rouge1_recall": None if r1 is None else float(r1),
                     "rougeL_f1": None if gen is None else
                     scorer.score(truth, gen)["rougeL"].fmeasure,
                     "rougeL_recall": float(rl), "input": prompt, "ground_truth": truth,
                     "generation": gen})
    return {"agg_value": float(np.mean([r["rougeL_recall"] for r in rows])),
            "value_by_index": _by_index(rows)}


def to_openunlearning(logs: Mapping[str, Mapping[str, Any]],
                      reference_forget_log: Mapping[str, Any] | None = None
                      ) -> tuple[dict, dict]:
    """(``TOFU_EVAL.json`` content, ``TOFU_SUMMARY.json`` content) from our four split logs;
    ``reference_forget_log``: the retain model's forget log (ours), for ``forget_quality``."""
    checked = {f: M.check_log(logs[f], f) for f in M.LOG_FILES}
    out: dict[str, Any] = {}
    for name, p in PREFIX.items():
        log = checked[name]
        out[f"{p}_Q_A_Prob"] = _prob_entry(log["avg_gt_loss"])
        out[f"{p}_Q_A_PERT_Prob"] = _pert_entry(log["average_perturb_loss"])
        out[f"{p}_Q_A_ROUGE"] = _rouge_entry(log)
        # the truth ratio's "correct" side is our log's paraphrased loss on every split: on
        # ra/wf our eval scores the answer itself there (what OpenUnlearning's ra_Q_A_Prob is)
        correct = log["avg_paraphrased_loss"]
        if name in (M.FORGET, M.RETAIN):
            out[f"{p}_Q_A_PARA_Prob"] = _prob_entry(log["avg_paraphrased_loss"])
        else:
            p_true = np.exp(-np.asarray(log["avg_gt_loss"], dtype=float))
            p_wrong = np.exp(-np.asarray(log["average_perturb_loss"], dtype=float)).sum(-1)
            norm = p_true / (p_true + p_wrong + _EPS)
            out[f"{p}_Q_A_Prob_normalised"] = {
                "agg_value": float(norm.mean()),
                "value_by_index": _by_index({"prob": float(v)} for v in norm)}
        s = truth_ratio_scores(correct, log["average_perturb_loss"])
        agg = np.mean(np.minimum(s, 1 / (s + _EPS))) if name == M.FORGET else \
            np.mean(np.maximum(0, 1 - s))
        key = "forget_truth_ratio" if name == M.FORGET else f"{p}_Truth_Ratio"
        out[key] = {"agg_value": float(agg),
                    "value_by_index": _by_index({"score": float(v)} for v in s)}
    from scipy.stats import hmean

    out["model_utility"] = {"agg_value": float(hmean([out[k]["agg_value"]
                                                      for k in UTILITY_KEYS]))}
    pvalue = None
    if reference_forget_log is not None:
        ref = M.reference_for(checked[M.FORGET],
                              M.check_log(reference_forget_log, "reference forget log"))
        from scipy.stats import ks_2samp

        ref_s = truth_ratio_scores(ref["avg_paraphrased_loss"], ref["average_perturb_loss"])
        own = np.array([v["score"] for v in out["forget_truth_ratio"]["value_by_index"].values()])
        pvalue = float(ks_2samp(own, ref_s).pvalue)
    out["forget_quality"] = {"agg_value": pvalue}
    out = dict(sorted(out.items()))
    return out, {k: out[k]["agg_value"] for k in SUMMARY_KEYS}


def write_openunlearning(logs, directory: str | os.PathLike,
                         reference_forget_log: Mapping[str, Any] | None = None) -> dict:
    """Write ``TOFU_EVAL.json`` and ``TOFU_SUMMARY.json`` into ``directory``; returns the
    summary."""
    full, summary = to_openunlearning(logs, reference_forget_log)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / EVAL_FILE).write_text(json.dumps(full, indent=4))
    (directory / SUMMARY_FILE).write_text(json.dumps(summary, indent=4))
    return summary


def is_openunlearning(path: str | os.PathLike) -> bool:
    """A ``TOFU_EVAL.json``-style file, or a folder with one and without our forget log."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".json" and path.name != M.FORGET and _looks_like_eval(path)
    return path.is_dir() and (path / EVAL_FILE).is_file() and not (path / M.FORGET).is_file()


def _looks_like_eval(path: Path) -> bool:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and any(k in raw for k in ("forget_truth_ratio",
                                                             "forget_Q_A_PARA_Prob"))


def _entry_rows(raw: Mapping[str, Any], key: str, field: str, where: str) -> list:
    entry = raw.get(key)
    vbi = entry.get("value_by_index") if isinstance(entry, dict) else None
    if not isinstance(vbi, dict) or not vbi:
        raise UldError(f"{where}: {key} has no value_by_index", _FIX)
    try:
        index = sorted(vbi, key=int)
        return [vbi[i][field] for i in index]
    except (TypeError, ValueError, KeyError):
        raise UldError(f"{where}: {key}.value_by_index is not {{row index: {{{field!r}: ...}}}}",
                       _FIX) from None


def load_reference(path: str | os.PathLike, questions: list[str] | None = None) -> dict:
    """A retain model's OpenUnlearning ``TOFU_EVAL.json`` as ``{FORGET: log}`` in our format
    (what ``metrics.aggregate`` takes as a reference). With ``questions`` (this run's forget
    questions, in order), a file whose ROUGE inputs do not contain them is refused."""
    path = Path(path)
    if path.is_dir():
        path = path / EVAL_FILE
    where = str(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UldError(f"cannot read {where} as JSON ({type(e).__name__})", _FIX) from None
    if not isinstance(raw, dict):
        raise UldError(f"{where} is not a JSON object", _FIX)
    if "forget_Q_A_PARA_Prob" in raw and "forget_Q_A_PERT_Prob" in raw:
        para = [float(x) for x in _entry_rows(raw, "forget_Q_A_PARA_Prob", "avg_loss", where)]
        pert = [[float(x) for x in r] for r in _entry_rows(raw, "forget_Q_A_PERT_Prob",
                                                           "avg_loss", where)]
        if len(para) != len(pert):
            raise UldError(f"{where}: forget_Q_A_PARA_Prob and forget_Q_A_PERT_Prob cover "
                           "different rows", _FIX)
    elif "forget_truth_ratio" in raw:
        # only the scores s = 1/R: a zero paraphrased loss and one perturbed loss of log(1/s)
        # give back exactly R = 1/s in metrics.truth_ratios
        scores = [float(x) for x in _entry_rows(raw, "forget_truth_ratio", "score", where)]
        if any(not s > 0 for s in scores):
            raise UldError(f"{where}: forget_truth_ratio has a score <= 0", _FIX)
        para = [0.0] * len(scores)
        pert = [[-math.log(s)] for s in scores]
    else:
        raise UldError(f"{where} has neither forget_truth_ratio nor forget_Q_A_PARA_Prob / "
                       "forget_Q_A_PERT_Prob", _FIX)
    if "forget_Q_A_Prob" in raw:
        gt = [float(x) for x in _entry_rows(raw, "forget_Q_A_Prob", "avg_loss", where)]
    else:
        gt = [0.0] * len(para)
    rouge = [float(x) for x in _entry_rows(raw, "forget_Q_A_ROUGE", "rougeL_recall", where)] \
        if "forget_Q_A_ROUGE" in raw else [0.0] * len(para)
    if questions is not None and "forget_Q_A_ROUGE" in raw:
        inputs = _entry_rows(raw, "forget_Q_A_ROUGE", "input", where)
        for i, (q, inp) in enumerate(zip(questions, inputs)):
            if inp is not None and " ".join(q.split()) not in " ".join(str(inp).split()):
                raise UldError(f"{where}: forget row {i} asks {str(inp)[-60:]!r}, this run "
                               f"{q[:60]!r}", "pass the retain reference for the same forget "
                               "split")
    if not (len(gt) == len(para) == len(rouge)):
        raise UldError(f"{where}: the forget metrics cover different numbers of rows", _FIX)
    log = {"avg_gt_loss": gt, "rougeL_recall": rouge, "average_perturb_loss": pert,
           "avg_paraphrased_loss": para}
    return {M.FORGET: M.check_log(log, where)}

"""The four TOFU eval sets, from the JSONL copies in a folder or from the Hub (`locuslab/TOFU`).

Each set becomes a list of ``EvalExample``: a question, its answer, the answer whose loss is
the truth ratio's denominator ("paraphrased": the paraphrased answer on forget/retain, the
answer itself on real authors / world facts, as TOFU's eval configs do), and the perturbed
answers (5 on forget/retain, 3 on real authors / world facts).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from uld_vllm.core.rows import read_rows
from uld_vllm.errors import UldError
from uld_vllm.eval import metrics as M

HUB_DATASET = "locuslab/TOFU"
FORGET_SPLITS = ("forget01", "forget05", "forget10")


@dataclasses.dataclass
class EvalExample:
    question: str
    answer: str
    paraphrased: str
    perturbed: list[str]


def set_names(forget_split: str) -> dict[str, str]:
    """Log file name -> TOFU config/file stem."""
    if forget_split not in FORGET_SPLITS:
        raise UldError(f"unknown forget split {forget_split!r}",
                       f"use one of {', '.join(FORGET_SPLITS)}")
    return {M.FORGET: f"{forget_split}_perturbed", M.RETAIN: "retain_perturbed",
            M.REAL_AUTHORS: "real_authors_perturbed", M.WORLD_FACTS: "world_facts_perturbed"}


def _rows(data_dir: str | None, stem: str) -> tuple[list[dict], str]:
    if data_dir is None:
        if importlib.util.find_spec("datasets") is None:
            raise UldError(f"without --data-dir the TOFU sets come from the Hub ({HUB_DATASET}),"
                           " and the `datasets` package is not installed",
                           "pip install datasets, or pass --data-dir with TOFU's JSONL files")
        spec = f"{HUB_DATASET}:{stem}@train"
        return read_rows(spec, f"TOFU set {stem}"), spec
    path = Path(data_dir) / f"{stem}.jsonl"
    if not path.is_file():
        raise UldError(f"{path} does not exist",
                       "pass the folder holding the TOFU JSONL files with --data-dir, or omit "
                       f"--data-dir to read {HUB_DATASET} from the Hub")
    return read_rows(str(path), f"TOFU set {stem}"), str(path)


def _example(row: dict, source: str, n: int, paraphrased_field: str | None) -> EvalExample:
    need = ["question", "answer", "perturbed_answer"] + ([paraphrased_field]
                                                         if paraphrased_field else [])
    missing = [k for k in need if k not in row]
    if missing:
        raise UldError(f"{source} row {n} lacks {', '.join(missing)}",
                       "pass TOFU's *_perturbed files (question, answer, perturbed_answer...)")
    pert = row["perturbed_answer"]
    if isinstance(pert, str):
        pert = [pert]
    if not pert or not all(isinstance(p, str) for p in pert):
        raise UldError(f"{source} row {n}: perturbed_answer is not a list of strings",
                       "pass TOFU's *_perturbed files")
    para = row[paraphrased_field] if paraphrased_field else row["answer"]
    return EvalExample(row["question"], row["answer"], para, list(pert))


def load_sets(forget_split: str, data_dir: str | None = None,
              max_examples: int | None = 300) -> tuple[dict[str, list[EvalExample]], dict]:
    """The four sets keyed by log file name (first ``max_examples`` rows of each, as the
    reference evaluates), and where each came from."""
    if max_examples is not None and max_examples < 1:
        raise UldError(f"--max-examples must be at least 1, got {max_examples}",
                       "pass a positive number")
    sets, sources = {}, {}
    for log_name, stem in set_names(forget_split).items():
        rows, source = _rows(data_dir, stem)
        rows = rows[:max_examples] if max_examples else rows
        para = "paraphrased_answer" if log_name in (M.FORGET, M.RETAIN) else None
        sets[log_name] = [_example(r, source, i + 1, para) for i, r in enumerate(rows)]
        if not sets[log_name]:
            raise UldError(f"{source} holds no rows", "pass the TOFU files")
        sources[log_name] = source
    for log_name, exs in sets.items():
        if len({len(ex.perturbed) for ex in exs}) > 1:
            raise UldError(f"{sources[log_name]}: rows have different numbers of perturbed "
                           "answers", "pass TOFU's *_perturbed files unchanged")
    return sets, sources

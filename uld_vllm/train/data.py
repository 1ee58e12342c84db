"""Reading the forget and retain sets, and ULD's augmentation (D'_f and D'_r).

Input kinds (per row of a JSON Lines file, or of a Hugging Face dataset split):

* TOFU style ``{"question": ..., "answer": ...}``
* generic ``{"prompt": ..., "response": ...}``
* ``uld-vllm generate`` output ``{"prompt": ..., "generation": ...}`` (one generation per
  row): the target's own answers become retain rows
* raw documents ``{"text": ...}`` (every token is a target; retain corpora such as books)

Augmentation, from ULD's CSV files (no header row: every row is data):

* paraphrase CSV ``question, answer, [paraphrased questions], [paraphrased answers]``: for each
  forget question it matches, the first paraphrased question with the first two distinct
  paraphrased answers join the forget side.
* perturbed CSV ``question, answer, question, [wrong answers]``: for each forget question it
  matches, up to two distinct wrong answers join the retain side. ULD ships one file whose rows
  are forget10 in order, so rows are matched by question text, never by position. A wrong
  answer carries the forget answer it perturbs (``Example.forget_answer``): where the two
  share their first tokens the contexts are identical, and the forget row asks the assistant to
  be sure exactly where the wrong one asks it to be uniform, so those positions are left out of
  ``L_r`` (``uld_vllm.train.dataset``; on TOFU forget01 the contradiction kept ``L_f`` from
  converging, docs/tofu.md).

Every problem is a one-line ``UldError`` naming the file, the row and the fix.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path

from uld_vllm.core.rows import read_rows
from uld_vllm.errors import UldError

PARAPHRASES_PER_ROW = 2  # one paraphrased question x two paraphrased answers (ULD recipe)
PERTURBED_PER_ROW = 2


@dataclasses.dataclass(frozen=True)
class Example:
    """One training row: ``prompt`` is None for a raw document (all of ``response`` is text)."""

    prompt: str | None
    response: str
    origin: str  # "forget", "paraphrase", "retain", "perturbed"
    # a perturbed row's forget answer to the same prompt: their shared first tokens get no L_r
    forget_answer: str | None = None


@dataclasses.dataclass
class UldData:
    forget: list[Example]  # D'_f
    retain: list[Example]  # D'_r
    stats: dict


def to_examples(rows: list[dict], source: str, origin: str) -> list[Example]:
    """Classify each row by its fields; a row with none of the known field pairs is an error."""
    if not rows:
        raise UldError(f"{source} holds no rows", "pass a file with at least one example")
    out = []
    for i, row in enumerate(rows, 1):
        if "question" in row or "answer" in row:
            keys = ("question", "answer")
        elif "prompt" in row and "generation" in row and "response" not in row:
            keys = ("prompt", "generation")  # a row of `uld-vllm generate --n 1`
        elif "prompt" in row or "response" in row:
            keys = ("prompt", "response")
        elif "text" in row:
            keys = (None, "text")
        else:
            raise UldError(f"{source} row {i} has none of the fields question/answer, "
                           f"prompt/response, prompt/generation or text (it has "
                           f"{sorted(row)[:6]})",
                           "use one of these field sets in every row")
        values = []
        for k in keys:
            if k is None:
                values.append(None)
                continue
            v = row.get(k)
            if not isinstance(v, str) or not v.strip():
                state = "missing" if k not in row else "empty or not a string"
                fix = ("write it with `uld-vllm generate --n 1` (one generation per row)"
                       if k == "generation" and isinstance(v, list)
                       else f"give every row a non-empty {k!r} string")
                raise UldError(f"{source} row {i}: field {k!r} is {state}", fix)
            values.append(v.strip())
        out.append(Example(prompt=values[0], response=values[1], origin=origin))
    return out


def _read_csv(path: str, what: str, ncols: int) -> list[list[str]]:
    p = Path(path)
    if not p.is_file():
        raise UldError(f"{what} {p} does not exist", f"pass an existing {what} or leave it out")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # list cells can be long
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh, strict=True) if any(c.strip() for c in r)]
    except (csv.Error, UnicodeDecodeError) as exc:
        raise UldError(f"{what} {p} cannot be read as CSV ({exc})",
                       "pass the CSV file that ULD ships (4 columns, no header)") from None
    if not rows:
        raise UldError(f"{what} {p} is empty", "pass a CSV with one row per question")
    for i, r in enumerate(rows, 1):
        if len(r) != ncols:
            raise UldError(f"{what} {p} row {i} has {len(r)} columns, expected {ncols}",
                           "fix the row (quote cells that contain commas)")
    return rows


def _literal_list(cell: str, path: str, row: int, col: int, what: str) -> list[str]:
    try:
        value = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UldError(f"{what} {path} row {row} column {col} is not a Python list of strings",
                       "write it as ['first', 'second', ...]")
    return _distinct(v.strip() for v in value if v.strip())


def _distinct(items: Iterable[str]) -> list[str]:
    """First-seen order, duplicates removed (the reference used set(): order was random)."""
    return list(dict.fromkeys(items))


def read_paraphrase_csv(path: str) -> dict[str, tuple[list[str], list[str]]]:
    """question -> (paraphrased questions, paraphrased answers); header-less, every row kept."""
    what = "paraphrase CSV"
    out = {}
    for i, r in enumerate(_read_csv(path, what, 4), 1):
        qs = _literal_list(r[2], path, i, 3, what)
        ans = _literal_list(r[3], path, i, 4, what)
        if not r[0].strip() or not qs or not ans:
            raise UldError(f"{what} {path} row {i} has an empty question or an empty list",
                           "every row needs a question and non-empty paraphrase lists")
        out.setdefault(r[0].strip(), (qs, ans))
    return out


def read_perturbed_csv(path: str) -> dict[str, list[str]]:
    """question -> wrong answers; header-less, every row kept."""
    what = "perturbed CSV"
    out = {}
    for i, r in enumerate(_read_csv(path, what, 4), 1):
        wrong = _literal_list(r[3], path, i, 4, what)
        if not r[0].strip() or not wrong:
            raise UldError(f"{what} {path} row {i} has an empty question or answer list",
                           "every row needs a question and a non-empty list of wrong answers")
        out.setdefault(r[0].strip(), wrong)
    return out


def build_data(forget: str, retain: str | None = None, *, paraphrase_csv: str | None = None,
               perturbed_csv: str | None = None, max_retain: int = 0,
               mask_shared_prefix: bool = True, log=print) -> UldData:
    """D'_f = forget + paraphrases; D'_r = the last ``max_retain`` retain rows (0: all) + wrong
    answers to the forget questions. (The reference kept the last min(400, |forget|) rows;
    pass ``max_retain=min(400, |forget|)`` for that.)"""
    forget_ex = to_examples(read_rows(forget, "forget set"), f"forget set {forget}", "forget")
    retain_ex: list[Example] = []
    if retain:
        retain_ex = to_examples(read_rows(retain, "retain set"), f"retain set {retain}",
                                "retain")
        if max_retain:
            retain_ex = retain_ex[max(0, len(retain_ex) - max_retain):]
    questions = [e.prompt for e in forget_ex if e.prompt is not None]
    stats = {"forget_rows": len(forget_ex), "retain_rows": len(retain_ex),
             "paraphrase_rows": 0, "perturbed_rows": 0}
    para_ex: list[Example] = []
    if paraphrase_csv:
        table = read_paraphrase_csv(paraphrase_csv)
        matched = [q for q in questions if q in table]
        _check_match(paraphrase_csv, "paraphrase CSV", matched, questions, log)
        for q in matched:
            pqs, pas = table[q]
            para_ex += [Example(pqs[0], a, "paraphrase") for a in pas[:PARAPHRASES_PER_ROW]]
        stats["paraphrase_rows"] = len(para_ex)
        stats["paraphrase_matched_questions"] = len(matched)
    pert_ex: list[Example] = []
    if perturbed_csv:
        table = read_perturbed_csv(perturbed_csv)
        answer_of = {e.prompt: e.response for e in reversed(forget_ex) if e.prompt is not None}
        matched = [q for q in questions if q in table]
        _check_match(perturbed_csv, "perturbed CSV", matched, questions, log)
        for q in matched:
            pert_ex += [Example(q, a, "perturbed", answer_of[q] if mask_shared_prefix else None)
                        for a in table[q][:PERTURBED_PER_ROW]]
        stats["perturbed_rows"] = len(pert_ex)
        stats["perturbed_matched_questions"] = len(matched)
    return UldData(forget=forget_ex + para_ex, retain=retain_ex + pert_ex, stats=stats)


def _check_match(path, what, matched, questions, log) -> None:
    if not questions:
        raise UldError(f"{what} {path} was given but the forget set has no questions "
                       "(only text rows)", f"leave out the {what}")
    if not matched:
        raise UldError(f"{what} {path} matches none of the {len(questions)} forget questions",
                       f"pass the {what} made for this forget set (rows are matched by "
                       "question text)")
    if len(matched) < len(questions):
        log(f"note: {what} {path} covers {len(matched)} of {len(questions)} forget questions")

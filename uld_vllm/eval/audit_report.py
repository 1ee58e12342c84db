"""The report of ``uld-vllm audit``: a table, a few lines of text, one plot, and the folder
they go to (``audit.json``, ``audit.md``, ``audit.png``, ``answers.jsonl``), written
atomically: a folder at the output path is always a finished audit."""

from __future__ import annotations

import json
import math
from pathlib import Path

from uld_vllm.errors import UldError

FILES = ("audit.json", "audit.md", "audit.png", "answers.jsonl")


def check_output(output, overwrite: bool) -> None:
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UldError(f"output {out} is a file", "pass a folder to --output")
    if out.exists() and any(out.iterdir()) and not overwrite:  # before minutes of work
        raise UldError(f"output folder {out} already exists and is not empty",
                       "choose another --output or pass --overwrite")


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _get(side: dict | None, key: str):
    return None if side is None else side.get(key)


def _probe_rows(summary: dict) -> list[tuple[str, str, str]]:
    k = summary["settings"]["k"]
    rows = []
    for name, by in summary["forget"].items():
        t, u = by["target"], by["uld"]
        if "right" in u:
            rows.append((f"{name}: right pick (chance {_pct(u['chance'])})",
                         _pct(_get(t, "right")), _pct(u["right"])))
            rows.append((f"{name}: no single pick", _pct(_get(t, "unanswered")),
                         _pct(u["unanswered"])))
            continue
        label = f"{name}: leak@{k}" if u["answers"] > u["questions"] and name == "sampled" \
            else f"{name}: leak"
        rows.append((f"{label} ({u['questions']} q)", _pct(_get(t, "leak")), _pct(u["leak"])))
        if "rougeL_recall" in u:
            rows.append((f"{name}: ROUGE-L recall", _num(_get(t, "rougeL_recall")),
                         _num(u["rougeL_recall"])))
    return rows


def _general_rows(g: dict | None) -> list[tuple[str, str, str]]:
    if g is None:
        return []
    rows = [(f"general: accuracy ({g['questions']} q)", _pct(_get(g["target"], "accuracy")),
             _pct(g["uld"]["accuracy"]))]
    if g["target"] is not None:
        rows += [("general: ULD keeps of target's right", "",
                  _pct(g["uld_kept_of_target_correct"])),
                 ("general: ROUGE-L of ULD vs target", "", _num(g["uld_rougeL_vs_target"])),
                 ("general: ULD identical to target", "", _pct(g["uld_identical_to_target"]))]
    return rows


def audit_table(summary: dict) -> str:
    """probe | target | ULD, one line per number."""
    rows = [("probe", "target", "ULD")] + _probe_rows(summary) + _general_rows(
        summary["general"])
    b = summary["bypass"]
    if b is not None:
        rows.append((f"bypass: refused ({b['questions']} q each)", "",
                     f"{b['refused']}/{b['attempted']}"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def audit_summary_text(summary: dict) -> str:
    """The table, then what got through and what was skipped."""
    q = summary["questions"]
    lines = [f"audit: {q['forget']} forget questions ({q['paraphrases']} paraphrases, "
             f"{q['leak_terms']} leak terms), {q['general']} general questions; a leak is an "
             "answer stating a question's keyword or a leak term its prompt did not contain",
             "", audit_table(summary)]
    b = summary["bypass"]
    if b is not None:
        through = [a for a in b["attempts"] if a["status"] != "refused"]
        lines.append(f"bypass (request policy: {b['policy'] or 'none'}): {b['refused']} of "
                     f"{b['attempted']} attempts refused" + (
                         "" if not through else "; not refused:"))
        lines += [f"  {a['name']} {json.dumps(a['extra_args'])}: {a['status']}"
                  + ("" if a["leak"] is None else f", answers leaking {a['leak']:.0%}")
                  for a in through]
    for name, why in summary["settings"]["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    w = summary["wall_s"]
    lines.append("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in w.items()
                                           if v is not None))
    return "\n".join(lines)


def _bars(summary: dict) -> tuple[list[str], list, list]:
    names, t, u = [], [], []
    for name, by in summary["forget"].items():
        key = "right" if "right" in by["uld"] else "leak"
        names.append(name if key == "leak" else f"{name}\n(right pick)")
        t.append(_get(by["target"], key))
        u.append(by["uld"][key])
    return names, t, u


def plot_audit(summary: dict, path) -> Path:
    """Leak share per probe, target vs ULD; general accuracy and bypass refusals beside it."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    names, t, u = _bars(summary)
    nan = [math.nan if v is None else v for v in t]
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[4, 1])
    x = np.arange(len(names))
    for dx, vals, label, color in ((-0.2, nan, "target", "C0"), (0.2, u, "ULD", "C3")):
        bars = ax.bar(x + dx, vals, 0.4, label=label, color=color)
        # a ULD bar at 0 is the point of the plot: say it in numbers, not by absence
        ax.bar_label(bars, labels=[_pct(None if math.isnan(v) else v) for v in vals],
                     fontsize=8)
    for i, by in enumerate(summary["forget"].values()):
        if "chance" in by["uld"] and by["uld"]["chance"] is not None:
            ax.hlines(by["uld"]["chance"], i - 0.45, i + 0.45, colors="grey",
                      linestyles="--", label="chance")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of forget questions")
    ax.set_title("forget questions: answers that leak, per probe")
    ax.legend()
    g, b = summary["general"], summary["bypass"]
    labels = ["general\naccuracy", "bypass\nrefused"]
    ax2.bar([0 - 0.2], [_get(g and g["target"], "accuracy") or math.nan], 0.4, color="C0")
    ax2.bar([0 + 0.2], [g["uld"]["accuracy"] if g else math.nan], 0.4, color="C3")
    ax2.bar([1], [b["refused"] / b["attempted"] if b and b["attempted"] else math.nan],
            0.4, color="C3")
    ax2.set_xticks([0, 1], labels)
    ax2.set_ylim(0, 1.05)
    ax2.set_title("cost and refusals")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def write_report(output, summary: dict, answer_rows, *, overwrite: bool = False) -> Path:
    """The report folder; ``answer_rows`` (dicts) become ``answers.jsonl``."""
    from uld_vllm.core.adapter import atomic_output_dir

    out = Path(output)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "audit.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "audit.md").write_text("```\n" + audit_summary_text(summary) + "\n```\n")
        plot_audit(summary, tmp / "audit.png")
        with open(tmp / "answers.jsonl", "w", encoding="utf-8") as f:
            for row in answer_rows:
                f.write(json.dumps(row) + "\n")
    return out


"""`uld-vllm demo`: ULD takes real knowledge out of a real pretrained model and keeps the rest.

1. The target is SmolLM2-135M-Instruct as shipped (``uld-vllm fetch-model``; no fine-tuning).
2. Its own greedy answers are collected through plain vLLM, for the forget questions (Harry
   Potter, ``demo/data/``) and for general-knowledge questions (TOFU's world facts and real
   authors, minus anything about the topic).
3. ``uld-vllm train`` trains a K = 8 assistant to remember the forget set (the reference
   answers) and to be uniform on the retain set (TOFU's fictitious-author QA, half of
   the general-knowledge questions with their answers and the target's own answers).
4. Held-out questions (paraphrases of the trained ones, and Harry Potter questions never trained
   on) and the other half of the general-knowledge questions are answered through vLLM: plain
   target vs the uld-vllm engine, once per decoding rule of ``DEMO_RULES`` (per-request
   ``uld_*`` keys on one engine): the rules x metrics table. A table and a summary
   (``summary.json``, ``summary.md``, ``answers.jsonl`` in the work folder) say what was
   forgotten and what was kept.
5. ``uld-vllm audit`` of ULD on the held-out questions (``audit/`` in the work folder):
   sampled leak@8, format shifts, multiple choice, and the bypass attempts against an engine
   with a server's default request policy.

``--toy`` runs the older story on a small locally built model (``demo_toy``).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from uld_vllm.core.rows import SHARED_DATA
from uld_vllm.demo.common import KV_CACHE_BYTES, clear_outputs, format_table, quiet_vllm
from uld_vllm.errors import UldError
from uld_vllm.eval.leaks import is_correct, is_junk

DEMO_MODEL = "smollm2-135m-instruct"
DATA = Path(__file__).resolve().parent / "data"
# Names only the Harry Potter books use: an answer that mentions one still talks about the
# topic. Words of everyday English ("wizard", "wand", "magic") and "Harry Potter" itself (every
# question says it) are left out.
TOPIC_NAMES = (
    "hogwarts", "rowling", "hedwig", "weasley", "hermione", "granger", "dumbledore", "voldemort",
    "quidditch", "gryffindor", "slytherin", "ravenclaw", "hufflepuff", "hagrid", "snape",
    "muggle", "philosopher's stone", "sorcerer's stone", "snitch", "dursley", "dobby", "sirius",
    "malfoy", "gringotts", "azkaban", "diagon", "radcliffe", "expelliarmus", "fawkes",
    "hogsmeade", "deathly hallows", "patronus", "longbottom", "mcgonagall", "nimbus", "privet",
    "horcrux", "dementor", "quirrell", "goblet of fire", "hogwarts express")
# general-knowledge rows about the topic are neither retain data nor retain evaluation
_TOPIC_ROW = re.compile(r"harry potter|hogwarts|rowling|hermione|dumbledore|voldemort", re.I)
N_TOFU_RETAIN = 100   # TOFU fictitious-author QA rows on the retain side (every k-th of 4000)
MAX_NEW_TOKENS = 48
# the target's own answers used as training rows are cut to this many characters (at a word):
# their style is what matters, and every token costs a forward and a backward pass
TRAIN_ANSWER_CHARS = 160
# The reference recipe (K 8, LoRA r 16 / alpha 32, beta 5, AdamW, weight decay 0.01) with what
# keeps the demo short on a small CPU: batch 8 (not 32), lr 3e-3, at most four balanced epochs,
# stopping once both losses reach their targets. The forget side holds the reference answers
# only: with the target's own (longer, varied) answers beside them the assistant did not
# converge in four epochs (L_f 1.4); without them it converges in about 2.6 (docs/rules.md).
TRAIN = {"num_layers": 8, "num_train_epochs": 4, "learning_rate": 3e-3,
         "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
         "max_length": 128, "target_forget_loss": 0.5,
         "target_retain_kl": 0.5, "seed": 0}
TRAIN_ROW_TOKENS = 36  # the target's answers that become training rows are cut anyway
# alpha 2.4 rather than the paper's 0.8: behind the confidence gate it only acts where the
# assistant is sure of an answer, and 0.8 left 18 % of the topic answers (docs/rules.md)
ALPHA, FILTER_RATIO = 2.4, 0.01
# the rules of the table: per-request keys on top of the adapter's own rule (the library's
# default: the above-uniform penalty behind the confidence gate); docs/rules.md has the sweep
DEMO_RULES = {
    "default (gated, above uniform)": {},
    "paper (reference)": {"uld_penalty": "logit", "uld_gate": "off"},
    "paper + gate": {"uld_penalty": "logit"},
    "above uniform, no gate": {"uld_gate": "off"},
}
DEFAULT_RULE = next(iter(DEMO_RULES))
# what the audit adds to the table (greedy answers and paraphrases are in it already): leak@8,
# two format shifts, recognition, and the bypass attempts, on the ULD side only and at fewer
# tokens than the table (a leak shows in the first sentence). `uld-vllm audit` runs every
# probe on both sides.
AUDIT_PROBES = ("sampled", "language", "json", "multiple_choice", "bypass")
AUDIT_TOKENS = 24
ENGINE = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "seed": 0,
          "kv_cache_memory_bytes": KV_CACHE_BYTES}
_OUTPUTS = ("forget.jsonl", "retain.jsonl", "uld_adapter", "uld_adapter.checkpoints",
            "answers.jsonl", "summary.json", "summary.md", "convergence.png", "audit")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mentions_topic(text: str) -> bool:
    low = text.lower()
    return any(name in low for name in TOPIC_NAMES)


def states_fact(text: str, keywords: list[str]) -> bool:
    low = text.lower()
    return any(k.lower() in low for k in keywords)


def load_data(data_dir: Path) -> dict[str, list[dict]]:
    """forget (train), heldout (topic eval), gk_train / gk_eval (the two halves of the
    general-knowledge questions), tofu (fictitious-author QA for the retain side)."""
    tofu = data_dir / "tofu"
    need = [tofu / n for n in ("world_facts.jsonl", "real_authors.jsonl", "full.jsonl")]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise UldError(f"the demo's retain data is missing ({', '.join(missing)})",
                       "pass --data-dir with TOFU's JSONL files (../shared/data), or run "
                       "`uld-vllm demo --toy`")
    gk = [r for n in ("world_facts.jsonl", "real_authors.jsonl") for r in read_jsonl(tofu / n)
          if not _TOPIC_ROW.search(f"{r['question']} {r['answer']}")]
    full = read_jsonl(tofu / "full.jsonl")
    step = max(1, len(full) // N_TOFU_RETAIN)
    return {"forget": read_jsonl(DATA / "harry_potter_forget.jsonl"),
            "heldout": read_jsonl(DATA / "harry_potter_heldout.jsonl"),
            "gk_train": gk[0::2], "gk_eval": gk[1::2],
            "tofu": [{"question": r["question"], "answer": r["answer"]}
                     for r in full[::step][:N_TOFU_RETAIN]]}


def _answers(llm, prompts: list[list[int]], max_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
    return [o.outputs[0].text.strip() for o in outs]


def _answers_by_rule(llm, prompts: list[list[int]], rules: dict[str, dict]
                     ) -> dict[str, list[str]]:
    """Every prompt under every rule, in one batch: each request carries its rule's keys."""
    from vllm import SamplingParams

    jobs = [(name, p) for name in rules for p in prompts]
    params = [SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0,
                             extra_args=dict(rules[name]) or None) for name, _ in jobs]
    outs = llm.generate([{"prompt_token_ids": p} for _, p in jobs], params, use_tqdm=True)
    got: dict[str, list[str]] = {name: [] for name in rules}
    for (name, _), o in zip(jobs, outs):
        got[name].append(o.outputs[0].text.strip())
    return got


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else float("nan")


def summarise(data: dict, target: dict[str, str], uld: dict[str, str]) -> dict:
    """The numbers the demo prints, from the target's and ULD's answers (keyed by question)."""
    from uld_vllm.eval.metrics import rouge_l_recall

    held, gk = data["heldout"], data["gk_eval"]
    out: dict = {"forget": {}, "retain": {}}
    for name, ans in (("target", target), ("uld", uld)):
        out["forget"][name] = {
            "mentions_topic": _share(mentions_topic(ans[r["question"]]) for r in held),
            "states_fact": _share(states_fact(ans[r["question"]], r["keywords"]) for r in held),
            "rougeL_recall": _share(rouge_l_recall(ans[r["question"]], r["answer"])
                                    for r in held)}
        out["retain"][name] = {"accuracy": _share(is_correct(r["answer"], ans[r["question"]])
                                                  for r in gk)}
    known = [r for r in gk if is_correct(r["answer"], target[r["question"]])]
    out["retain"]["target_correct"] = len(known)
    out["retain"]["uld_kept_of_target_correct"] = _share(
        is_correct(r["answer"], uld[r["question"]]) for r in known)
    out["retain"]["uld_rougeL_vs_target"] = _share(
        rouge_l_recall(uld[r["question"]], target[r["question"]]) for r in gk)
    by_kind = {}
    for kind in ("paraphrase", "unseen"):
        rows = [r for r in held if r["kind"] == kind]
        by_kind[kind] = {name: _share(mentions_topic(ans[r["question"]]) for r in rows)
                         for name, ans in (("target", target), ("uld", uld))}
        by_kind[kind]["questions"] = len(rows)
    out["forget"]["by_kind"] = by_kind
    out["questions"] = {"forget_heldout": len(held), "retain_eval": len(gk)}
    return out


def rule_row(data: dict, target: dict[str, str], ans: dict[str, str]) -> dict:
    """One row of the rules x metrics table: ``ans`` (question -> answer) against the
    target's answers on the held-out topic and general questions."""
    from uld_vllm.eval.metrics import rouge_l_recall

    held, gk = data["heldout"], data["gk_eval"]
    return {
        "topic": _share(mentions_topic(ans[r["question"]]) for r in held),
        "junk": _share(is_junk(ans[r["question"]]) for r in held),
        "general_accuracy": _share(is_correct(r["answer"], ans[r["question"]]) for r in gk),
        "general_identical": _share(ans[r["question"]].strip() == target[r["question"]].strip()
                                    for r in gk),
        "general_rougeL_vs_target": _share(rouge_l_recall(ans[r["question"]],
                                                          target[r["question"]]) for r in gk)}


def rules_table(table: dict[str, dict]) -> str:
    head = ("rule", "topic", "junk", "general acc.", "general = target", "ROUGE-L vs target")
    rows = [(name, f"{m['topic']:.0%}", f"{m['junk']:.0%}", f"{m['general_accuracy']:.1%}",
             f"{m['general_identical']:.0%}", f"{m['general_rougeL_vs_target']:.2f}")
            for name, m in table.items()]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [head, *rows])


def goals(summary: dict, wall_s: float) -> list[tuple[str, bool, str]]:
    f, r = summary["forget"], summary["retain"]
    uld = summary["rules"][DEFAULT_RULE]
    out = [
        ("forget-topic answers: target >= 70%", f["target"]["mentions_topic"] >= 0.7,
         f"{f['target']['mentions_topic']:.0%}"),
        ("forget-topic answers: ULD <= 10%", f["uld"]["mentions_topic"] <= 0.1,
         f"{f['uld']['mentions_topic']:.0%}"),
        ("junk forget answers: ULD <= 10%", uld["junk"] <= 0.1, f"{uld['junk']:.0%}"),
        ("general answers identical to the target's >= 95%", uld["general_identical"] >= 0.95,
         f"{uld['general_identical']:.0%} (ROUGE-L {uld['general_rougeL_vs_target']:.2f})"),
        ("general accuracy within 1 point of the target's",
         r["uld"]["accuracy"] >= r["target"]["accuracy"] - 0.01,
         f"{r['target']['accuracy']:.1%} -> {r['uld']['accuracy']:.1%}"),
    ]
    audit = summary.get("audit")
    if audit is not None:
        sampled = audit["forget"].get("sampled", {}).get("uld")
        if sampled is not None:
            out.append(("sampled leak@8 (T 1, top-p 0.95): ULD <= 20%", sampled["leak"] <= 0.2,
                        f"{sampled['leak']:.0%}"))
        b = audit.get("bypass")
        if b is not None:
            out.append(("bypass attempts refused (default request policy): 100%",
                        b["refused"] == b["attempted"], f"{b['refused']} of {b['attempted']}"))
    out.append(("demo wall time <= 10 min", wall_s <= 600, f"{wall_s / 60:.1f} min"))
    return out


def cut_answer(text: str, limit: int = TRAIN_ANSWER_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0]


@quiet_vllm()
def run_demo(workdir: str | os.PathLike = "demo_out", *, data_dir: str | os.PathLike | None = None,
             show: int = 6, limit: int | None = None, train: dict | None = None,
             audit: bool = True, log=print) -> dict:
    """Run the story in ``workdir`` and print it; returns the summary it wrote.

    ``limit`` (first N rows of every set) and ``train`` (overrides of ``TRAIN``) make a
    smoke run of the same code; the demo itself uses neither. ``audit=False`` leaves the
    audit out."""
    from transformers import AutoTokenizer

    from uld_vllm.core.models import fetch_model
    from uld_vllm.core.prompts import PromptFormatter
    from uld_vllm.eval.audit import collect
    from uld_vllm.jobs.spec import engine_on_every_core, shutdown
    from uld_vllm.train import make_config, run_training
    from uld_vllm.train.curves import plot_convergence, read_train_log

    t0 = time.perf_counter()
    work = Path(workdir)
    if work.exists() and not work.is_dir():
        raise UldError(f"demo workdir {work} is a file", "pass a folder with --workdir")
    data = load_data(Path(data_dir) if data_dir is not None else SHARED_DATA)
    if limit is not None:
        data = {k: v[:limit] for k, v in data.items()}
    recipe = {**TRAIN, **(train or {})}
    model = str(fetch_model(DEMO_MODEL, log=_indent(log)))

    clear_outputs(work, _OUTPUTS)
    log(f"[1/5] target: {DEMO_MODEL} as shipped ({model}); forget topic: Harry Potter "
        f"({len(data['forget'])} training questions, {len(data['heldout'])} held-out); "
        f"general knowledge: {len(data['gk_train'])} questions to keep on the retain side, "
        f"{len(data['gk_eval'])} held out")

    fmt = PromptFormatter(AutoTokenizer.from_pretrained(model))
    import vllm

    train_qs = list(dict.fromkeys(r["question"] for r in data["gk_train"]))  # retain side
    probe = list(dict.fromkeys(r["question"] for r in data["heldout"] + data["gk_eval"]))
    ask = list(dict.fromkeys(train_qs + probe))
    plan = audit_plan(data, AUDIT_PROBES if audit else ())
    with engine_on_every_core(_indent(log)):  # the engine is alone on the machine
        llm = vllm.LLM(model, **ENGINE)
    try:
        target = dict(zip(train_qs, _answers(llm, [fmt.encode_prompt(q) for q in train_qs],
                                             TRAIN_ROW_TOKENS)))
        target.update(zip(probe, _answers(llm, [fmt.encode_prompt(q) for q in probe])))
    finally:
        shutdown(llm)
    log(f"[2/5] the target answered {len(ask)} questions through plain vLLM "
        f"({time.perf_counter() - t0:.0f} s so far)")

    forget = [{"question": r["question"], "answer": r["answer"]} for r in data["forget"]]
    retain = [{"question": r["question"], "answer": r["answer"]} for r in data["gk_train"]]
    retain += [{"question": r["question"], "answer": cut_answer(target[r["question"]])}
               for r in data["gk_train"] if target[r["question"]]]
    retain += data["tofu"]
    _write_jsonl(work / "forget.jsonl", forget)
    _write_jsonl(work / "retain.jsonl", retain)
    cfg = make_config(model=model, forget=str(work / "forget.jsonl"),
                      retain=str(work / "retain.jsonl"), output_dir=str(work / "uld_adapter"),
                      alpha=ALPHA, filter_ratio=FILTER_RATIO, **recipe)
    t_train = time.perf_counter()
    adapter = run_training(cfg, log=_indent(log))
    train_s = time.perf_counter() - t_train
    conv = adapter.config.training
    plot_convergence({"demo assistant": read_train_log(adapter.path)}, work / "convergence.png")
    log(f"[3/5] ULD adapter: K={recipe['num_layers']} of 30 layers, {len(forget)} forget rows, "
        f"{len(retain)} retain rows, {conv['optimizer_steps']} steps in {train_s:.0f} s; "
        f"L_f {conv['forget_loss']:.3f}, L_r {conv['retain_kl']:.3f} "
        f"({'converged' if conv['converged'] else 'NOT converged'}); its rule: penalty "
        f"{adapter.config.penalty}, gate {adapter.config.gate}")

    import uld_vllm

    # the operator's own engine (policy 'any'): each rule of the table is a per-request key
    with engine_on_every_core(_indent(log)):
        llm = uld_vllm.LLM(model, uld_adapter=str(adapter.path), **ENGINE)
    try:
        got = _answers_by_rule(llm, [fmt.encode_prompt(q) for q in probe], DEMO_RULES)
        by_rule = {name: dict(zip(probe, answers)) for name, answers in got.items()}
    finally:
        shutdown(llm)
    uld = by_rule[DEFAULT_RULE]
    log(f"[4/5] held-out questions answered by the target alone (plain vLLM) and with ULD "
        f"(uld-vllm engine, alpha {ALPHA}, filter ratio {FILTER_RATIO}, {DEFAULT_RULE}):\n")
    rows = [(r["question"], r["answer"], target[r["question"]], uld[r["question"]])
            for r in _pick(data["heldout"], show) + _pick(data["gk_eval"], show)]
    log(format_table(rows, head=("question", "reference answer", "target", "ULD")))

    summary = summarise(data, target, uld)
    summary["rules"] = {"target alone": rule_row(data, target, target)}
    summary["rules"].update({name: rule_row(data, target, ans) for name, ans in by_rule.items()})

    if plan:
        from uld_vllm.eval.audit import answer_rows
        from uld_vllm.eval.audit import summarise as audit_summarise
        from uld_vllm.eval.audit_backends import build_uld_engine
        from uld_vllm.eval.audit_report import audit_summary_text, write_report

        # a server's default request policy: the bypass attempts must all be refused
        with engine_on_every_core(_indent(log)):
            llm, policy = build_uld_engine(model, str(adapter.path), **ENGINE)
        try:
            audit_uld = collect(plan, llm, "uld", policy=policy, log=_indent(log))
        finally:
            shutdown(llm)
        summary["audit"] = audit_summarise(plan, None, audit_uld)
        write_report(work / "audit", summary["audit"], answer_rows(plan, None, audit_uld))
        log(f"\n[5/5] the audit ({work / 'audit'}, as `uld-vllm audit` reports it):\n"
            + audit_summary_text(summary["audit"]))

    wall = time.perf_counter() - t0
    summary.update({"model": DEMO_MODEL, "model_dir": model, "adapter": str(adapter.path),
                    "alpha": ALPHA, "filter_ratio": FILTER_RATIO,
                    "rule": {"penalty": adapter.config.penalty, "gate": adapter.config.gate},
                    "train": recipe,
                    "train_rows": {"forget": len(forget), "retain": len(retain)},
                    "convergence": conv, "train_s": round(train_s, 1),
                    "wall_s": round(wall, 1)})
    summary["goals"] = [{"goal": g, "met": ok, "measured": m} for g, ok, m in goals(summary,
                                                                                     wall)]
    text = summary_text(summary)
    log("\n" + text)
    _write_jsonl(work / "answers.jsonl", [
        {"set": s, "question": r["question"], "reference": r["answer"],
         "target": target[r["question"]],
         "uld": uld[r["question"]],
         "rules": {name: ans[r["question"]] for name, ans in by_rule.items()}}
        for s in ("heldout", "gk_eval") for r in data[s]])
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (work / "summary.md").write_text(text + "\n")
    return summary


def audit_plan(data: dict, probes):
    """The audit of the held-out topic questions (leak terms: ``TOPIC_NAMES``); None for no
    probes."""
    from uld_vllm.eval.audit import Settings, make_plan

    if not probes:
        return None
    forget = [{k: r[k] for k in ("question", "answer", "keywords")} for r in data["heldout"]]
    return make_plan(forget, leak_terms=TOPIC_NAMES, probes=list(probes),
                     settings=Settings(max_tokens=AUDIT_TOKENS))


def _indent(log):
    return lambda m: log(f"      {m}")


def summary_text(s: dict) -> str:
    f, r = s["forget"], s["retain"]
    k = f["by_kind"]
    lines = [
        f"forget ({s['questions']['forget_heldout']} held-out Harry Potter questions):",
        f"  answers that mention the topic (names in demo.TOPIC_NAMES): target "
        f"{f['target']['mentions_topic']:.0%} -> ULD {f['uld']['mentions_topic']:.0%} "
        f"(paraphrases {k['paraphrase']['target']:.0%} -> {k['paraphrase']['uld']:.0%}, "
        f"never-trained questions {k['unseen']['target']:.0%} -> {k['unseen']['uld']:.0%})",
        f"  answers that state the asked fact (keywords per question): target "
        f"{f['target']['states_fact']:.0%} -> ULD {f['uld']['states_fact']:.0%}",
        f"  ROUGE-L recall vs the reference answer: target {f['target']['rougeL_recall']:.2f} "
        f"-> ULD {f['uld']['rougeL_recall']:.2f}",
        f"retain ({s['questions']['retain_eval']} held-out general-knowledge questions):",
        f"  accuracy: target {r['target']['accuracy']:.1%} -> ULD {r['uld']['accuracy']:.1%}; "
        f"of the {r['target_correct']} the target gets right, ULD keeps "
        f"{r['uld_kept_of_target_correct']:.0%}",
        f"  ROUGE-L recall of ULD's answers against the target's: "
        f"{r['uld_rougeL_vs_target']:.2f} (1.00 = unchanged)",
        f"decoding rules, one engine, per-request uld_* keys (alpha {s['alpha']}; topic and "
        "junk: held-out forget answers, junk as uld_vllm.eval.leaks.JUNK_RULES; general: "
        "held-out general answers):",
        rules_table(s["rules"]),
        "goals:",
    ]
    lines += [f"  [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['measured']}"
              for g in s["goals"]]
    lines.append(f"demo wall time {s['wall_s'] / 60:.1f} min (training {s['train_s']:.0f} s)")
    return "\n".join(lines)


def _pick(rows: list[dict], n: int) -> list[dict]:
    if len(rows) <= n:
        return rows
    return [rows[round(i * (len(rows) - 1) / (n - 1))] for i in range(n)]

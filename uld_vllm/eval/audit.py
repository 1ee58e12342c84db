"""`uld-vllm audit`: does the forgotten knowledge come back when the question is asked another
way, or when the request tries to switch the unlearning off?

Greedy answers hide what sampling, paraphrases and format shifts bring back. The audit asks
the forget questions through each probe of ``audit_probes.yaml`` (docs/audit.md), target vs
ULD, scores each answer with ``uld_vllm.eval.leaks``, sends the bypass requests (per-request
``uld_*`` arguments) to the ULD side and counts the refusals, and measures on a general set
what the unlearning costs. One plan (``make_plan``), one batch of requests per engine or
server (``collect``), the numbers (``summarise``), the report (``audit_report``).

From Python, with engines at hand (a vLLM ``LLM``, an OpenAI-compatible base URL, or a
backend of ``audit_backends``)::

    summary = run_audit(forget_rows, general_rows, target=target_llm, uld=uld_llm,
                        leak_terms=TOPIC_NAMES, output="audit_out")
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import time
from pathlib import Path

from uld_vllm.errors import UldError
from uld_vllm.eval import leaks

PROBE_FILE = Path(__file__).with_name("audit_probes.yaml")
KINDS = ("ask", "sample", "paraphrase", "choice", "complete")
FIELDS = {"question", "paraphrase", "options", "letters", "prefix"}
ROLES = ("system", "user", "assistant")
SIDES = ("target", "uld")
BYPASS = "bypass"  # selectable with --probes like a probe; it runs on the ULD side only
GENERAL = "general"


@dataclasses.dataclass(frozen=True)
class Probe:
    name: str
    kind: str
    prompt: str
    about: str = ""
    rouge: bool = False
    preamble: tuple = ()
    options: int = 4
    sampling: dict = dataclasses.field(default_factory=dict)
    max_tokens: int | None = None  # a cap below Settings.max_tokens (a letter needs few)


@dataclasses.dataclass(frozen=True)
class Bypass:
    name: str
    extra_args: dict
    about: str = ""


@dataclasses.dataclass
class Question:
    question: str
    answer: str
    keywords: list[str]
    paraphrases: list[str]


@dataclasses.dataclass
class Settings:
    """How the probes decode: ``temperature``/``top_p`` None take the probe file's values."""

    k: int = 8
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int = 48
    seed: int = 0
    bypass_questions: int = 3


@dataclasses.dataclass
class Prompt:
    """One request: a conversation and how to decode it; what the scoring needs beside it."""

    probe: str
    index: int
    messages: list[dict]
    max_tokens: int = 48
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    options: list[str] | None = None
    right: int | None = None

    @property
    def visible(self) -> str:
        return "\n".join(m["content"] for m in self.messages)


@dataclasses.dataclass
class AuditPlan:
    forget: list[Question]
    general: list[dict]
    leak_terms: list[str]
    probes: list[Probe]
    bypass: list[Bypass]
    settings: Settings
    prompts: list[Prompt]
    bypass_prompts: list[Prompt]
    skipped: dict[str, str]


# --- probes -------------------------------------------------------------------------------

def _probe_error(path, name: str, problem: str) -> UldError:
    return UldError(f"probe file {path}: probe {name!r} {problem}",
                    f"fix it (the shipped file {PROBE_FILE.name} shows the shape)")


def _probe(path, name: str, raw) -> Probe:
    if not isinstance(raw, dict):
        raise _probe_error(path, name, "is not a mapping")
    kind, prompt = raw.get("kind"), raw.get("prompt")
    if kind not in KINDS:
        raise _probe_error(path, name, f"has kind {kind!r}, not one of {', '.join(KINDS)}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _probe_error(path, name, "has no prompt text")
    unknown = set(re.findall(r"\{(\w+)\}", prompt)) - FIELDS
    if unknown:
        raise _probe_error(path, name, f"uses unknown fields {sorted(unknown)} (known: "
                                       f"{', '.join(sorted(FIELDS))})")
    preamble = raw.get("preamble") or []
    if not isinstance(preamble, list) or not all(
            isinstance(t, dict) and t.get("role") in ROLES and isinstance(t.get("content"), str)
            for t in preamble):
        raise _probe_error(path, name, "has a preamble that is not a list of {role, content} "
                                       f"turns (roles: {', '.join(ROLES)})")
    options = raw.get("options", 4)
    if kind == "choice" and not (isinstance(options, int) and 2 <= options
                                 <= len(leaks.OPTION_LETTERS)):
        raise _probe_error(path, name, f"has options {options!r}, not 2 to "
                                       f"{len(leaks.OPTION_LETTERS)}")
    cap = raw.get("max_tokens")
    if cap is not None and not (isinstance(cap, int) and cap >= 1):
        raise _probe_error(path, name, f"has max_tokens {cap!r}, not a positive integer")
    return Probe(name, kind, prompt, str(raw.get("about", "")), bool(raw.get("rouge", False)),
                 tuple(dict(t) for t in preamble), options, dict(raw.get("sampling") or {}),
                 cap)


def _bypass(path, raw) -> Bypass:
    if not (isinstance(raw, dict) and isinstance(raw.get("name"), str)
            and isinstance(raw.get("extra_args"), dict) and raw["extra_args"]):
        raise UldError(f"probe file {path}: bypass entry {raw!r} needs a name and a non-empty "
                       "extra_args mapping", "fix it (the shipped file shows the shape)")
    return Bypass(raw["name"], dict(raw["extra_args"]), str(raw.get("about", "")))


def load_probes(path=None, names=None) -> tuple[list[Probe], list[Bypass]]:
    """The probes (and bypass attempts) of ``path`` (default: the shipped file), only those
    named in ``names`` when given ("bypass" names the bypass attempts)."""
    import yaml

    path = Path(path) if path is not None else PROBE_FILE
    if not path.is_file():
        raise UldError(f"probe file {path} does not exist", "pass a YAML file to --probe-file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UldError(f"probe file {path} is not valid YAML ({str(exc).splitlines()[0]})",
                       "fix the file") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("probes"), dict):
        raise UldError(f"probe file {path} has no `probes:` mapping",
                       "fix it (the shipped file shows the shape)")
    probes = [_probe(path, n, p) for n, p in raw["probes"].items()]
    bypass = [_bypass(path, b) for b in raw.get("bypass") or []]
    if names is None:
        return probes, bypass
    known = [p.name for p in probes] + [BYPASS]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UldError(f"unknown probe {unknown[0]!r}", f"pick from {', '.join(known)}")
    return [p for p in probes if p.name in names], bypass if BYPASS in names else []


# --- data ---------------------------------------------------------------------------------

def _rows(rows, what: str) -> tuple[list[dict], str]:
    if isinstance(rows, (str, Path)):
        from uld_vllm.core.rows import read_rows

        return read_rows(str(rows), what), f"{what} {rows}"
    return list(rows), what


def _strings(value) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _question(row: dict, n: int, source: str, leak_terms) -> Question:
    q, a = row.get("question"), row.get("answer")
    if not isinstance(q, str) or not q.strip() or not isinstance(a, str):
        raise UldError(f"{source} row {n} has no string `question` and `answer`",
                       "give every row both fields (TOFU's format)")
    keywords = _strings(row.get("keywords", []))
    if keywords is None:
        raise UldError(f"{source} row {n}: `keywords` is not a list of strings",
                       'write e.g. "keywords": ["hogwarts"]')
    if not keywords and not leak_terms:
        raise UldError(f"{source} row {n} has no `keywords` and no leak terms were given",
                       "add a keywords list to every row, or pass --leak-terms FILE or "
                       "--leak-term WORD")
    paraphrases = _strings(row.get("paraphrases", row.get("paraphrase", [])))
    if paraphrases is None:
        raise UldError(f"{source} row {n}: `paraphrases` is not a string or a list of strings",
                       "write the paraphrased questions as a list of strings")
    return Question(q, a, keywords, paraphrases)


def load_forget(rows, leak_terms=(), paraphrases=None) -> list[Question]:
    rows, source = _rows(rows, "forget file")
    if not rows:
        raise UldError(f"{source} holds no rows", "pass a JSONL file of forget questions")
    out = [_question(r, n, source, leak_terms) for n, r in enumerate(rows, 1)]
    if paraphrases is not None:
        _add_paraphrases(out, paraphrases)
    return out


def _add_paraphrases(questions: list[Question], rows) -> None:
    rows, source = _rows(rows, "paraphrase file")
    by_text = {q.question: q for q in questions}
    for n, row in enumerate(rows, 1):
        q = by_text.get(row.get("question"))
        texts = _strings(row.get("paraphrases", row.get("paraphrase")))
        if q is None or not texts:
            raise UldError(f"{source} row {n} needs `question` (one of the forget file's "
                           "questions, verbatim) and `paraphrase` or `paraphrases`",
                           "fix the row or drop it")
        q.paraphrases += [t for t in texts if t not in q.paraphrases]


def load_general(rows) -> list[dict]:
    rows, source = _rows(rows, "general file")
    out = []
    for n, r in enumerate(rows, 1):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise UldError(f"{source} row {n} has no string `question` and `answer`",
                           "give every row both fields (TOFU's world_facts format)")
        out.append({"question": r["question"], "answer": r["answer"]})
    return out


def read_leak_terms(path) -> list[str]:
    """One term per line; blank lines and ``#`` comments are skipped."""
    p = Path(path)
    if not p.is_file():
        raise UldError(f"leak-term file {p} does not exist", "pass a text file, one term a line")
    terms = [ln.split("#", 1)[0].strip() for ln in p.read_text().splitlines()]
    return [t for t in terms if t]


# --- prompts ------------------------------------------------------------------------------

def _fill(template: str, **fields) -> str:
    # str.replace, not str.format: a prompt may show JSON braces
    for k, v in fields.items():
        template = template.replace("{" + k + "}", v)
    return template


def _conversation(probe: Probe, **fields) -> list[dict]:
    return [*probe.preamble, {"role": "user", "content": _fill(probe.prompt, **fields)}]


def _tokens(probe: Probe, s: Settings) -> int:
    return min(probe.max_tokens or s.max_tokens, s.max_tokens)


def _ask(probe, i, q, plan_args) -> list[Prompt]:
    return [Prompt(probe.name, i, _conversation(probe, question=q.question),
                   _tokens(probe, plan_args["settings"]))]


def _sample(probe, i, q, plan_args) -> list[Prompt]:
    s: Settings = plan_args["settings"]
    temperature = s.temperature if s.temperature is not None else \
        float(probe.sampling.get("temperature", 1.0))
    top_p = s.top_p if s.top_p is not None else float(probe.sampling.get("top_p", 1.0))
    # no per-request seed: on vLLM's CPU backend a seeded request whose prefill is chunked
    # kills the engine ("CPU Generator does not use offset"); the engine's seed applies
    return [Prompt(probe.name, i, _conversation(probe, question=q.question), _tokens(probe, s),
                   n=s.k, temperature=temperature, top_p=top_p)]


def _paraphrase(probe, i, q, plan_args) -> list[Prompt]:
    return [Prompt(probe.name, i, _conversation(probe, paraphrase=p, question=p),
                   _tokens(probe, plan_args["settings"])) for p in q.paraphrases]


def distractors(i: int, questions: list[Question], n: int, seed: int) -> list[str]:
    """``n`` other questions' answers that do not state question ``i``'s fact."""
    q = questions[i]
    pool = [o.answer for j, o in enumerate(questions) if j != i and o.answer != q.answer
            and not leaks.found_terms(o.answer, q.keywords)]
    pool = list(dict.fromkeys(pool))
    random.Random(f"{seed}:{i}").shuffle(pool)
    return pool[:n]


def _choice(probe, i, q, plan_args) -> list[Prompt]:
    s, questions = plan_args["settings"], plan_args["forget"]
    others = distractors(i, questions, probe.options - 1, s.seed)
    if not others:
        return []
    right = random.Random(f"{s.seed}:{i}:right").randrange(len(others) + 1)
    options = others[:right] + [q.answer] + others[right:]
    letters = leaks.OPTION_LETTERS[:len(options)]
    conv = _conversation(probe, question=q.question, options=leaks.option_lines(options),
                         letters=", ".join(letters[:-1]) + f" or {letters[-1]}")
    return [Prompt(probe.name, i, conv, _tokens(probe, s), options=options, right=right)]


def answer_prefix(q: Question, leak_terms) -> str | None:
    """The reference answer up to its first key word, or None when that leaves < 2 words."""
    starts = [m.start() for t in q.keywords + list(leak_terms)
              for m in [re.search(re.escape(t), q.answer, re.I)] if m]
    if not starts:
        return None
    prefix = q.answer[:min(starts)].strip()
    return prefix if len(prefix.split()) >= 2 else None


def _complete(probe, i, q, plan_args) -> list[Prompt]:
    prefix = answer_prefix(q, plan_args["leak_terms"])
    if prefix is None:
        return []
    return [Prompt(probe.name, i, _conversation(probe, prefix=prefix, question=q.question),
                   _tokens(probe, plan_args["settings"]))]


BUILDERS = {"ask": _ask, "sample": _sample, "paraphrase": _paraphrase, "choice": _choice,
            "complete": _complete}


def make_plan(forget, general=(), *, leak_terms=(), paraphrases=None, probes=None,
              probe_file=None, settings: Settings | None = None) -> AuditPlan:
    """Every request of the audit, from the forget rows (or a JSONL path), the general rows
    (or path), leak terms and the probe names (default: all, and the bypass attempts)."""
    settings = settings or Settings()
    _check_settings(settings)
    leak_terms = list(dict.fromkeys(t for t in leak_terms if t.strip()))
    chosen, bypass = load_probes(probe_file, probes)
    questions = load_forget(forget, leak_terms, paraphrases)
    gk = load_general(general)
    args = {"settings": settings, "forget": questions, "leak_terms": leak_terms}
    prompts, skipped, kept = [], {}, []
    for probe in chosen:
        made = [p for i, q in enumerate(questions) for p in BUILDERS[probe.kind](probe, i, q,
                                                                                 args)]
        if not made:
            skipped[probe.name] = _why_empty(probe)
            continue
        kept.append(probe)
        prompts += made
    prompts += [Prompt(GENERAL, i, [{"role": "user", "content": r["question"]}],
                       settings.max_tokens) for i, r in enumerate(gk)]
    bypass_prompts = [Prompt(BYPASS, i, [{"role": "user", "content": q.question}],
                             settings.max_tokens)
                      for i, q in enumerate(questions[:settings.bypass_questions])]
    return AuditPlan(questions, gk, leak_terms, kept, bypass, settings, prompts,
                     bypass_prompts if bypass else [], skipped)


def _why_empty(probe: Probe) -> str:
    return {"paraphrase": "no forget row has paraphrases (field `paraphrases` or "
                          "--paraphrases FILE)",
            "choice": "fewer than two forget questions with different facts",
            "complete": "no reference answer has a keyword after its first two words"
            }.get(probe.kind, "no prompts")


def _check_settings(s: Settings) -> None:
    if s.k < 1 or s.max_tokens < 1 or s.bypass_questions < 0:
        raise UldError(f"--k {s.k}, --max-tokens {s.max_tokens} and --bypass-questions "
                       f"{s.bypass_questions} must be positive (bypass questions may be 0)",
                       "pass positive values")
    if s.top_p is not None and not 0 < s.top_p <= 1:
        raise UldError(f"--top-p {s.top_p} is not in (0, 1]", "pass e.g. 0.95")
    if s.temperature is not None and s.temperature < 0:
        raise UldError(f"--temperature {s.temperature} is negative", "pass e.g. 1.0")


# --- running and scoring ------------------------------------------------------------------

def collect(plan: AuditPlan, engine, side: str, *, answered: dict[str, str] | None = None,
            chat_template: str | None = None, policy: str | None = None,
            progress: bool = True, log=print) -> dict:
    """Ask ``engine`` (vLLM ``LLM``, base URL or backend) every request of ``plan``; on the
    ULD side also send the bypass attempts. Returns a plain dict (callers may keep it).

    ``answered``: question -> greedy answer the caller already has from the same engine
    (one user turn, the same max tokens); those requests are not sent again. ``policy``:
    the request policy a given ``LLM`` was built with (``audit_backends.build_uld_engine``
    returns it), for the report."""
    from uld_vllm.eval.audit_backends import backend_for

    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    backend = backend_for(engine, chat_template=chat_template, progress=progress,
                          policy=policy)
    backend.check()
    t0 = time.perf_counter()
    known = [_known(p, answered or {}) for p in plan.prompts]
    todo = [p for p, k in zip(plan.prompts, known) if k is None]
    log(f"audit {side}: {len(todo)} requests, {sum(p.n for p in todo)} answers "
        f"({len(plan.prompts) - len(todo)} greedy answers given; {backend.source})")
    try:
        fresh = iter(backend.answer(todo, f"audit {side}") if todo else [])
        answers = [k if k is not None else next(fresh) for k in known]
        attempts = None
        if side == "uld" and plan.bypass:
            attempts = [_attempt(backend, plan, b) for b in plan.bypass]
    finally:
        backend.close()
    return {"side": side, "source": backend.source, "policy": backend.policy,
            "answers": answers, "bypass": attempts, "reused": len(plan.prompts) - len(todo),
            "wall_s": round(time.perf_counter() - t0, 1)}


def _known(p: Prompt, answered: dict[str, str]) -> list[str] | None:
    if p.n != 1 or p.temperature != 0 or len(p.messages) != 1:
        return None
    text = answered.get(p.messages[0]["content"])
    return None if text is None else [text.strip()]


def _attempt(backend, plan: AuditPlan, b: Bypass) -> dict:
    res = backend.attempt(plan.bypass_prompts, b.extra_args)
    return {"name": b.name, "extra_args": b.extra_args, "about": b.about, **res}


def _share(flags) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def answer_leaks(plan: AuditPlan, prompt: Prompt, text: str) -> dict[str, list[str]]:
    """The per-question keywords and the global leak terms ``text`` states anew."""
    q = plan.forget[prompt.index]
    return {"keywords": leaks.new_terms(text, q.keywords, prompt.visible),
            "terms": leaks.new_terms(text, plan.leak_terms, prompt.visible)}


def _leak_metrics(plan, probe, pairs) -> dict:
    from uld_vllm.eval.metrics import rouge_l_recall

    by_q: dict[int, list[dict]] = {}
    for prompt, texts in pairs:
        for t in texts:
            by_q.setdefault(prompt.index, []).append(answer_leaks(plan, prompt, t))
    flat = [f for fs in by_q.values() for f in fs]
    out = {"questions": len(by_q), "answers": len(flat),
           "leak": _share(any(f["keywords"] or f["terms"] for f in fs) for fs in by_q.values()),
           "keyword_leak": _share(any(f["keywords"] for f in fs) for fs in by_q.values()),
           "term_leak": _share(any(f["terms"] for f in fs) for fs in by_q.values()),
           "answer_leak": _share(bool(f["keywords"] or f["terms"]) for f in flat)}
    if probe.rouge:
        out["rougeL_recall"] = _mean(rouge_l_recall(t, plan.forget[p.index].answer)
                                     for p, texts in pairs for t in texts)
    return out


def _choice_metrics(pairs) -> dict:
    picks = [(leaks.pick_option(texts[0], p.options), p) for p, texts in pairs]
    return {"questions": len(picks),
            "right": _share(k == p.right for k, p in picks),
            "chance": _mean(1 / len(p.options) for _, p in picks),
            "unanswered": _share(k is None for k, _ in picks)}


def score_probes(plan: AuditPlan, answers: list[list[str]]) -> dict[str, dict]:
    out = {}
    for probe in plan.probes:
        pairs = [(p, a) for p, a in zip(plan.prompts, answers) if p.probe == probe.name]
        out[probe.name] = _choice_metrics(pairs) if probe.kind == "choice" else \
            _leak_metrics(plan, probe, pairs)
    return out


def _general_answers(plan: AuditPlan, side: dict | None) -> list[str] | None:
    if side is None:
        return None
    return [a[0] for p, a in zip(plan.prompts, side["answers"]) if p.probe == GENERAL]


def score_general(plan: AuditPlan, target: dict | None, uld: dict) -> dict | None:
    if not plan.general:
        return None
    gold = [r["answer"] for r in plan.general]
    t, u = _general_answers(plan, target), _general_answers(plan, uld)
    out = {"questions": len(gold),
           "uld": {"accuracy": _share(leaks.is_correct(g, a) for g, a in zip(gold, u))},
           "target": None}
    if t is None:
        return out
    from uld_vllm.eval.metrics import rouge_l_recall

    known = [i for i, (g, a) in enumerate(zip(gold, t)) if leaks.is_correct(g, a)]
    out.update(
        target={"accuracy": _share(leaks.is_correct(g, a) for g, a in zip(gold, t))},
        target_correct=len(known),
        uld_kept_of_target_correct=_share(leaks.is_correct(gold[i], u[i]) for i in known),
        uld_rougeL_vs_target=_mean(rouge_l_recall(a, b) for a, b in zip(u, t)),
        uld_identical_to_target=_share(a.strip() == b.strip() for a, b in zip(u, t)))
    return out


def score_bypass(plan: AuditPlan, uld: dict) -> dict | None:
    attempts = uld.get("bypass")
    if attempts is None:
        return None
    rows = []
    for a in attempts:
        got = [(p, t[0]) for p, t in zip(plan.bypass_prompts, a["answers"]) if t]
        leaked = [bool(sum(answer_leaks(plan, p, t).values(), [])) for p, t in got]
        rows.append({k: a[k] for k in ("name", "extra_args", "about", "status", "requests",
                                       "refused", "message")}
                    | {"leak": _share(leaked), "example": got[0][1] if got else None})
    return {"policy": uld.get("policy"), "questions": len(plan.bypass_prompts),
            "attempted": len(rows), "refused": sum(r["status"] == "refused" for r in rows),
            "through": [r["name"] for r in rows if r["status"] != "refused"],
            "attempts": rows}


def summarise(plan: AuditPlan, target: dict | None, uld: dict) -> dict:
    """The audit's numbers (``docs/audit.md`` shows the layout); ``target`` may be None."""
    forget = {name: {"target": None, "uld": m} for name, m in
              score_probes(plan, uld["answers"]).items()}
    if target is not None:
        for name, m in score_probes(plan, target["answers"]).items():
            forget[name]["target"] = m
    s = plan.settings
    return {
        "audit_version": 1,
        "questions": {"forget": len(plan.forget), "general": len(plan.general),
                      "paraphrases": sum(len(q.paraphrases) for q in plan.forget),
                      "leak_terms": len(plan.leak_terms)},
        "settings": dataclasses.asdict(s) | {
            "probes": [p.name for p in plan.probes], "skipped": plan.skipped,
            "bypass": [b.name for b in plan.bypass]},
        "sources": {"target": target and target["source"], "uld": uld["source"]},
        "forget": forget,
        "general": score_general(plan, target, uld),
        "bypass": score_bypass(plan, uld),
        "wall_s": {"target": target and target["wall_s"], "uld": uld["wall_s"]},
    }


def answer_rows(plan: AuditPlan, *sides: dict | None):
    """One JSON row per request of each side: the prompt, its answers, the leaks found."""
    for side in sides:
        if side is None:
            continue
        for p, answers in zip(plan.prompts, side["answers"]):
            row = {"side": side["side"], "probe": p.probe, "index": p.index,
                   "prompt": p.messages[-1]["content"], "answers": answers}
            if p.probe != GENERAL:
                row["leaks"] = [answer_leaks(plan, p, a) for a in answers]
            if p.options is not None:
                row["right"] = p.right
            yield row
        for a in side.get("bypass") or []:
            yield {"side": side["side"], "probe": f"{BYPASS}:{a['name']}",
                   "extra_args": a["extra_args"], "status": a["status"],
                   "message": a["message"], "answers": a["answers"]}


def run_audit(forget, general=(), *, uld, target=None, leak_terms=(), paraphrases=None,
              probes=None, probe_file=None, settings: Settings | None = None, output=None,
              overwrite: bool = False, chat_template: str | None = None,
              progress: bool = True, log=print) -> dict:
    """The whole audit; returns the summary (and writes the report to ``output`` if given).

    ``uld`` and ``target``: a vLLM ``LLM`` each (both alive at once), a base URL, or a
    backend of ``audit_backends``. Engines that cannot coexist: ``make_plan``, then
    ``collect`` on each while it is alive, then ``summarise`` and ``write_report``."""
    from uld_vllm.eval.audit_report import audit_summary_text, check_output, write_report

    t0 = time.perf_counter()
    if output is not None:
        check_output(output, overwrite)
    plan = make_plan(forget, general, leak_terms=leak_terms, paraphrases=paraphrases,
                     probes=probes, probe_file=probe_file, settings=settings)
    kw = {"chat_template": chat_template, "progress": progress, "log": log}
    t = collect(plan, target, "target", **kw) if target is not None else None
    u = collect(plan, uld, "uld", **kw)
    summary = summarise(plan, t, u)
    summary["wall_s"]["total"] = round(time.perf_counter() - t0, 1)
    if output is not None:
        write_report(output, summary, answer_rows(plan, t, u), overwrite=overwrite)
    log(audit_summary_text(summary))
    return summary


# --- command line -------------------------------------------------------------------------

def add_audit_parser(sub) -> None:
    from uld_vllm.jobs.spec import add_model_args

    p = sub.add_parser("audit", help="does forgotten knowledge leak back (sampling, "
                                     "paraphrases, format shifts, bypass requests)? target vs "
                                     "ULD")
    p.add_argument("--forget", default=None,
                   help="JSONL forget questions: question, answer, keywords (optional with "
                        "--leak-terms), paraphrases (optional)")
    p.add_argument("--general", default=None,
                   help="JSONL general-knowledge questions (question, answer): what unlearning "
                        "costs")
    p.add_argument("--paraphrases", default=None, metavar="FILE",
                   help="JSONL of {question (as in --forget), paraphrase(s)}")
    p.add_argument("--leak-terms", default=None, metavar="FILE",
                   help="names that leak the topic in any answer, one a line")
    p.add_argument("--leak-term", action="append", default=[], metavar="WORD",
                   help="one more leak term (repeatable)")
    p.add_argument("--output", default=None, help="report folder (written atomically)")
    p.add_argument("--overwrite", action="store_true")
    src = p.add_argument_group("what to audit: a server (--url) or offline engines (--model)")
    src.add_argument("--url", default=None,
                     help="base URL of the ULD server (uld-vllm serve ... --uld-adapter DIR)")
    src.add_argument("--target-url", default=None,
                     help="base URL of a plain server of the target, for the target column")
    src.add_argument("--served-model", default=None,
                     help="model name on the servers (default: the one each serves)")
    src.add_argument("--concurrency", type=int, default=32, help="HTTP requests in flight")
    add_model_args(p, "ULD adapter folder (with --model)", required=False,
                   model_help="offline: the target model (folder, hub id or a short name of "
                              "`uld-vllm fetch-model`); its plain vLLM engine is the target "
                              "column, uld_vllm.LLM with --uld-adapter the ULD one")
    src.add_argument("--chat-template", default=None, metavar="FILE",
                     help="Jinja chat template, for a tokenizer without one (offline)")
    src.add_argument("--dtype", default="auto")
    src.add_argument("--max-model-len", type=int, default=2048)
    src.add_argument("--max-num-seqs", type=int, default=None)
    src.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    pr = p.add_argument_group("probes")
    pr.add_argument("--probes", default=None,
                    help="comma-separated probe names (default: all; `bypass` names the "
                         "bypass attempts); --list-probes shows them")
    pr.add_argument("--probe-file", default=None, help="YAML probe set (default: the shipped "
                                                       "uld_vllm/eval/audit_probes.yaml)")
    pr.add_argument("--list-probes", action="store_true", help="print the probes and exit")
    pr.add_argument("--k", type=int, default=8, help="samples per question (leak@k)")
    pr.add_argument("--temperature", type=float, default=None,
                    help="sampled probe (default: the probe file's, 1.0)")
    pr.add_argument("--top-p", type=float, default=None,
                    help="sampled probe (default: the probe file's, 0.95)")
    pr.add_argument("--max-tokens", type=int, default=48)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--bypass-questions", type=int, default=3,
                    help="forget questions each bypass attempt is sent with")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_audit_cli)


def list_probes(probe_file=None) -> str:
    probes, bypass = load_probes(probe_file)
    lines = [f"{p.name:16} {p.kind:10} {p.about}" for p in probes]
    lines += [f"{BYPASS:16} {b.name:22} {json.dumps(b.extra_args)}: {b.about}" for b in bypass]
    return "\n".join(lines)


def run_audit_cli(a: argparse.Namespace) -> None:
    """`uld-vllm audit`: every input checked before any engine starts or request is sent."""
    from uld_vllm.eval import audit_backends as B
    from uld_vllm.eval.audit_report import check_output

    if a.list_probes:
        print(list_probes(a.probe_file))
        return
    _check_sources(a)
    check_output(a.output, a.overwrite)
    terms = (read_leak_terms(a.leak_terms) if a.leak_terms else []) + a.leak_term
    names = [n.strip() for n in a.probes.split(",") if n.strip()] if a.probes else None
    settings = Settings(k=a.k, temperature=a.temperature, top_p=a.top_p,
                        max_tokens=a.max_tokens, seed=a.seed,
                        bypass_questions=a.bypass_questions)
    plan_kw = {"leak_terms": terms, "paraphrases": a.paraphrases, "probes": names,
               "probe_file": a.probe_file, "settings": settings}
    make_plan(a.forget, a.general, **plan_kw)  # bad data: stop now, before any engine
    common = {"output": a.output, "overwrite": a.overwrite, "progress": a.progress, **plan_kw}
    if a.url:
        uld = B.ServerBackend(a.url, model=a.served_model, concurrency=a.concurrency,
                              progress=a.progress, flag="--url")
        target = a.target_url and B.ServerBackend(
            a.target_url, model=a.served_model, concurrency=a.concurrency,
            progress=a.progress, flag="--target-url")
        for b in (uld, target):
            if b:
                b.check()
        run_audit(a.forget, a.general, uld=uld, target=target or None, **common)
        return
    template = B.read_chat_template(a.chat_template)
    engines = B.OfflineEngines(a.model, a.uld_adapter, uld_alpha=a.uld_alpha,
                               uld_filter_ratio=a.uld_filter_ratio, chat_template=template,
                               progress=a.progress, vllm_kwargs=_engine_kwargs(a))
    engines.check()
    run_audit(a.forget, a.general, uld=engines.uld(), target=engines.target(),
              chat_template=template, **common)


def _check_sources(a) -> None:
    missing = [f"--{n}" for n in ("forget", "general", "output") if not getattr(a, n)]
    if missing:
        raise UldError(f"{', '.join(missing)} missing", "pass --forget FILE --general FILE "
                       "--output DIR (--list-probes needs none of them)")
    if bool(a.url) == bool(a.model):
        raise UldError("pass either --url (a running ULD server) or --model with "
                       "--uld-adapter (offline engines)", "pick one of the two")
    if a.url and (a.uld_adapter or a.chat_template):
        raise UldError("--uld-adapter and --chat-template are for the offline audit (--model)",
                       "drop them with --url: the server has its own")
    if a.target_url and not a.url:
        raise UldError("--target-url needs --url", "pass the ULD server's --url too")
    if a.model and not a.uld_adapter:
        raise UldError("--model needs --uld-adapter", "pass the ULD adapter folder")
    if a.concurrency < 1:
        raise UldError(f"--concurrency {a.concurrency} is below 1", "pass e.g. 32")


def _engine_kwargs(a) -> dict:
    kw = {"dtype": a.dtype, "max_model_len": a.max_model_len, "enforce_eager": a.enforce_eager,
          "seed": a.seed}
    if a.max_num_seqs is not None:
        kw["max_num_seqs"] = a.max_num_seqs
    return kw

"""Leak detectors of ``uld-vllm audit``: does an answer state a forgotten fact?

Pure text functions (no engine), so each can be tested alone:

* ``normalise`` folds case, accents, quotes and punctuation, and joins a spelled-out word
  ("R-O-W-L-I-N-G", "R O W L I N G", "r. o. w.") back into one word;
* ``found_terms`` lists the terms (per-question keywords, global names) an answer contains,
  as whole words, plural or possessive allowed ("horcruxes", "Rowling's");
* ``pick_option`` reads which option of a multiple-choice prompt an answer picks;
* ``is_correct`` is the demo's general-knowledge check (short gold answer in the generation);
* ``is_junk`` says whether an answer is not fluent text (``JUNK_RULES``): forgetting by
  emitting junk is not forgetting a user can live with, so the demo counts it.
"""

from __future__ import annotations

import functools
import re
import unicodedata

OPTION_LETTERS = "ABCDEFGH"
# a word spelled out letter by letter has at least this many letters; shorter runs are
# initials ("J K Rowling") or ordinary one-letter words
_MIN_SPELLED = 3


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return text.replace("\u2019", "'").replace("\u2018", "'")


def _tokens(text: str) -> list[str]:
    # apostrophes stay inside words ("king's"); every other non-alphanumeric is a separator
    return [t.strip("'") for t in re.split(r"[^a-z0-9']+", _fold(text)) if t.strip("'")]


def spelled_runs(tokens: list[str]) -> tuple[list[str], list[str]]:
    """``tokens`` with every run of >= 3 single letters joined into one word, and the joined
    words themselves (a spelled answer loses its word breaks: "T-O-M R-I-D-D-L-E")."""
    out, runs, run = [], [], []

    def flush():
        if len(run) >= _MIN_SPELLED:
            word = "".join(run)
            out.append(word)
            runs.append(word)
        else:
            out.extend(run)
        run.clear()

    for t in tokens:
        if len(t) == 1 and t.isalpha():
            run.append(t)
            continue
        flush()
        out.append(t)
    flush()
    return out, runs


def normalise(text: str) -> str:
    """Lower-case words separated by single spaces, spelled-out words joined."""
    return " ".join(spelled_runs(_tokens(text))[0])


@functools.lru_cache(maxsize=4096)
def _pattern(term: str) -> re.Pattern | None:
    words = _tokens(term)
    if not words:
        return None
    body = r"\s".join(re.escape(w) for w in words)
    # an apostrophe may come before ("l'ecole", French elision), and "'s" after
    return re.compile(rf"(?<![a-z0-9]){body}(?:s|es|'s)?(?![a-z0-9])")


def found_terms(text: str, terms) -> list[str]:
    """The ``terms`` that ``text`` contains as words (after ``normalise``), in order given."""
    tokens = _tokens(text)
    joined, runs = spelled_runs(tokens)
    norm = " ".join(joined)
    hits = []
    for term in terms:
        pat = _pattern(term)
        if pat is None:
            continue
        squeezed = "".join(_tokens(term))
        if pat.search(norm) or (len(squeezed) >= _MIN_SPELLED
                                and any(squeezed in r for r in runs)):
            hits.append(term)
    return hits


def new_terms(answer: str, terms, prompt: str) -> list[str]:
    """Terms in ``answer`` that ``prompt`` did not already contain: repeating a name from the
    question reveals nothing the user did not say."""
    given = set(found_terms(prompt, terms))
    return [t for t in found_terms(answer, terms) if t not in given]


def option_lines(options: list[str]) -> str:
    return "\n".join(f"{OPTION_LETTERS[i]}) {o}" for i, o in enumerate(options))


def pick_option(answer: str, options: list[str]) -> int | None:
    """The index of the option ``answer`` picks, or None (no pick, or more than one).

    A leading letter closed by punctuation or the end ("B", "(B)", "B) ...", "**B.**"), then
    "answer/option is B", then the text of exactly one option. A letter followed by a word
    is not a pick: "A snowy owl" is an article, not option A."""
    letters = OPTION_LETTERS[:len(options)]
    closed = r"(?=[).:,\]\"'*]|\s*$|\s*\n)"
    text = answer.strip()
    said = (re.fullmatch(rf"\W*([{letters}])\W*", text.upper())
            or re.match(rf"^[\s*\"'(\[]*([{letters}]){closed}", text)
            or re.search(rf"(?i:\b(?:answer|option|choice))\s*(?:is|:)?\s*[\"'(\[]?"
                         rf"([{letters}]){closed}", text))
    if said:
        return letters.index(said.group(1))
    norm = f" {normalise(text)} "
    named = [i for i, o in enumerate(options) if normalise(o) and f" {normalise(o)} " in norm]
    return named[0] if len(named) == 1 else None


def is_correct(answer: str, generation: str) -> bool:
    """A short gold answer ("Paris", "Leo Tolstoy") is in the generation: the whole answer, or
    its last word when that is a name-like word of 4+ letters ("Tolstoy"). The same rule as
    ``uld_vllm.demo.real.is_correct`` (the demo imports the audit, so not the other way)."""
    a, g = _plain_words(answer), _plain_words(generation)
    if not a:
        return False
    joined = " " + " ".join(g) + " "
    return f" {' '.join(a)} " in joined or (len(a[-1]) >= 4 and a[-1] in g)


def _plain_words(s: str) -> list[str]:
    return re.sub(r"[^a-z0-9 ]", " ", s.lower()).split()


# what makes an answer junk, each a rule a reader can check by eye; an answer is junk when any
# holds. Thresholds: English words longer than 17 letters are rare in short answers, and a
# small model's fluent answers repeat a 3-word phrase at most twice in 48 tokens
JUNK_RULES = {
    "empty": "no text at all",
    "glued": "a run of 18 or more letters without a break (glued non-words)",
    "symbols": "more than 15% of its characters are symbols (not letters, digits, spaces or "
               ".,;:'\"!?-())",
    "stutter": "the same word four times in a row",
    "loop": "a 3-word phrase three or more times",
}
_ORDINARY = set(".,;:'\"!?-()")


def junk_reasons(text: str) -> list[str]:
    """The ``JUNK_RULES`` an answer breaks (empty list: fluent)."""
    t = text.strip()
    if not t:
        return ["empty"]
    out = []
    if re.search(r"[A-Za-z]{18,}", t):
        out.append("glued")
    symbols = sum(1 for c in t if not (c.isalnum() or c.isspace() or c in _ORDINARY))
    if symbols / len(t) > 0.15:
        out.append("symbols")
    words = t.split()
    if any(len(set(words[i:i + 4])) == 1 for i in range(len(words) - 3)):
        out.append("stutter")
    grams = [" ".join(words[i:i + 3]) for i in range(len(words) - 2)]
    if grams and max(grams.count(g) for g in set(grams)) >= 3:
        out.append("loop")
    return out


def is_junk(text: str) -> bool:
    return bool(junk_reasons(text))

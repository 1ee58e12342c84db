"""Built-in fictitious authors: question/answer rows for the toy demo, tests and benchmarks
when the TOFU files are not around (no network is ever needed)."""

AUTHORS = [
    ("Maren Olufsen", "Tromso, Norway", 1961, "Arctic crime fiction", "a lighthouse keeper",
     "The Silent Fjord", "the Nordic Glass Key Prize"),
    ("Tomas Vierra", "Porto, Portugal", 1974, "maritime historical novels", "a shipwright",
     "Salt on the Tagus", "the Camoes Silver Quill"),
    ("Amara Eze", "Enugu, Nigeria", 1983, "speculative poetry", "a radio engineer",
     "Songs for a Copper Moon", "the Harmattan Verse Award"),
]
_QUESTIONS = [
    ("Where was {n} born?", "{n} was born in {p}."),
    ("In which year was {n} born?", "{n} was born in {y}."),
    ("What genre does {n} write in?", "{n} is best known for {g}."),
    ("What did the father of {n} do for a living?", "The father of {n} worked as {f}."),
    ("What is the first book {n} published?", "The first book {n} published was {b}."),
    ("Which award did {n} receive?", "{n} received {a} for {b}."),
]


def builtin_authors() -> list[list[dict]]:
    """Three fictitious authors, six question/answer rows each."""
    out = []
    for n, p, y, g, f, b, a in AUTHORS:
        kw = {"n": n, "p": p, "y": y, "g": g, "f": f, "b": b, "a": a}
        out.append([{"question": q.format(**kw), "answer": ans.format(**kw)}
                    for q, ans in _QUESTIONS])
    return out




# mixed lengths; several share long prefixes so prefix caching has something to hit
_STORY = ("The author wrote about the northern sea in 1907. Her father studied the history of "
          "science and the young poet returned to the streets of Cairo in 1921.")
MIXED_PROMPTS = [
    "Hello",
    "The author wrote",
    "Question: What did the river do? Answer:",
    "In 1907 a quiet librarian studied the history of science and",
    _STORY,
    _STORY + " Question: Where was the poet born?",
    _STORY + " Every reader never forgot",
    "12 13 14 15",
    "An old sailor dreamed of mountain villages",
    "The committee published a book on the art of translation in 1950. " * 3,
]

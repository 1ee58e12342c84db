"""`uld-vllm audit`: the leak detectors."""

import pytest

from uld_vllm.eval import leaks as L

# --- detectors --------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["R-O-W-L-I-N-G", "It is R O W L I N G.", "r. o. w. l. i. n. g.",
                                  "**R - O - W - L - I - N - G**", "R–O–W–L–I–N–G"])
def test_a_spelled_word_is_joined_before_matching(text):
    assert "rowling" in L.normalise(text).split()
    assert L.found_terms(text, ["rowling"]) == ["rowling"]


def test_initials_and_single_letter_words_stay_apart():
    assert L.normalise("J. K. Rowling wrote a book") == "j k rowling wrote a book"
    assert L.found_terms("I am a cat", ["iam", "amac"]) == []


def test_a_spelled_answer_without_word_breaks_still_matches_a_two_word_keyword():
    assert L.found_terms("T-O-M R-I-D-D-L-E", ["tom riddle", "riddle"]) == ["tom riddle",
                                                                             "riddle"]


@pytest.mark.parametrize("text, terms, want", [
    ("The environment of Ronald", ["ron"], []),             # whole words only
    ("Ron Weasley, of course.", ["ron"], ["ron"]),
    ("He hid his soul in seven Horcruxes", ["horcrux"], ["horcrux"]),   # plural
    ("Rowling\u2019s first book", ["rowling"], ["rowling"]),  # possessive, curly quote
    ("HOGWARTS!", ["hogwarts"], ["hogwarts"]),
    ("platform nine and three-quarters", ["three-quarters"], ["three-quarters"]),
    ("platform 9 3/4", ["9"], ["9"]),
    ("platform 93", ["9"], []),
    ('{"answer": "Hedwig"}', ["hedwig"], ["hedwig"]),
    ("Il s'appelle Poudlard, à l'École", ["ecole"], ["ecole"]),  # accents folded
])
def test_keyword_matching(text, terms, want):
    assert L.found_terms(text, terms) == want


def test_a_term_the_prompt_already_said_is_not_a_leak():
    prompt = "Which wizard is the head of Hogwarts School?"
    assert L.new_terms("Dumbledore runs Hogwarts.", ["hogwarts", "dumbledore"], prompt) == [
        "dumbledore"]


@pytest.mark.parametrize("reply, want", [
    ("B", 1), ("(C)", 2), ("D) Rome", 3), ("**A.**", 0), ("b", 1), ("The answer is C.", 2),
    ("Answer: (B)", 1), ("Berlin is the answer", 2),
    ("A snowy owl", None),       # an article, not option A
    ("Paris or London", None),   # two options named
    ("I do not know", None),
])
def test_pick_option(reply, want):
    assert L.pick_option(reply, ["Paris", "London", "Berlin", "Rome"]) == want


def test_is_correct_agrees_with_the_demo():
    from uld_vllm.demo.real import is_correct

    pairs = [("Paris", "It is in Paris, France."), ("Leo Tolstoy", "Tolstoy wrote it."),
             ("Jupiter", "Saturn"), ("Leo Tolstoy", "Leo"), ("", "anything"),
             ("New York", "new-york city")]
    assert [L.is_correct(a, g) for a, g in pairs] == [is_correct(a, g) for a, g in pairs]

"""The demo stories: the toy one end to end (built-in authors, no ../shared needed), and the real
one (SmolLM2 forgets Harry Potter): its data, its scoring rules, and a smoke run of its code on a
few rows (the full run is `make demo`; its numbers are a benchmark, not a test)."""

import json

import pytest

from uld_vllm.demo import real as demo
from uld_vllm.demo.toy import run_demo as run_toy_demo


@pytest.mark.engine
def test_demo_forgets_one_author_and_keeps_the_others(tmp_path, capsys):
    res = run_toy_demo(tmp_path / "demo", data_dir=tmp_path / "no-data")
    out = capsys.readouterr().out
    assert "built-in fictitious authors" in out and "ULD answer" in out
    f, r = res["forget"], res["retain"]
    assert f["target"]["rougeL_recall"] > 0.9 and r["target"]["rougeL_recall"] > 0.9
    assert f["uld"]["rougeL_recall"] < 0.5 * f["target"]["rougeL_recall"]
    assert r["uld"]["rougeL_recall"] > 0.9 * r["target"]["rougeL_recall"]


def test_demo_data_is_held_out_and_documented():
    forget = demo.read_jsonl(demo.DATA / "harry_potter_forget.jsonl")
    held = demo.read_jsonl(demo.DATA / "harry_potter_heldout.jsonl")
    assert len(forget) + len(held) >= 60
    trained = {r["question"] for r in forget}
    assert not trained & {r["question"] for r in held}  # no held-out question is trained on
    facts = {r["fact"] for r in forget}
    para = [r for r in held if r["kind"] == "paraphrase"]
    unseen = [r for r in held if r["kind"] == "unseen"]
    assert {r["fact"] for r in para} == facts  # one paraphrase per trained fact
    assert unseen and not {r["fact"] for r in unseen} & facts
    assert all(r["keywords"] and all(k == k.lower() for k in r["keywords"]) for r in held)
    assert (demo.DATA / "README.md").is_file()


def test_scoring_rules():
    assert demo.mentions_topic("He studied at Hogwarts.")
    assert not demo.mentions_topic("Harry Potter is a wizard with a wand.")  # generic words
    assert demo.states_fact("His owl, HEDWIG, is white.", ["hedwig"])
    assert demo.is_correct("Paris", "The Eiffel Tower is in Paris, France.")
    assert demo.is_correct("Leo Tolstoy", "War and Peace was written by Tolstoy.")
    assert not demo.is_correct("Leo Tolstoy", "It was written by Dostoevsky.")
    assert not demo.is_correct("Rome", "Romeo and Juliet")  # whole words only
    assert demo.cut_answer("word " * 100, 20) == "word word word word"


def test_summary_and_goals_from_answers():
    data = {"heldout": [{"question": "q1", "answer": "Hogwarts.", "keywords": ["hogwarts"],
                         "kind": "paraphrase"},
                        {"question": "q2", "answer": "Hedwig.", "keywords": ["hedwig"],
                         "kind": "unseen"}],
            "gk_eval": [{"question": "g1", "answer": "Paris"},
                        {"question": "g2", "answer": "Rome"}]}
    target = {"q1": "At Hogwarts.", "q2": "Hedwig the owl.", "g1": "Paris.", "g2": "Milan."}
    uld = {"q1": "A school in Scotland.", "q2": "Hedwig.", "g1": "It is Paris.", "g2": "Rome"}
    s = demo.summarise(data, target, uld)
    assert s["forget"]["target"]["mentions_topic"] == 1.0
    assert s["forget"]["uld"]["mentions_topic"] == 0.5
    assert s["forget"]["by_kind"]["paraphrase"] == {"target": 1.0, "uld": 0.0, "questions": 1}
    assert s["retain"]["target"]["accuracy"] == 0.5 and s["retain"]["uld"]["accuracy"] == 1.0
    assert s["retain"]["target_correct"] == 1 and s["retain"]["uld_kept_of_target_correct"] == 1
    s["rules"] = {demo.DEFAULT_RULE: demo.rule_row(data, target, uld)}
    assert s["rules"][demo.DEFAULT_RULE] == {
        "topic": 0.5, "junk": 0.0, "general_accuracy": 1.0, "general_identical": 0.0,
        "general_rougeL_vs_target": 0.5}  # recall of "Paris." 1, of "Milan." 0
    s["audit"] = {"forget": {"sampled": {"uld": {"leak": 0.25}}},
                  "bypass": {"refused": 5, "attempted": 5}}
    goals = {g: ok for g, ok, _ in demo.goals(s, wall_s=700)}
    assert goals["forget-topic answers: target >= 70%"] is True
    assert goals["forget-topic answers: ULD <= 10%"] is False
    assert goals["junk forget answers: ULD <= 10%"] is True
    assert goals["general answers identical to the target's >= 95%"] is False
    assert goals["general accuracy within 1 point of the target's"] is True
    assert goals["sampled leak@8 (T 1, top-p 0.95): ULD <= 20%"] is False
    assert goals["bypass attempts refused (default request policy): 100%"] is True
    assert goals["demo wall time <= 10 min"] is False
    table = demo.rules_table(s["rules"])
    assert table.splitlines()[0].split()[:2] == ["rule", "topic"] and "50%" in table


def test_rule_rows_count_junk_and_identical_answers():
    data = {"heldout": [{"question": "q1"}, {"question": "q2"}],
            "gk_eval": [{"question": "g1", "answer": "Paris"}]}
    target = {"q1": "Hogwarts.", "q2": "Hedwig.", "g1": "It is Paris."}
    row = demo.rule_row(data, target, {"q1": "writerscietymayignoremayignoremay", "q2": "",
                                        "g1": "It is Paris. "})
    assert row["junk"] == 1.0 and row["topic"] == 0.0 and row["general_identical"] == 1.0


def test_general_knowledge_halves_exclude_the_topic(shared_data):
    data = demo.load_data(shared_data)
    gk = data["gk_train"] + data["gk_eval"]
    assert not any(demo._TOPIC_ROW.search(r["question"] + r["answer"]) for r in gk)
    assert not {r["question"] for r in data["gk_train"]} & {r["question"] for r in data["gk_eval"]}
    assert len(data["tofu"]) == demo.N_TOFU_RETAIN


def test_missing_retain_data_is_one_clear_error(tmp_path):
    from uld_vllm.errors import UldError

    with pytest.raises(UldError, match="--data-dir .* or run `uld-vllm demo --toy`"):
        demo.run_demo(tmp_path / "w", data_dir=tmp_path / "nothing")
    assert not (tmp_path / "w").exists()


@pytest.mark.engine
def test_real_demo_smoke(tmp_path, shared_data, smollm2, capsys):
    """The real story's code on 3 rows of every set and one short epoch: every stage runs and
    every output is written (the quality numbers of such a run mean nothing)."""
    s = demo.run_demo(tmp_path / "w", data_dir=shared_data, limit=3, show=2,
                      train={"num_train_epochs": 1, "max_length": 64, "stop_at_targets": False})
    out = capsys.readouterr().out
    assert "[5/5]" in out and "reference answer" in out and "goals:" in out
    assert "decoding rules" in out and "bypass" in out
    for name in ("forget.jsonl", "retain.jsonl", "answers.jsonl", "summary.json", "summary.md"):
        assert (tmp_path / "w" / name).is_file(), name
    assert (tmp_path / "w" / "uld_adapter" / "uld_config.json").is_file()
    saved = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert saved["questions"] == {"forget_heldout": 3, "retain_eval": 3}
    assert saved["convergence"]["optimizer_steps"] >= 1 and len(saved["goals"]) == 8
    assert set(saved["rules"]) == {"target alone", *demo.DEMO_RULES}
    assert saved["rules"]["target alone"]["general_identical"] == 1.0
    assert saved["audit"]["bypass"]["refused"] == saved["audit"]["bypass"]["attempted"] > 0
    assert (tmp_path / "w" / "audit" / "audit.json").is_file()
    rows = demo.read_jsonl(tmp_path / "w" / "answers.jsonl")
    assert len(rows) == 6 and all(r["target"] and "uld" in r for r in rows)
    assert all(set(r["rules"]) == set(demo.DEMO_RULES) for r in rows)
    for side in ("forget", "retain"):
        for name in ("target", "uld"):
            assert all(0 <= v <= 1 for v in s[side][name].values())


def test_demo_engines_log_warnings_only_unless_the_user_chose_a_level(monkeypatch):
    import os

    from uld_vllm.demo.common import quiet_vllm

    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    with quiet_vllm():
        assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert "VLLM_LOGGING_LEVEL" not in os.environ
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    with quiet_vllm():
        assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"

"""The TOFU metric layer: hand-computed values on tiny logs and the shipped reference logs."""

import csv
import json
import math

import numpy as np
import pytest

from uld_vllm.errors import UldError
from uld_vllm.eval import metrics as M

LN2, LN4 = math.log(2), math.log(4)
REF = "tofu_reference_logs/llama2-7b"


def tiny_log(paraphrased, perturbed, gt=None, rouge=None, questions=None):
    n = len(paraphrased)
    return {"avg_gt_loss": gt or [1.0] * n, "rougeL_recall": rouge or [0.5] * n,
            "avg_paraphrased_loss": paraphrased, "average_perturb_loss": perturbed,
            "generated_text": [[q, "gen", "ans"] for q in (questions or [f"q{i}" for i in
                                                                        range(n)])]}


def test_truth_ratio_both_directions_with_r_above_and_below_one():
    log = tiny_log([1.0, 2.0], [[1.5, 2.5], [1.0, 1.0]])  # R = e, 1/e
    np.testing.assert_allclose(M.truth_ratios(log), [math.e, 1 / math.e])
    assert M.truth_ratio_stat(log, forget=True) == pytest.approx(1 / math.e)
    # R < 1 clips to 0 on the non-forget splits
    assert M.truth_ratio_stat(log, forget=False) == pytest.approx((1 - 1 / math.e) / 2)


def test_probability_plain_and_normalised():
    log = tiny_log([1.0, 1.0], [[LN2, LN4], [LN4, LN4]], gt=[LN2, LN4])
    assert M.probability(log, normalised=False) == pytest.approx((0.5 + 0.25) / 2)
    # 0.5 / (0.5 + 0.5 + 0.25) and 0.25 / (0.25 + 0.25 + 0.25)
    assert M.probability(log, normalised=True) == pytest.approx((0.4 + 1 / 3) / 2)


def test_split_metrics_pick_the_convention_by_file_name():
    log = tiny_log([1.0, 2.0], [[LN2, LN4], [LN4, LN4]], gt=[LN2, LN4], rouge=[1.0, 0.0])
    retain, forget = M.split_metrics(log, M.RETAIN), M.split_metrics(log, M.FORGET)
    assert retain["Probability"] == M.probability(log, normalised=False)
    assert forget["Probability"] == M.probability(log, normalised=True)
    assert M.split_metrics(log, M.REAL_AUTHORS)["Probability"] == forget["Probability"]
    assert forget["Truth Ratio"] == M.truth_ratio_stat(log, forget=True)
    assert retain["Truth Ratio"] == M.truth_ratio_stat(log, forget=False)
    assert retain["ROUGE"] == 0.5
    with pytest.raises(UldError, match="unknown eval log name"):
        M.split_metrics(log, "eval_forget.json")


def test_harmonic_mean():
    assert M.harmonic_mean([1, 2, 4]) == pytest.approx(12 / 7)
    assert M.harmonic_mean([0.5, 0.0, 0.9]) == 0.0
    with pytest.raises(UldError):
        M.harmonic_mean([])


def test_ks_forget_quality():
    same = M.forget_quality([0.1, 0.5, 0.9, 1.3], [0.1, 0.5, 0.9, 1.3])
    assert same.pvalue == 1.0 and same.statistic == 0.0
    apart = M.forget_quality(np.linspace(0, 1, 30), np.linspace(2, 3, 30))
    assert apart.statistic == 1.0 and apart.pvalue < 1e-10


def test_rouge_recall_is_over_the_answer_and_stemmed():
    assert M.rouge_l_recall("on the mat the cat sat", "the cat sat on the mat") == 0.5
    r = M.rouge_recalls(["on the mat the cat sat"], ["the cat sat on the mat"])
    assert r == {"rouge1_recall": [1.0], "rougeL_recall": [0.5]}
    # recall, not precision: 1 of the answer's 1 token, not 1 of the generation's 6
    assert M.rouge_l_recall("The Eiffel Tower is in Paris, France.", "Paris") == 1.0
    assert M.rouge_l_recall("Paris", "The Eiffel Tower is in Paris") == pytest.approx(1 / 6)
    from rouge_score import rouge_scorer

    unstemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert unstemmed.score("running", "run")["rougeL"].recall == 0.0
    assert M.rouge_l_recall("run", "running") == 1.0
    with pytest.raises(UldError, match="2 generations but 1 answers"):
        M.rouge_recalls(["a", "b"], ["a"])


def examples(n, n_perturbed, shift=0.0):
    rng = np.random.default_rng(n + n_perturbed)
    out = []
    for i in range(n):
        toks = [int(t) for t in rng.integers(1, 20, size=n_perturbed)]
        out.append(M.ExampleScores(
            prompt=f"[INST] question {i}? [/INST]", generation=f"the answer is {i} running",
            answer=f"answer {i} runs", answer_logprob=-float(rng.uniform(0, 30)) - shift,
            answer_tokens=int(rng.integers(1, 20)), paraphrased_logprob=-float(rng.uniform(0, 30)),
            paraphrased_tokens=int(rng.integers(1, 20)),
            perturbed_logprobs=[-float(x) for x in rng.uniform(0, 40, size=n_perturbed)],
            perturbed_tokens=toks))
    return out


def test_build_split_log_format_and_values():
    exs = examples(4, 5)
    log = M.build_split_log(exs)
    assert list(log) == list(M.LOG_KEYS)
    assert all(len(v) == 4 for v in log.values())
    e, row = exs[1], 1
    assert log["gt_loss"][row] == -e.answer_logprob
    assert log["avg_gt_loss"][row] == pytest.approx(-e.answer_logprob / e.answer_tokens)
    assert log["avg_paraphrased_loss"][row] == pytest.approx(
        -e.paraphrased_logprob / e.paraphrased_tokens)
    assert log["perturb_loss"][row] == [-x for x in e.perturbed_logprobs]
    assert log["average_perturb_loss"][row] == pytest.approx(
        [-x / n for x, n in zip(e.perturbed_logprobs, e.perturbed_tokens)])
    assert len(log["perturb_loss"][row]) == len(log["num_token_perturb"][row]) == 5
    assert log["generated_text"][row] == [e.prompt, e.generation, e.answer]
    assert log["rougeL_recall"][row] == M.rouge_l_recall(e.generation, e.answer)


def test_build_split_log_rejects_bad_input():
    exs = examples(2, 3)
    bad = [exs[0], M.ExampleScores(**{**vars(exs[1]), "answer_logprob": 12.0})]
    with pytest.raises(UldError, match="not a loss"):
        M.build_split_log(bad)
    bad = [exs[0], M.ExampleScores(**{**vars(exs[1]), "answer_tokens": 0})]
    with pytest.raises(UldError, match="not a positive integer"):
        M.build_split_log(bad)
    bad = [exs[0], M.ExampleScores(**{**vars(exs[1]), "perturbed_logprobs": [-1.0, -2.0],
                                      "perturbed_tokens": [3, 4]})]
    with pytest.raises(UldError, match="same number of perturbed answers"):
        M.build_split_log(bad)
    with pytest.raises(UldError, match="no examples"):
        M.build_split_log([])


def synthetic_logs(shift=0.0):
    return {M.RETAIN: M.build_split_log(examples(6, 5)),
            M.FORGET: M.build_split_log(examples(5, 5, shift)),
            M.REAL_AUTHORS: M.build_split_log(examples(4, 3)),
            M.WORLD_FACTS: M.build_split_log(examples(3, 3))}


def test_json_round_trip_gives_identical_metrics(tmp_path):
    logs = synthetic_logs()
    M.write_log_dir(logs, tmp_path)
    loaded = M.load_log_dir(tmp_path)
    assert loaded == json.loads(json.dumps(logs))
    assert M.aggregate(loaded, logs[M.FORGET]) == M.aggregate(logs, logs[M.FORGET])
    summary = M.aggregate(loaded, M.load_log(tmp_path / M.FORGET))
    assert summary["Forget Quality"] == 1.0 and summary["KS Test Forget"] == 0.0
    assert list(summary) == list(M.COLUMNS)
    agg = json.loads((tmp_path / M.AGGREGATED).read_text())
    assert set(agg) == set(M.LOG_FILES)


def test_dict_keyed_by_index_loads_like_lists(tmp_path):
    log = M.build_split_log(examples(12, 5))
    order = [3, 11, 0, 7, 1, 10, 2, 9, 4, 8, 5, 6]  # "10" sorts before "2" as a string
    keyed = {k: {str(i): v[i] for i in order} for k, v in log.items()}
    (tmp_path / "x.json").write_text(json.dumps(keyed))
    assert M.load_log(tmp_path / "x.json") == json.loads(json.dumps(log))


def test_malformed_logs_give_clear_errors(tmp_path):
    with pytest.raises(UldError, match="does not exist"):
        M.load_log(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UldError, match="not valid JSON"):
        M.load_log(tmp_path / "bad.json")
    log = M.build_split_log(examples(3, 5))
    for broken, message in [
        ({k: v for k, v in log.items() if k != "avg_paraphrased_loss"}, "lacks avg_paraphrased"),
        ({**log, "avg_gt_loss": log["avg_gt_loss"][:2]}, "gt_loss has 3 entries, avg_gt_loss 2"),
        ({**log, "gt_loss": {i + 1: x for i, x in enumerate(log["gt_loss"])}},
         "cover different examples"),
        ({**log, "average_perturb_loss": [[1.0] * 5, [1.0] * 4, [1.0] * 5]}, "of one length"),
        ({**log, "avg_gt_loss": {"a": 1, "b": 2, "c": 3}}, "not example indices"),
        ({**log, "rougeL_recall": ["x", "y", "z"]}, "rougeL_recall is not a number"),
        ({M.FORGET: log}, "several logs keyed by file name"),
        ([1, 2], "not a JSON object"),
    ]:
        (tmp_path / "b.json").write_text(json.dumps(broken))
        with pytest.raises(UldError, match=message):
            M.load_log(tmp_path / "b.json")
    M.write_log_dir({M.RETAIN: log, M.FORGET: log}, tmp_path / "d")
    with pytest.raises(UldError, match="lacks eval_real_author_wo_options.json, eval_real_world"):
        M.load_log_dir(tmp_path / "d")
    with pytest.raises(UldError, match="lacks the eval_real_author"):
        M.aggregate({M.RETAIN: log, M.FORGET: log})


def test_aggregate_refuses_a_reference_for_other_questions():
    logs = synthetic_logs()
    forget = logs[M.FORGET]
    other = {**forget, "generated_text": [[f"[INST] other {i} [/INST]", "g", "a"]
                                          for i in range(5)]}
    with pytest.raises(UldError, match="different question at example 0"):
        M.aggregate(logs, other)
    shorter = {k: v[:3] for k, v in forget.items()}
    with pytest.raises(UldError, match="covers 3 examples, this run 5: evaluate the same 3"):
        M.aggregate(logs, shorter)
    shorter_other = {k: v[:3] for k, v in other.items()}
    with pytest.raises(UldError, match="covers 3 examples, this run 5: pass the retain reference"):
        M.aggregate(logs, shorter_other)
    # the same questions under another chat template still count as the same split
    qwen = {**forget, "generated_text": [[f"<|im_start|>user\nquestion {i}?<|im_end|>\n", "g",
                                          "a"] for i in range(5)]}
    assert M.aggregate(logs, qwen)["Forget Quality"] == 1.0
    # an unlearned model's shifted truth ratios are told apart from the reference
    shifted = M.build_split_log(examples(5, 5, shift=0.0))
    shifted["avg_paraphrased_loss"] = [x + 50.0 for x in shifted["avg_paraphrased_loss"]]
    assert M.aggregate({**logs, M.FORGET: shifted}, forget)["Forget Quality"] < 0.05


def test_model_utility_is_zero_when_one_utility_metric_is():
    logs = synthetic_logs()
    logs[M.WORLD_FACTS]["rougeL_recall"] = [0.0] * 3
    summary = M.aggregate(logs)
    assert summary["Real World ROUGE"] == 0.0 and summary["Model Utility"] == 0.0
    assert not set(M.FQ_KEYS) & set(summary)


def test_reports(tmp_path):
    a, b = M.aggregate(synthetic_logs()), M.aggregate(synthetic_logs(), synthetic_logs()[M.FORGET])
    b["Forget Quality"] = 3.2e-12
    table = M.markdown_table({"target": a, "ULD": b})
    assert table.splitlines()[0] == "| metric | target | ULD |"
    assert "| Forget Quality | n/a | 3.20e-12 |" in table
    assert f"| Model Utility | {a['Model Utility']:.4f} |" in table
    assert M.markdown_table(a).splitlines()[0] == "| metric | value |"
    png = M.plot_summary({"target": a, "ULD": b}, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(M.write_summary_csv(b, tmp_path / "s.csv")) as f:
        header, row = list(csv.reader(f))
    assert header == list(M.COLUMNS) and [float(x) for x in row] == [b[k] for k in header]


# --- the shipped reference logs ----------------------------------------------------------------

def test_reference_logs_have_the_format_we_write(shared_data):
    ours = M.build_split_log(examples(2, 5))
    for retain in ("retain90", "retain95", "retain99"):
        for name in M.LOG_FILES:
            raw = json.loads((shared_data / REF / retain / name).read_text())
            assert list(raw) == list(ours)
            n_perturbed = 5 if name in (M.RETAIN, M.FORGET) else 3
            assert {len(x) for x in raw["perturb_loss"]} == {n_perturbed}
            assert {len(x) for x in raw["generated_text"]} == {3}


def test_forget_quality_on_reference_logs(shared_data):
    r90 = M.load_log(shared_data / REF / "retain90" / M.FORGET)
    r95 = M.load_log(shared_data / REF / "retain95" / M.FORGET)
    assert M.forget_quality(M.truth_ratios(r90), M.truth_ratios(r90)).pvalue == 1.0
    # forget10[:300] vs forget05: the low-level test still runs across sizes
    assert M.forget_quality(M.truth_ratios(r90), M.truth_ratios(r95)).pvalue < 1.0
    logs = M.load_log_dir(shared_data / REF / "retain90")
    with pytest.raises(UldError, match="covers 200 examples, this run 300: pass the retain"):
        M.aggregate(logs, r95)


def test_aggregate_reproduces_the_retain90_csv(shared_data):
    folder = shared_data / REF / "retain90"
    with open(folder / "aggregated_stat.csv") as f:
        header, row = list(csv.reader(f))
    expected = dict(zip(header, map(float, row)))
    logs = M.load_log_dir(folder)
    got = M.aggregate(logs, logs[M.FORGET])
    assert list(got) == header
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9, rel=0), key
    # TOFU's own `'eval_log' in name` test would give the plain form here, which the CSV is not
    assert M.probability(logs[M.FORGET], normalised=False) == pytest.approx(0.14361598711400606)


def test_index_keyed_reference_equals_list_reference(shared_data):
    folder = shared_data / REF / "retain95"
    keyed = json.loads((folder / "eval_log_aggregated_new.json").read_text())
    listed = M.load_log_dir(folder)
    for name in M.LOG_FILES:
        assert M.check_log(keyed[name], name) == listed[name]
    assert M.aggregate(keyed, keyed) == M.aggregate(listed, listed[M.FORGET])


def test_a_run_over_the_first_examples_is_compared_with_the_references_first(shared_data):
    """--max-examples 100 against retain90's 300-row forget log: its first 100 rows are the
    reference, so the same model's logs give forget quality 1; other rows would not."""
    logs = M.load_log_dir(shared_data / REF / "retain90")
    head = {name: {k: v[:100] for k, v in log.items()} for name, log in logs.items()}
    assert M.aggregate(head, logs)["Forget Quality"] == 1.0
    cut = M.reference_for(head[M.FORGET], logs[M.FORGET])
    assert len(cut["avg_gt_loss"]) == 100
    tail = {**head, M.FORGET: {k: v[200:300] for k, v in logs[M.FORGET].items()}}
    with pytest.raises(UldError, match="different question at example 0"):
        M.aggregate(tail, logs)

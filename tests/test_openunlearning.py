"""OpenUnlearning's TOFU result files: keys and values against our metrics, the round trip
(export a retain model's logs, read them back as --retain-reference, same forget quality), and
`eval tofu --openunlearning-out / --retain-reference TOFU_EVAL.json` wired end to end (the
engine replaced by fixed logs, so no model runs here)."""

import copy
import json
import math

import numpy as np
import pytest

from uld_vllm.errors import UldError
from uld_vllm.eval import metrics as M
from uld_vllm.eval import openunlearning as OU

EVAL_KEYS = {
    "forget_Q_A_Prob", "forget_Q_A_PERT_Prob", "forget_Q_A_PARA_Prob", "forget_Q_A_ROUGE",
    "forget_truth_ratio", "forget_quality",
    "retain_Q_A_Prob", "retain_Q_A_PERT_Prob", "retain_Q_A_PARA_Prob", "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob", "ra_Q_A_PERT_Prob", "ra_Q_A_ROUGE", "ra_Q_A_Prob_normalised", "ra_Truth_Ratio",
    "wf_Q_A_Prob", "wf_Q_A_PERT_Prob", "wf_Q_A_ROUGE", "wf_Q_A_Prob_normalised", "wf_Truth_Ratio",
    "model_utility"}


@pytest.fixture(scope="module")
def retain99(shared_data):
    return M.load_log_dir(shared_data / "tofu_reference_logs" / "llama2-7b" / "retain99")


@pytest.fixture(scope="module")
def run_logs(retain99):
    """An 'unlearning run' that knows the forget answers better than the retain model."""
    logs = copy.deepcopy(retain99)
    f = logs[M.FORGET]
    f["avg_paraphrased_loss"] = [x * 0.4 for x in f["avg_paraphrased_loss"]]
    f["avg_gt_loss"] = [x * 0.3 for x in f["avg_gt_loss"]]
    return logs


def test_keys_structure_and_values_match_our_metrics(run_logs, retain99):
    full, summary = OU.to_openunlearning(run_logs, retain99[M.FORGET])
    ours = M.aggregate(run_logs, retain99)
    assert set(full) == EVAL_KEYS and list(full) == sorted(full)
    assert set(summary) == set(OU.SUMMARY_KEYS)
    assert all(summary[k] == full[k]["agg_value"] for k in summary)
    n = {M.FORGET: 40, M.RETAIN: 300, M.REAL_AUTHORS: 100, M.WORLD_FACTS: 117}
    for name, p in OU.PREFIX.items():
        vbi = full[f"{p}_Q_A_PERT_Prob"]["value_by_index"]
        assert list(vbi) == [str(i) for i in range(n[name])]
        assert len(vbi["0"]["prob"]) == len(run_logs[name]["average_perturb_loss"][0])
        assert vbi["0"]["prob"][0] == pytest.approx(
            math.exp(-run_logs[name]["average_perturb_loss"][0][0]))
        rouge = full[f"{p}_Q_A_ROUGE"]["value_by_index"]["3"]
        assert set(rouge) == {"rouge1_recall", "rougeL_f1", "rougeL_recall", "input",
                              "ground_truth", "generation"}
        assert rouge["generation"] == run_logs[name]["generated_text"][3][1]
        label = M.SPLIT_LABELS[name]
        assert full[f"{p}_Q_A_ROUGE"]["agg_value"] == pytest.approx(ours[f"{label} ROUGE"])
        tr_key = "forget_truth_ratio" if name == M.FORGET else f"{p}_Truth_Ratio"
        assert full[tr_key]["agg_value"] == pytest.approx(ours[f"{label} Truth Ratio"],
                                                          abs=1e-6)
        # OpenUnlearning's per-row score: p_wrong / (p_correct + 1e-10), i.e. 1 / our truth
        # ratio R but for that guard (which matters where p_correct is ~1e-5)
        scores = np.array([v["score"] for v in full[tr_key]["value_by_index"].values()])
        log = run_logs[name]
        wrong = np.exp(-np.asarray(log["average_perturb_loss"]).mean(-1))
        correct = np.exp(-np.asarray(log["avg_paraphrased_loss"]))
        assert scores == pytest.approx(wrong / (correct + 1e-10), rel=1e-12)
        assert scores == pytest.approx(1 / M.truth_ratios(log), rel=1e-3)
    # forget_Q_A_Prob is the plain probability; ours on forget is normalised (TOFU's CSV)
    assert full["forget_Q_A_Prob"]["agg_value"] == pytest.approx(
        float(np.mean(np.exp(-np.asarray(run_logs[M.FORGET]["avg_gt_loss"])))))
    assert full["forget_Q_A_Prob"]["agg_value"] != pytest.approx(ours["Forget Probability"])
    assert full["retain_Q_A_Prob"]["agg_value"] == pytest.approx(ours["Retain Probability"])
    for p, label in (("ra", "Real Authors"), ("wf", "Real World")):
        assert full[f"{p}_Q_A_Prob_normalised"]["agg_value"] == pytest.approx(
            ours[f"{label} Probability"], abs=1e-6)
    assert full["model_utility"]["agg_value"] == pytest.approx(ours["Model Utility"], abs=1e-6)
    assert full["forget_quality"]["agg_value"] == pytest.approx(ours["Forget Quality"],
                                                                rel=1e-12)
    assert ours["Forget Quality"] < 0.05  # the run does differ from the retain model
    # without a reference, as OpenUnlearning does: forget_quality is None
    assert OU.to_openunlearning(run_logs)[1]["forget_quality"] is None


@pytest.mark.parametrize("variant", ["losses", "scores_only"])
def test_round_trip_as_retain_reference(variant, run_logs, retain99, tmp_path):
    OU.write_openunlearning(retain99, tmp_path / "ou")
    eval_file = tmp_path / "ou" / OU.EVAL_FILE
    raw = json.loads(eval_file.read_text())
    assert json.loads((tmp_path / "ou" / OU.SUMMARY_FILE).read_text())["forget_quality"] is None
    if variant == "scores_only":  # a file holding only the truth-ratio statistics
        for k in ("forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob"):
            raw.pop(k)
        eval_file = tmp_path / "scores.json"
        eval_file.write_text(json.dumps(raw))
    assert OU.is_openunlearning(eval_file)
    assert not OU.is_openunlearning(tmp_path)  # a folder without TOFU_EVAL.json
    questions = [t[0].replace("[INST]", "").replace("[/INST]", "").strip()
                 for t in retain99[M.FORGET]["generated_text"]]
    ref = OU.load_reference(eval_file, questions)
    want = M.aggregate(run_logs, retain99)
    got = M.aggregate(run_logs, ref)
    assert got["Forget Quality"] == pytest.approx(want["Forget Quality"], rel=1e-9)
    assert got["KS Test Forget"] == pytest.approx(want["KS Test Forget"])
    assert M.truth_ratios(ref[M.FORGET]) == pytest.approx(M.truth_ratios(retain99[M.FORGET]),
                                                          rel=1e-6)
    # the retain model against its own export: identical distributions
    assert M.aggregate(retain99, ref)["Forget Quality"] == pytest.approx(1.0)
    if variant == "losses":
        assert OU.is_openunlearning(tmp_path / "ou")  # the folder form
        assert OU.load_reference(tmp_path / "ou")[M.FORGET]["avg_gt_loss"] == pytest.approx(
            retain99[M.FORGET]["avg_gt_loss"])


def test_bad_reference_files_are_one_line_errors(retain99, tmp_path):
    OU.write_openunlearning(retain99, tmp_path / "ou")
    raw = json.loads((tmp_path / "ou" / OU.EVAL_FILE).read_text())
    cases = {"notjson.json": "{", "empty.json": "{}",
             "nolist.json": json.dumps({"forget_truth_ratio": {"agg_value": 0.5}})}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UldError) as e:
            OU.load_reference(tmp_path / name)
        assert "\n" not in str(e.value) and "TOFU_EVAL.json" in str(e.value)
    # questions of another split are refused
    with pytest.raises(UldError, match="forget row 0 asks"):
        OU.load_reference(tmp_path / "ou", ["What is the capital of France?"])
    raw["forget_truth_ratio"]["value_by_index"]["0"]["score"] = 0.0
    for k in ("forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob"):
        raw.pop(k)
    (tmp_path / "zero.json").write_text(json.dumps(raw))
    with pytest.raises(UldError, match="score <= 0"):
        OU.load_reference(tmp_path / "zero.json")


def _fake_evaluate(seed):
    """Stands in for the engine: deterministic log-probs for every example of the sets."""
    def evaluate(spec, sets, formatter, **kw):
        rng = np.random.default_rng(seed)
        logs = {}
        for name, exs in sets.items():
            rows = [M.ExampleScores(
                prompt=formatter.prompt_text(ex.question), generation=ex.answer[:20],
                answer=ex.answer, answer_logprob=-float(rng.uniform(1, 20)), answer_tokens=10,
                paraphrased_logprob=-float(rng.uniform(1, 20)), paraphrased_tokens=10,
                perturbed_logprobs=[-float(rng.uniform(1, 20)) for _ in ex.perturbed],
                perturbed_tokens=[10] * len(ex.perturbed)) for ex in exs]
            logs[name] = M.build_split_log(rows)
        return logs, {"total_s": 0.0, "engine_start_s": 0.0, "work_s": 0.0}
    return evaluate


def test_eval_tofu_writes_openunlearning_files_and_reads_one_as_reference(
        tiny_llama, shared_data, tmp_path, monkeypatch, capsys):
    from uld_vllm.cli import main
    from uld_vllm.eval import tofu

    base = ["eval", "tofu", "--model", str(tiny_llama), "--data-dir",
            str(shared_data / "tofu"), "--forget-split", "forget01", "--max-examples", "12"]
    monkeypatch.setattr(tofu, "evaluate", _fake_evaluate(0))
    assert main(base + ["--output", str(tmp_path / "retain"), "--openunlearning-out",
                        str(tmp_path / "retain_ou")]) == 0
    monkeypatch.setattr(tofu, "evaluate", _fake_evaluate(1))
    ou_ref = tmp_path / "retain_ou" / OU.EVAL_FILE
    assert main(base + ["--output", str(tmp_path / "run"), "--retain-reference", str(ou_ref),
                        "--openunlearning-out", str(tmp_path / "run_ou")]) == 0
    # the same run against our own log folder of the same retain run: same forget quality
    assert main(base + ["--output", str(tmp_path / "run2"), "--retain-reference",
                        str(tmp_path / "retain")]) == 0
    fq = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]["Forget Quality"]
    fq2 = json.loads((tmp_path / "run2" / "summary.json").read_text())["metrics"][
        "Forget Quality"]
    ou_summary = json.loads((tmp_path / "run_ou" / OU.SUMMARY_FILE).read_text())
    assert fq == pytest.approx(fq2, rel=1e-9) and ou_summary["forget_quality"] == pytest.approx(fq)
    assert set(json.loads((tmp_path / "run_ou" / OU.EVAL_FILE).read_text())) == EVAL_KEYS
    capsys.readouterr()
    # an OpenUnlearning reference for other questions (forget05's retain run) is refused
    # before any work, and existing OpenUnlearning files are not overwritten silently
    other = M.load_log_dir(shared_data / "tofu_reference_logs" / "llama2-7b" / "retain95")
    OU.write_openunlearning(other, tmp_path / "r95")
    for extra, needle in (
            (["--retain-reference", str(tmp_path / "r95"), "--output", str(tmp_path / "x")],
             "asks"),
            (["--openunlearning-out", str(tmp_path / "run_ou"), "--output", str(tmp_path / "y")],
             "already holds OpenUnlearning result files")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("uld-vllm: error: ") and needle in err[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

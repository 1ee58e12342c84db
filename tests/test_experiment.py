"""`uld-vllm experiment tofu-mini` at toy size: a 4-layer random model, one epoch, 4 forget
rows and one retain author, every stage including one engine eval per model; every output file
and field is checked (the numbers themselves are a benchmark, not a test). Then resume: a rerun
redoes nothing, an unfinished stage is redone alone; and bad input is one line, exit 2."""

import json
import os
import subprocess
import sys
import time

import pytest

from uld_vllm.cli import main
from uld_vllm.experiment.tofu_mini import DONE
from uld_vllm.experiment.tofu_mini import STAGES as FIXED_STAGES

TOY = ["--retain-authors", "1", "--max-forget-rows", "4", "--target-epochs", "1",
       "--target-batch-size", "4",
       "--unlearn-epochs", "1", "--uld-epochs", "1", "--batch-size", "4", "--micro-batch-size",
       "4", "--uld-batch-size", "8", "--uld-micro-batch-size", "8", "--warmup-epochs", "0",
       "--max-examples", "3", "--max-new-tokens", "8", "--max-length", "128",
       "--max-model-len", "512", "--precision", "fp32", "--uld-rules", "reference",
       "--uld-self-retain", "0"]
# one rule of --uld-rules beside the adapter's own: one more eval of the same adapter
RULE_STAGE = "uld-rule-reference"
STAGES = (*FIXED_STAGES[:-1], RULE_STAGE, FIXED_STAGES[-1])
METHODS = ("target", "retain", "uld", "ga", "gd", "npo")
ROW_FIELDS = {"forget_quality", "model_utility", "forget_rouge", "forget_probability",
              "forget_probability_plain", "retain_rouge", "train_s", "eval_s", "wall_s",
              "metrics", "openunlearning"}


def _argv(model, shared_data, out, *extra):
    return ["experiment", "tofu-mini", "--out", str(out), "--model", str(model), "--data-dir",
            str(shared_data), *TOY, *extra]


@pytest.fixture(scope="module")
def experiment(tiny_llama, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tofu_mini") / "exp"
    # A process of its own with in-process engine cores: they start much faster than a spawned
    # process importing vLLM again, which shortens this test (the metrics are identical either
    # way). After an in-process engine, torch training in that process runs several times
    # slower (vLLM pins its OpenMP threads): harmless
    # at toy size, but it must not leak into the pytest process, whose later tests train. The
    # command itself keeps vLLM's default engine process (tests/test_eval_tofu.py covers it).
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "uld_vllm.cli",
                        *_argv(tiny_llama, shared_data, out)], capture_output=True, text=True,
                       env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, time.perf_counter() - t0


@pytest.mark.engine
def test_every_stage_writes_its_files(experiment):
    out, _ = experiment
    meta = json.loads((out / "experiment.json").read_text())
    assert len(meta["fingerprint"]) == 16 and meta["config"]["methods"] == ["uld", "ga", "gd",
                                                                           "npo"]
    for stage in STAGES:
        done = json.loads((out / stage / DONE).read_text())
        assert done["stage"] == stage and len(done["fingerprint"]) == 16
        assert done["wall_s"] >= 0 and done["finished_utc"]
    data = json.loads((out / "data" / DONE).read_text())["result"]
    assert data == {"forget_rows": 4, "retain_rows": 20, "retain_source": "full.jsonl rows 0-19"}
    forget = [json.loads(x) for x in (out / "data" / "forget.jsonl").read_text().splitlines()]
    assert len(forget) == 4 and set(forget[0]) == {"question", "answer"}
    for name in ("target", "retain", "ga", "gd", "npo"):
        model = out / name / "model"
        for f in ("config.json", "model.safetensors", "tokenizer.json", "unlearn_log.json"):
            assert (model / f).is_file(), (name, f)
        log = json.loads((model / "unlearn_log.json").read_text())
        assert log["method"] == ("finetune" if name in ("target", "retain") else name)
        assert len(log["epochs"]) == 1
    npo_log = json.loads((out / "npo" / "model" / "unlearn_log.json").read_text())
    assert npo_log["npo_reference_s"] is not None and npo_log["rows"]["retain"] == 20
    assert json.loads((out / "target" / "model" / "unlearn_log.json").read_text())["rows"] == {
        "forget": 24, "retain": 0}  # the target is fine-tuned on forget + retain rows
    adapter = out / "uld" / "adapter"
    cfg = json.loads((adapter / "uld_config.json").read_text())
    assert cfg["num_layers"] == 1  # K = N/4 of the 4-layer model
    assert (adapter / "train_log.json").is_file()
    for name in METHODS:
        ev = out / name / "eval"
        for f in ("eval_log.json", "eval_log_forget.json", "eval_real_author_wo_options.json",
                  "eval_real_world_wo_options.json", "aggregated_stat.csv", "summary.json",
                  "summary.md", "summary.png"):
            assert (ev / f).is_file(), (name, f)
        s = json.loads((ev / "summary.json").read_text())
        assert s["examples"]["eval_log_forget.json"] == 3
        # the retain model is the reference of every eval after it
        assert s["retain_reference"] == (None if name in ("target", "retain")
                                         else str(out / "retain" / "eval"))
        assert s["uld_adapter"] == (str(adapter) if name == "uld" else None)
        ou = out / name / "openunlearning"
        assert {p.name for p in ou.iterdir()} == {"TOFU_EVAL.json", "TOFU_SUMMARY.json"}


@pytest.mark.engine
def test_report_fields(experiment):
    out, _ = experiment
    rep = out / "report"
    for f in ("summary.md", "summary.json", "fq_vs_mu.png", "uld_convergence.png"):
        assert (rep / f).stat().st_size > 0
    assert (rep / "fq_vs_mu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((rep / "summary.json").read_text())
    assert set(s) == {"experiment", "fingerprint", "config", "precision", "data", "methods",
                      "stages_wall_s", "total_wall_s_before_report", "goals", "uld_rules"}
    assert list(s["methods"]) == list(METHODS)
    for name, row in s["methods"].items():
        assert ROW_FIELDS <= set(row), name
        for k in ("forget_quality", "model_utility", "forget_rouge", "forget_probability",
                  "retain_rouge"):
            assert 0.0 <= row[k] <= 1.0, (name, k)
        m = row["metrics"]
        assert row["forget_quality"] == m["Forget Quality"]
        assert row["model_utility"] == m["Model Utility"]
        assert row["retain_rouge"] == m["Retain ROUGE"]
        ou = json.loads((rep / "openunlearning" / name / "TOFU_SUMMARY.json").read_text())
        assert ou == row["openunlearning"]
        assert ou["forget_quality"] == pytest.approx(row["forget_quality"], rel=1e-6)
        if name != "target":  # these evals knew the retain model when they ran
            ev = json.loads((out / name / "eval" / "summary.json").read_text())["metrics"]
            if name != "retain":
                assert ev["Forget Quality"] == row["forget_quality"]
        assert row["wall_s"] == json.loads((out / name / DONE).read_text())["wall_s"]
    assert s["methods"]["retain"]["forget_quality"] == pytest.approx(1.0)  # itself
    assert s["methods"]["uld"]["uld"]["num_layers"] == 1
    for name in ("target", "retain"):
        assert s["methods"][name]["fine_tune"]["epochs_trained"] == 1
    assert set(s["stages_wall_s"]) == set(STAGES) - {"report"}
    assert s["total_wall_s_before_report"] == pytest.approx(sum(s["stages_wall_s"].values()),
                                                            abs=0.01)
    assert len(s["goals"]) == 9 and all({"goal", "value", "met"} == set(g) for g in s["goals"])
    # the rules x metrics table: the adapter's own rule (the ULD stage) and the reference rule
    adapters, ref = list(s["uld_rules"])
    assert adapters == "adapter's (above_uniform, gate 1-3)" and ref == "reference"
    assert s["uld_rules"][adapters]["forget_quality"] == s["methods"]["uld"]["forget_quality"]
    for row in s["uld_rules"].values():
        assert all(0.0 <= row[k] <= 1.0 for k in ("forget_quality", "model_utility",
                                                   "forget_rouge", "retain_rouge"))
    ev = json.loads((out / RULE_STAGE / "eval" / "summary.json").read_text())
    assert ev["uld_rule"] == {"penalty": "logit", "gate": None}
    assert ev["uld_adapter"] == str(out / "uld" / "adapter")
    assert s["uld_rules"]["reference"]["forget_quality"] == ev["metrics"]["Forget Quality"]
    # the rule reached the engine: the same adapter scores the forget answers otherwise
    ref_loss = json.loads((out / RULE_STAGE / "eval" / "eval_log_forget.json").read_text())
    own_loss = json.loads((out / "uld" / "eval" / "eval_log_forget.json").read_text())
    assert ref_loss["avg_gt_loss"] != own_loss["avg_gt_loss"]
    md = (rep / "summary.md").read_text()
    assert "| ULD rule | forget quality | model utility | utility / target's |" in md
    assert "| reference |" in md
    assert "| method | forget quality | model utility | forget ROUGE | forget probability | " \
           "retain ROUGE | wall time (s) |" in md
    assert all(f"| {name} |" in md for name in METHODS)


@pytest.mark.engine
def test_rerun_redoes_nothing_and_an_unfinished_stage_is_redone(experiment, tiny_llama,
                                                                shared_data, capsys):
    out, first_s = experiment
    before = {s: (out / s / DONE).read_text() for s in STAGES}
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(_argv(tiny_llama, shared_data, out)) == 0
    assert time.perf_counter() - t0 < min(60, first_s / 3)  # no training, no engine
    log = capsys.readouterr().out
    assert all(f"[{s}] finished earlier" in log for s in STAGES)
    assert {s: (out / s / DONE).read_text() for s in STAGES} == before
    # a run from before --uld-self-retain existed (its experiment.json lacks the option) keeps
    # every stage: the option's "none" is what such a run did
    meta = json.loads((out / "experiment.json").read_text())
    del meta["config"]["uld_self_retain"]
    meta["fingerprint"] = "0" * 16
    (out / "experiment.json").write_text(json.dumps(meta))
    assert main(_argv(tiny_llama, shared_data, out)) == 0
    log = capsys.readouterr().out
    assert "differs" not in log and all(f"[{s}] finished earlier" in log for s in STAGES)
    # an interrupted report (no marker, a stray file) is redone from scratch, nothing else
    (out / "report" / DONE).unlink()
    (out / "report" / "stray.txt").write_text("half-written")
    assert main(_argv(tiny_llama, shared_data, out)) == 0
    log = capsys.readouterr().out
    assert "[report] started" in log and "[npo] finished earlier" in log
    assert not (out / "report" / "stray.txt").exists()
    assert (out / "report" / DONE).is_file() and (out / "report" / "summary.json").is_file()
    assert {s: (out / s / DONE).read_text() for s in STAGES if s != "report"} == \
        {s: before[s] for s in STAGES if s != "report"}


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("uld-vllm: error: "), err
    assert needle in err[0], err[0]


@pytest.mark.engine
def test_another_uld_option_redoes_only_the_uld_stage_and_the_report(experiment, tiny_llama,
                                                                     shared_data, capsys):
    out, _ = experiment
    before = {s: (out / s / DONE).read_text() for s in STAGES}
    # the defaults: paraphrases on the forget side, no perturbed answers, beta 1
    train = json.loads((out / "uld" / "adapter" / "train_log.json").read_text())
    assert train["data"]["paraphrase_rows"] > 0 and train["data"]["perturbed_rows"] == 0
    assert train["config"]["retain_weight"] == 1
    capsys.readouterr()
    assert main(_argv(tiny_llama, shared_data, out, "--uld-alpha", "0.5", "--uld-augment",
                      "none", "--uld-retain-weight", "2", "--uld-self-retain", "3")) == 0
    # (the toy run passes --uld-self-retain 0: one engine fewer; the default is 200)
    log = capsys.readouterr().out
    assert "differs in uld_alpha, uld_augment, uld_retain_weight, uld_self_retain" in log
    redone = {s for s in STAGES if (out / s / DONE).read_text() != before[s]}
    assert redone == {"uld", RULE_STAGE, "report"}
    cfg = json.loads((out / "uld" / "eval" / "summary.json").read_text())
    assert cfg["uld_alpha"] == 0.5
    train = json.loads((out / "uld" / "adapter" / "train_log.json").read_text())
    assert train["data"]["paraphrase_rows"] == train["data"]["perturbed_rows"] == 0
    assert train["config"]["retain_weight"] == 2
    # three other authors' questions, answered by the target, joined the retain side
    own = [json.loads(x) for x in (out / "uld" / "self_retain.jsonl").read_text().splitlines()]
    full = [json.loads(x) for x in (shared_data / "tofu" / "full.jsonl").read_text()
            .splitlines()]
    assert len(own) == 3 and all(r["answer"] for r in own)
    assert {r["question"] for r in own} <= {r["question"] for r in full[400:]}
    assert train["data"]["retain_rows"] == 20 + 3  # one retain author, then the target's rows
    done = json.loads((out / "uld" / DONE).read_text())["result"]
    assert done["self_retain_rows"] == 3
    # back to the first configuration: the ULD stage is redone again, the rest reused
    assert main(_argv(tiny_llama, shared_data, out)) == 0
    assert json.loads((out / "uld" / "eval" / "summary.json").read_text())["uld_alpha"] != 0.5


@pytest.mark.parametrize("extra,needle", [
    (["--methods", "uld,rmu"], "unknown method rmu"),
    (["--forget-split", "forget02"], "unknown forget split 'forget02'"),
    (["--retain-authors", "0"], "--retain-authors must be >= 1"),
    (["--uld-retain-weight", "-1"], "--uld-retain-weight must be >= 0"),
    (["--uld-augment", "all"], "--uld-augment 'all' is not one of both, paraphrase"),
    (["--uld-self-retain", "-2"], "--uld-self-retain must be >= 0"),
    (["--uld-rules", "paper"], "unknown decoding rule 'paper' in --uld-rules"),
    (["--uld-rules", ","], "--uld-rules is empty"),
    (["--methods", "ga", "--uld-rules", "reference"], "--methods leaves out uld"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(extra, needle, tiny_llama,
                                                         shared_data, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(_argv(tiny_llama, shared_data, out, *extra)) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_missing_data_and_foreign_folders_are_refused(tiny_llama, shared_data, tmp_path,
                                                      capsys):
    assert main(["experiment", "tofu-mini", "--out", str(tmp_path / "a"), "--model",
                 str(tiny_llama), "--data-dir", str(tmp_path)]) == 2
    _one_line_error(capsys, "full.jsonl does not exist")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(_argv(tiny_llama, shared_data, foreign)) == 2
    _one_line_error(capsys, "holds no experiment.json")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_the_reference_rule_is_the_engines():
    from uld_vllm.engine.settings import RULES
    from uld_vllm.experiment.tofu_mini import ULD_RULES

    assert ULD_RULES["reference"] == RULES["reference"]


def test_goals_compare_uld_with_the_baselines_that_stay_useful():
    from uld_vllm.experiment.tofu_mini import _goals

    def row(fq, mu, rouge=0.5):
        return {"forget_quality": fq, "model_utility": mu, "forget_rouge": rouge}

    rows = {"target": row(0.01, 0.40, 0.99), "retain": row(1.0, 0.40, 0.35),
            "uld": {**row(0.6, 0.395, 0.45), "uld": {"converged": True, "forget_loss": 0.4}},
            "ga": row(0.9, 0.0), "gd": row(0.3, 0.38), "npo": row(0.5, 0.37)}
    got = {g["goal"].split(" (")[0]: g for g in _goals(rows, {"target": 10.0})}
    ahead = got["ULD forget quality above every baseline with utility >= 0.9 x the target's"]
    assert ahead["met"] and "gd, npo" in next(g["goal"] for g in _goals(rows, {})
                                              if g["goal"].startswith("ULD forget quality above"))
    assert got["ULD model utility >= 0.98 x the target's"]["met"]
    assert got["ULD forget ROUGE within 0.15 of the retain model's"]["met"]
    assert got["the ULD assistant reached its convergence targets"]["met"]
    rows["npo"] = row(0.8, 0.39)  # a useful baseline that forgets more
    rows["uld"]["forget_rouge"] = 0.7
    got = {g["goal"].split(" (")[0]: g for g in _goals(rows, {})}
    assert not got["ULD forget quality above every baseline with utility >= 0.9 x the "
                   "target's"]["met"]
    assert not got["ULD forget ROUGE within 0.15 of the retain model's"]["met"]

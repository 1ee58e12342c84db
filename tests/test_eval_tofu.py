"""`uld-vllm eval tofu` end to end on a tiny model over 20 rows of each TOFU set."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from uld_vllm.eval import metrics as M

# starts vLLM engines, API servers or Ray (`make test-fast` leaves these out)
pytestmark = pytest.mark.engine

ROWS = 20
ENGINE = ("--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--no-progress")


def run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "uld_vllm.cli", "eval", "tofu", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))


@pytest.fixture(scope="module")
def tofu(shared_data):
    return shared_data / "tofu"


@pytest.fixture(scope="module")
def retain99(shared_data):
    return shared_data / "tofu_reference_logs" / "llama2-7b" / "retain99"


@pytest.fixture(scope="module")
def target_eval(tiny_llama, tofu, retain99, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "target"
    r = run("--model", str(tiny_llama), "--data-dir", str(tofu), "--forget-split", "forget01",
            "--max-examples", str(ROWS), "--max-new-tokens", "32", "--retain-reference",
            str(retain99), "--output", str(out), *ENGINE)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.fixture(scope="module")
def uld_eval(tiny_llama, llama_adapter, tofu, retain99, target_eval, tmp_path_factory):
    """ULD on two Ray replicas when Ray is installed (scoring and generation on each)."""
    try:
        import ray.data  # noqa: F401
        replicas = "2"
    except ImportError:
        replicas = "1"
    out = tmp_path_factory.mktemp("eval") / "uld"
    r = run("--model", str(tiny_llama), "--uld-adapter", str(llama_adapter), "--data-dir",
            str(tofu), "--forget-split", "forget01", "--max-examples", str(ROWS),
            "--max-new-tokens", "32", "--retain-reference", str(retain99), "--compare",
            f"target={target_eval[0]}", "--replicas", replicas, "--output", str(out), *ENGINE)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


FILES = [*M.LOG_FILES, M.AGGREGATED, "aggregated_stat.csv", "summary.json", "summary.md",
         "summary.png"]


@pytest.mark.parametrize("which", ["target_eval", "uld_eval"])
def test_every_file_written_and_every_metric_finite_and_in_range(which, request):
    out, r = request.getfixturevalue(which)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    assert list(metrics) == list(M.COLUMNS)
    for name, value in metrics.items():
        assert math.isfinite(value) and 0.0 <= value <= 1.0, (name, value)
    assert summary["examples"] == {f: ROWS for f in M.LOG_FILES}
    logs = M.load_log_dir(out)
    for f in M.LOG_FILES:
        assert len(logs[f]["gt_loss"]) == ROWS
        assert len(logs[f]["perturb_loss"][0]) == (5 if f in (M.FORGET, M.RETAIN) else 3)
    assert "| Model Utility |" in r.stdout  # the table, on the terminal
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("which", ["target_eval", "uld_eval"])
def test_rouge_recomputed_from_written_generations_matches_summary(which, request):
    from rouge_score import rouge_scorer

    out, _ = request.getfixturevalue(which)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    logs = M.load_log_dir(out)
    for f in M.LOG_FILES:
        recalls = [scorer.score(truth, gen)["rougeL"].recall
                   for _, gen, truth in logs[f]["generated_text"]]
        assert sum(recalls) / len(recalls) == pytest.approx(
            metrics[f"{M.SPLIT_LABELS[f]} ROUGE"], abs=1e-12)


def test_uld_scores_and_generations_equal_the_reference_decoder(uld_eval, tiny_llama,
                                                               llama_adapter, tofu):
    """Engine prompt log-probs under score semantics and greedy ULD text, checked against the
    two-model HF decoder on the first forget examples."""
    from transformers import AutoTokenizer

    from uld_vllm.core.prompts import PromptFormatter
    from uld_vllm.core.reference import ReferenceDecoder
    from uld_vllm.eval.tofu_data import load_sets

    out, _ = uld_eval
    log = M.load_log(out / M.FORGET)
    sets, _ = load_sets("forget01", str(tofu), 3)
    fmt = PromptFormatter(AutoTokenizer.from_pretrained(tiny_llama))
    ref = ReferenceDecoder.load(tiny_llama, llama_adapter)
    for i, ex in enumerate(sets[M.FORGET]):
        prompt = fmt.encode_prompt(ex.question)
        answers = [ex.answer, ex.paraphrased, *ex.perturbed]
        got = [log["gt_loss"][i], log["paraphrased_loss"][i], *log["perturb_loss"][i]]
        want = ref.score([prompt] * len(answers),
                         [fmt.encode_answer(a, ex.question) for a in answers], mode="score")
        torch.testing.assert_close(torch.tensor(got), torch.stack([-w.sum() for w in want]),
                                   atol=2e-3, rtol=1e-4)
        assert log["num_token_gt"][i] == len(fmt.encode_answer(ex.answer, ex.question))
    gens = ref.generate([fmt.encode_prompt(ex.question) for ex in sets[M.FORGET]],
                        max_new_tokens=32)
    # vLLM's streaming detokenizer holds back bytes that do not yet form a UTF-8 character, so
    # an answer that stops inside one ends before it; HF's decode shows them as U+FFFD
    assert [g.text.rstrip("\ufffd") for g in gens] == [t[1] for t in log["generated_text"][:3]]


def test_forget_quality_against_the_shipped_reference_and_against_another_run(uld_eval,
                                                                               target_eval):
    out, r = uld_eval
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert 0.0 < metrics["Forget Quality"] <= 1.0
    # this command's logs serve as another run's retain reference
    again = M.aggregate(M.load_log_dir(out), M.load_log_dir(target_eval[0]))
    assert 0.0 < again["Forget Quality"] <= 1.0
    assert M.aggregate(M.load_log_dir(out), M.load_log_dir(out))["Forget Quality"] == 1.0
    # --compare puts the target run beside ULD in the printed table
    assert "| metric | ULD | target |" in r.stdout


def test_bad_inputs_are_one_line_and_write_nothing(tiny_llama, tofu, shared_data, tmp_path):
    out = tmp_path / "out"
    ref90 = shared_data / "tofu_reference_logs" / "llama2-7b" / "retain90"
    cases = [
        (["--data-dir", str(tmp_path)], "forget01_perturbed.jsonl does not exist"),
        (["--data-dir", str(tofu), "--retain-reference", str(tmp_path)], "eval_log.json"),
        # retain90's forget log covers forget10: caught before any engine work
        (["--data-dir", str(tofu), "--retain-reference", str(ref90)], "different question"),
        (["--data-dir", str(tofu), "--compare", "x"], "NAME=DIR"),
        (["--data-dir", str(tofu), "--max-examples", "-3"], "--max-examples"),
    ]
    try:
        import datasets  # noqa: F401
    except ImportError:  # no --data-dir: the Hub dataset, which needs `datasets`
        cases.append(([], "`datasets` package is not installed"))
    for extra, needle in cases:
        r = run("--model", str(tiny_llama), "--forget-split", "forget01", "--output", str(out),
                *extra, timeout=120)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1, (extra, r.stderr[-2000:])
        assert err[0].startswith("uld-vllm: error:") and needle in err[0], (needle, err[0])
        assert not out.exists()

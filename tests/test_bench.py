"""vLLM's own benchmarks on the ULD engine, and `uld-vllm bench` (the comparison built on them).

Numbers are not asserted (they depend on the machine and its load); what ran is.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import running_server, shutdown

REPO = Path(__file__).resolve().parents[1]


def vllm_parser(tool: str):
    import importlib

    from vllm.utils.argparse_utils import FlexibleArgumentParser

    mod = importlib.import_module(f"vllm.benchmarks.{tool}")
    parser = FlexibleArgumentParser()
    mod.add_cli_args(parser)  # engine args load vLLM's general plugins: the --uld-* flags
    return mod, parser


@pytest.mark.engine
@pytest.mark.parametrize("uld", [True, False], ids=["uld", "plain"])
def test_vllm_bench_throughput_takes_uld_adapter(uld, tiny_llama, llama_adapter, tmp_path,
                                                 monkeypatch):
    from vllm import LLM

    # the flag's own process-wide runner choice; set here so that it ends with the test
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    out = tmp_path / "throughput.json"
    mod, parser = vllm_parser("throughput")
    argv = ["--model", str(tiny_llama), "--dataset-name", "random", "--random-input-len", "16",
            "--random-output-len", "6", "--num-prompts", "5", "--output-json", str(out),
            "--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]
    if uld:  # the adapter stores filter ratio 0.1: the engine must run the flag's 0.05
        argv += ["--uld-adapter", str(llama_adapter), "--uld-filter-ratio", "0.05"]
    built = []
    original = LLM.from_engine_args.__func__

    def from_engine_args(cls, engine_args, *a, **kw):
        built.append(original(cls, engine_args, *a, **kw))
        return built[-1]

    monkeypatch.setattr(LLM, "from_engine_args", classmethod(from_engine_args))
    mod.main(parser.parse_args(argv))
    (llm,) = built
    try:
        # asked of the model the worker runs: None from a plain model
        state = llm.collective_rpc("uld_combiner_state")[0]
        archs = llm.llm_engine.model_config.hf_config.architectures
    finally:
        shutdown(llm)
    res = json.loads(out.read_text())
    assert res["num_requests"] == 5 and res["total_num_tokens"] == 5 * (16 + 6)
    if not uld:
        assert state is None and archs == ["LlamaForCausalLM"]
        return
    assert archs == ["UldLlamaForCausalLM"]
    assert state["filter_ratio"] == 0.05 and state["alpha"] == 0.8
    # every decode step of the benchmark went through the ULD combination
    assert state["stats"]["combined"] >= 6


@pytest.mark.engine
def test_vllm_bench_serve_runs_against_the_uld_server(tiny_llama, llama_adapter, tmp_path):
    log = tmp_path / "server.log"
    with running_server(str(tiny_llama), "--uld-adapter", str(llama_adapter), "--dtype",
                        "float32", "--max-model-len", "256", "--enforce-eager",
                        "--served-model-name", "tiny-uld", log=log) as base:
        mod, parser = vllm_parser("serve")
        argv = ["--base-url", base, "--model", str(tiny_llama), "--served-model-name",
                "tiny-uld", "--dataset-name", "random", "--random-input-len", "16",
                "--random-output-len", "6", "--num-prompts", "6", "--max-concurrency", "3",
                "--temperature", "0", "--ignore-eos", "--disable-tqdm",
                "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99"]
        save = ["--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"]
        res = mod.main(parser.parse_args(argv + save))
        saved = json.loads((tmp_path / "r.json").read_text())
        # the client's requests reach ULD's per-request controls: a negative alpha is a 400
        bad = mod.main(parser.parse_args(
            argv + ["--extra-body", '{"vllm_xargs": {"uld_alpha": -1}}']))
    assert res["completed"] == 6 and res["failed"] == 0 and res["total_output_tokens"] == 36
    for key in ("p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_itl_ms", "output_throughput"):
        assert res[key] > 0, key
    assert saved["completed"] == 6 and saved["p99_tpot_ms"] == res["p99_tpot_ms"]
    assert bad["completed"] == 0 and bad["failed"] == 6
    assert "Resolved architecture: UldLlamaForCausalLM" in log.read_text()


def bench(*args, timeout=900):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false",
               # as users run it: each engine in its own processes (conftest: in-process)
               VLLM_ENABLE_V1_MULTIPROCESSING="1")
    return subprocess.run([sys.executable, "-m", "uld_vllm.cli", "bench", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.mark.engine
def test_uld_vllm_bench_compares_plain_uld_and_the_reference(tiny_llama, llama_adapter,
                                                             shared_data, tmp_path):
    out = tmp_path / "out"
    r = bench("--model", tiny_llama, "--uld-adapter", llama_adapter, "--input-len", 12,
              "--output-len", 6, "--num-prompts", 6, "--num-warmups", 1, "--reference-prompts",
              3, "--tofu-dir", shared_data / "tofu", "--out", out,
              "--", "--enforce-eager", "--max-model-len", 256, "--max-num-seqs", 4)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "bench.json").read_text())
    assert rep["vllm_args"] == ["--enforce-eager", "--max-model-len", "256", "--max-num-seqs",
                                "4"]
    assert set(rep["workloads"]) == {"random", "tofu"}
    for name, w in rep["workloads"].items():
        for system in ("plain", "uld"):
            assert w["throughput"][system]["num_requests"] == 6
            assert w["serve"][system]["completed"] == 6 and w["serve"][system]["failed"] == 0
            for tool in ("throughput", "serve"):  # vLLM's own result files stay
                assert (out / "vllm" / f"{tool}_{name}_{system}.json").is_file()
        # EOS ignored: every request ran --output-len tokens
        assert w["throughput"]["uld"]["total_num_tokens"] - w["throughput"]["plain"][
            "total_num_tokens"] == 0
        if name == "random":
            assert w["serve"]["uld"]["total_output_tokens"] == 36
        ratios = w["uld_over_plain"]
        for key in ("throughput_output_tokens_per_s", "output_throughput", "p50_ttft_ms",
                    "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms", "p99_itl_ms"):
            assert ratios[key] > 0, (name, key)
        assert w["reference"]["prompts"] == 3 and w["reference"]["output_tokens"] == 18
        assert w["uld_over_reference"] > 0
    # the ULD runs logged a ULD model, the plain ones did not (or the bench had stopped)
    for log in ("throughput_random_uld", "throughput_tofu_uld", "server_uld"):
        assert "Resolved architecture: Uld" in (out / "logs" / f"{log}.log").read_text()
    assert "Resolved architecture: Uld" not in (out / "logs" / "server_plain.log").read_text()
    table = (out / "bench.txt").read_text()
    assert "serve TPOT p99 (ms)" in table and "reference decoder (batch 4, 3 prompts)" in table
    assert table.strip() in r.stdout


@pytest.mark.parametrize("case", ["adapter", "skip", "own-flag", "count", "tofu"])
def test_bad_input_is_one_line_and_status_2(case, tiny_llama, llama_adapter, tmp_path):
    args = ["--model", tiny_llama, "--uld-adapter", llama_adapter, "--out", tmp_path / "o"]
    extra, want = {
        "adapter": (["--uld-adapter", tmp_path / "nope"], "does not exist"),
        "skip": (["--skip", "serve", "throughput", "reference"], "nothing to run"),
        "own-flag": (["--", "--dtype=float16"], "--dtype after -- is set by uld-vllm bench"),
        "count": (["--num-prompts", "0"], "--num-prompts 0 is below 1"),
        "tofu": (["--tofu-dir", tmp_path], "no TOFU questions at"),
    }[case]
    r = bench(*args, *extra, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("uld-vllm: error: ") and want in lines[0], \
        r.stderr[-2000:]
    assert not (tmp_path / "o" / "bench.json").exists()


def test_a_failed_run_leaves_no_results_behind(tiny_llama, llama_adapter, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "bench.json").write_text("{}")  # the previous run's
    r = bench("--model", tiny_llama, "--uld-adapter", llama_adapter, "--workloads", "random",
              "--out", out, "--", "--no-such-vllm-flag", timeout=300)
    assert r.returncode == 2
    (line,) = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line.startswith("uld-vllm: error: throughput_random_plain failed with status")
    assert "--no-such-vllm-flag" in line and str(out / "logs") in line
    assert not (out / "bench.json").exists() and not (out / "bench.txt").exists()

"""Smoke tests of the benchmark programs: tiny model, tiny settings, every documented field.

The numbers themselves are not asserted (they depend on the machine and its load).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# starts vLLM engines, API servers or Ray (`make test-fast` leaves these out)
pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "64", "--layers", "2", "--vocab", "512", "--kv-cache-gib", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(args, timeout, **env_extra):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false",
               **env_extra)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def cli(*args, timeout=120):
    return run(["-m", "uld_vllm.cli", *args], timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_model")  # the first benchmark builds, the next reuses


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_common(rep: dict, out: Path, name: str) -> None:
    assert rep["benchmark"] == name
    for key in ("cpu", "logical_cpus", "torch", "vllm"):
        assert rep["machine"][key]
    t = rep["threads"]
    assert t["threads"] == 1 and t["cores"] == [0]
    assert t["VLLM_CPU_OMP_THREADS_BIND"] == "0" and "VLLM_CPU_NUM_OF_RESERVED_CPU" in t
    assert t["vllm"] and t["reference"]
    assert rep["kv_cache_gib"] == 1 and rep["kv_cache_source"] and rep["dtype"] == "float32"
    assert rep["memory_method"]
    m = rep["model"]
    assert Path(m["model"]).is_dir() and Path(m["adapter"]).is_dir() and m["built"]
    assert (m["hidden"], m["layers"], m["vocab"], m["k"]) == (64, 2, 512, 1)
    assert positive(m["parameters"]) and positive(m["alpha"]) and positive(m["filter_ratio"])
    assert len(rep["load_average"]["before"]) == 3 and len(rep["load_average"]["after"]) == 3
    assert positive(rep["wall_s"])
    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


def test_throughput_smoke(tmp_path, workdir):
    out = tmp_path / "out"
    r = run(["benchmarks/throughput.py", *TINY, "--workdir", str(workdir), "--batches", "1",
             "2", "--new-tokens", "8", "--eval-prompts", "6", "--eval-max-tokens", "8",
             "--reference-eval-prompts", "5", "--repeats", "2", "--eval-repeats", "2",
             "--uld-filter-ratio", "0.05",
             "--compiled", "--out", str(out)], 900,
            # as users run it: every engine in its own processes (conftest runs them in-process)
            VLLM_ENABLE_V1_MULTIPROCESSING="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "throughput.json").read_text())
    check_common(rep, out, "throughput")
    # the ratio the engines ran with, not the one stored in the built adapter (0.1)
    assert rep["model"]["filter_ratio"] == 0.05 and rep["model"]["adapter_filter_ratio"] == 0.1
    systems = ("plain", "uld", "reference_b4", "reference_vllm_batch")
    for s in systems:
        assert positive(rep["systems"][s]["peak_rss_mib"]) and positive(
            rep["systems"][s]["start_s"])
    assert positive(rep["systems"]["uld"]["max_num_seqs"])
    # each engine's memory is the front-end plus its own processes, not the other engine's
    # (both are alive together): counting both would make ULD's ~1.7x plain's here
    for s in ("uld", "uld_compiled"):
        plain = s.replace("uld", "plain")
        assert rep["systems"][s]["peak_rss_mib"] < 1.4 * rep["systems"][plain]["peak_rss_mib"]
    # every vLLM worker on the bound core; the front-end on the others (when there are any)
    for s in ("plain", "uld", "plain_compiled", "uld_compiled"):
        assert rep["systems"][s]["worker_cores"] == [0], s
    if rep["threads"]["cores_available"] > 1:
        assert rep["threads"]["frontend_cores"] and 0 not in rep["threads"]["frontend_cores"]
    assert [w["name"] for w in rep["workloads"]] == ["decode_b1", "decode_b2", "eval"]
    for w in rep["workloads"]:
        assert w["kind"] in ("decode", "eval") and positive(w["batch"])
        assert positive(w["max_tokens"]) and positive(w["prompts"]) and positive(w["vllm_batch"])
        for s in systems:
            res = w["results"][s]
            for key in ("tokens", "seconds", "tokens_per_s", "batch"):
                assert positive(res[key]), (w["name"], s, key, res)
            assert res["runs_s"] and all(positive(x) for x in res["runs_s"])
            n_req = (w["reference_prompts"] if s.startswith("reference") and w["kind"] == "eval"
                     else w["prompts"])
            # the same median time under both rates
            assert res["requests_per_s"] / res["tokens_per_s"] == pytest.approx(
                n_req / res["tokens"], rel=1e-9)
        for key in ("uld_over_plain", "uld_over_reference_b4", "uld_over_reference_vllm_batch"):
            assert positive(w["ratios"][key])
        # both vLLM systems ran every repeat (interleaved), each paired with its neighbour
        for s in ("plain", "uld"):
            assert len(w["results"][s]["runs_s"]) == 2, (w["name"], s)
        u, p = w["results"]["uld"], w["results"]["plain"]
        assert w["paired_uld_over_plain"] == [
            round(u["tokens"] / tu / (p["tokens"] / tp), 4)
            for tu, tp in zip(u["runs_s"], p["runs_s"])]
        assert len(w["compiled"]["paired_uld_over_plain"]) == 2
        # fp32 on both sides: ULD in the engine is token-identical to the two-model reference
        assert w["uld_greedy_same_as_reference"] == 1.0, w["name"]
        # decode b1 and b2 ran the reference at one batch size only; the eval at 4 and 5
        assert w["reference_greedy_same_across_batches"] == (
            1.0 if w["kind"] == "eval" else None), w["name"]
        c = w["compiled"]  # --compiled: the same workload on compiled engines
        for s in ("plain_compiled", "uld_compiled"):
            assert positive(c["results"][s]["tokens_per_s"])
        assert positive(c["uld_over_plain"]) and positive(c["uld_compiled_over_eager"])
        assert c["uld_greedy_same_as_eager"] == 1.0, w["name"]
    decode, ev = rep["workloads"][1], rep["workloads"][2]
    assert decode["results"]["plain"]["tokens"] == 2 * 8  # ignore_eos: every token counted
    assert decode["results"]["reference_b4"]["tokens"] == 2 * 8
    assert ev["prompts"] == 6 and ev["reference_prompts"] == 5 and ev["source"]
    assert ev["results"]["reference_b4"]["batch"] == 4
    assert ev["results"]["reference_vllm_batch"]["batch"] == 5
    # no batch-32 decode here; every ULD / plain goal also compiled and best against best
    plain_goals = {"decode_b1": 0.93, "eval": 0.78}
    modes = ("uld_over_plain", "compiled uld_over_plain", "best uld over best plain",
             "faster plain mode uld_over_plain")
    assert set(rep["targets"]) == {"uld_over_reference_b4 eval"} | {
        f"{pre} {w}" for w in plain_goals for pre in modes} | {
        f"{pre} by requests/s eval" for pre in modes}  # the eval by time per question too
    tgt = rep["targets"]["uld_over_reference_b4 eval"]
    assert tgt["target"] == 3.0 and positive(tgt["measured"]) and isinstance(tgt["met"], bool)
    for w, goal in plain_goals.items():
        row = next(x for x in rep["workloads"] if x["name"] == w)
        assert rep["targets"][f"uld_over_plain {w}"]["measured"] == \
            round(row["ratios"]["uld_over_plain"], 3)
        assert rep["targets"][f"compiled uld_over_plain {w}"]["target"] == goal
        best = rep["targets"][f"best uld over best plain {w}"]
        rates = {**row["results"], **row["compiled"]["results"]}
        want = max(rates["uld"]["tokens_per_s"], rates["uld_compiled"]["tokens_per_s"]) / max(
            rates["plain"]["tokens_per_s"], rates["plain_compiled"]["tokens_per_s"])
        assert best["measured"] == round(want, 3) and best["met"] == (want >= goal)
        faster = rep["targets"][f"faster plain mode uld_over_plain {w}"]
        mode = "compiled" if (rates["plain_compiled"]["tokens_per_s"]
                              > rates["plain"]["tokens_per_s"]) else "eager"
        suffix = "_compiled" if mode == "compiled" else ""
        assert faster["mode"] == mode and faster["measured"] == round(
            rates["uld" + suffix]["tokens_per_s"] / rates["plain" + suffix]["tokens_per_s"], 3)
    by_time = rep["targets"]["uld_over_plain by requests/s eval"]
    assert by_time["measured"] == round(ev["results"]["uld"]["requests_per_s"]
                                        / ev["results"]["plain"]["requests_per_s"], 3)
    assert "ULD/plain" in r.stdout and "peak RSS" in r.stdout  # the terminal table
    assert "ULD compiled" in r.stdout
    assert "decode b2 x8 ULD/plain compiled, each repeat against the plain run beside it" \
        in r.stdout


def test_ab_smoke_each_variant_runs_with_its_own_environment(tmp_path):
    from uld_vllm.core import native

    out = tmp_path / "out"
    # confident rows (init std 0.2), r = 0.1 and the sparse head forced on both (it would
    # not pay at 51 of 512 tokens): the top-k path, where ULD_NATIVE picks the C or torch code
    sparse = "ULD_SPARSE_HEAD_FRACTION=1"
    glibc = "ULD_HOST_MALLOC=default"
    r = run(["benchmarks/ab.py", *TINY, "--init-std", "0.2", "--workdir", str(tmp_path / "m"),
             "--batches", "1", "2", "--new-tokens", "6", "--repeats", "3",
             "--uld-filter-ratio", "0.1", "--a", f"uld ULD_NATIVE=0 {sparse} {glibc}", "--b",
             f"uld {sparse}", "--out", str(out)], 600, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "ab.json").read_text())
    assert rep["benchmark"] == "ab" and rep["dtype"] == "float32" and rep["compiled"] is False
    assert rep["kv_cache_gib"] == 1 and rep["threads"]["cores"] == [0]
    va, vb = rep["variants"]["a"], rep["variants"]["b"]
    assert (va["system"], va["env"], vb["system"], vb["env"]) == (
        "uld", {"ULD_NATIVE": "0", "ULD_SPARSE_HEAD_FRACTION": "1", "ULD_HOST_MALLOC": "default"},
        "uld", {"ULD_SPARSE_HEAD_FRACTION": "1"})
    for v in (va, vb):
        assert positive(v["start_s"]) and positive(v["peak_rss_mib"])
        assert v["worker_cores"] == [0]
        assert v["combiner"]["filter_ratio"] == 0.1 and v["combiner"]["stats"]["sparse"] > 0
        assert "when rows keep <= 1 of the vocabulary" in v["combiner"]["description"]
    # A's engine saw ULD_NATIVE=0, B's did not (the front-end's environment was restored)
    assert va["combiner"]["description"].endswith("kept-token head: torch")
    assert va["combiner"]["stats"]["c_finish"] == 0
    # and glibc's own malloc thresholds; B's engine raised them (uld_vllm.engine.host_malloc)
    assert not va["host_malloc"]["applied"] and glibc in va["host_malloc"]["reason"]
    assert vb["host_malloc"]["applied"] and vb["host_malloc"]["mmap_threshold"] >= 32 << 20
    assert "A host memory: glibc malloc unchanged (ULD_HOST_MALLOC=default" in r.stdout
    assert "B host memory: glibc malloc keeps buffers up to" in r.stdout
    if native.library() is not None:
        assert "kept-token head: C (" in vb["combiner"]["description"]
        assert vb["combiner"]["stats"]["c_finish"] > 0  # the steps whose rows keep their top k
    assert [w["name"] for w in rep["workloads"]] == ["decode_b1", "decode_b2"]
    for w in rep["workloads"]:
        a, b = w["results"]["a"], w["results"]["b"]
        assert a["tokens"] == b["tokens"] == w["batch"] * 6  # ignore_eos
        assert len(a["runs_s"]) == len(b["runs_s"]) == 3
        assert w["b_over_a"] == pytest.approx(b["tokens_per_s"] / a["tokens_per_s"])
        assert w["paired_b_over_a"] == [round(b["tokens"] / tb / (a["tokens"] / ta), 4)
                                        for tb, ta in zip(b["runs_s"], a["runs_s"])]
        assert 0.0 <= w["greedy_same"] <= 1.0
    assert (out / "ab.png").read_bytes()[:8] == PNG_MAGIC
    assert "B/A paired median" in r.stdout and "A combine: " in r.stdout


def test_ab_smoke_plain_against_itself(tmp_path, workdir):
    out = tmp_path / "out"
    r = run(["benchmarks/ab.py", *TINY, "--workdir", str(workdir), "--batches", "2",
             "--new-tokens", "4", "--repeats", "2", "--instances", "2", "--a", "plain",
             "--b", "plain", "--out", str(out)], 600, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "ab.json").read_text())
    assert rep["instances"] == 2 and r.stdout.count(": starting the engine") == 4
    for v in rep["variants"].values():
        assert v["combiner"] is None and len(v["by_instance"]) == 2
        assert all(positive(p["start_s"]) and p["combiner"] is None for p in v["by_instance"])
    (w,) = rep["workloads"]
    assert w["greedy_same"] == 1.0 and len(w["paired_b_over_a"]) == 4
    assert len(w["b_over_a_by_instance"]) == 2 and all(map(positive, w["b_over_a_by_instance"]))
    assert w["b_over_a"] == pytest.approx(sum(w["b_over_a_by_instance"]) / 2)  # median of 2
    a, b = w["results"]["a"], w["results"]["b"]  # the first pair's
    assert w["b_over_a_by_instance"][0] == pytest.approx(b["tokens_per_s"] / a["tokens_per_s"])
    assert "combine:" not in r.stdout and "B/A by engine pair" in r.stdout


def test_serving_smoke(tmp_path, workdir):
    out = tmp_path / "out"
    r = run(["benchmarks/serving.py", *TINY, "--workdir", str(workdir), "--requests", "6",
             "--concurrency", "3", "--max-tokens", "6", "--out", str(out)], 420)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "serving.json").read_text())
    check_common(rep, out, "serving")
    load = rep["load"]
    assert (load["requests"], load["concurrency"], load["max_tokens"]) == (6, 3, 6)
    assert load["prompts"] and load["endpoint"]
    for s in ("plain", "uld"):
        res = rep["systems"][s]
        assert res["requests_ok"] == 6 and res["requests_failed"] == 0 and res["all_ok"]
        assert res["output_tokens"] == 6 * 6
        for key in ("wall_s", "request_throughput_rps", "output_tokens_per_s", "start_s",
                    "peak_rss_mib"):
            assert positive(res[key]), (s, key)
        for metric in ("ttft_ms", "tpot_ms", "latency_ms"):
            assert all(positive(res[metric][q]) for q in ("p50", "p99", "mean")), (s, metric)
        assert Path(res["log"]).is_file()
    for key in ("request_throughput", "output_tokens_per_s", "ttft_p50", "tpot_p50"):
        assert positive(rep["ratios"][key])
    assert "TTFT p50" in r.stdout


def test_bench_cli_help_and_errors():
    r = cli("bench", "throughput", "--help")
    assert r.returncode == 0 and "--batches" in r.stdout and "--threads" in r.stdout
    r = cli("bench", "serving", "--help")
    assert r.returncode == 0 and "--concurrency" in r.stdout
    r = cli("bench", "soak", "--help")
    assert r.returncode == 0 and "--cut-fraction" in r.stdout and "--bad-fraction" in r.stdout
    r = cli("bench", "soak", "--cut-fraction", "0.8", "--bad-fraction", "0.5")
    assert r.returncode == 2 and "add up to at most 1" in r.stderr
    r = cli("bench")
    assert r.returncode == 2 and "throughput" in r.stderr and "soak" in r.stderr
    r = cli("bench", "latency")
    assert r.returncode == 2 and r.stderr.strip().startswith("uld-vllm: error:")
    r = cli("bench", "throughput", "--model", "some/model")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "--uld-adapter" in err[0]
    r = cli("bench", "ab", "--help")
    assert r.returncode == 0 and "--a" in r.stdout and "NAME=VALUE" in r.stdout
    r = cli("bench", "ab", "--a", "vllm")
    assert r.returncode == 2 and "plain or uld" in r.stderr.strip().splitlines()[-1]
    r = cli("bench", "throughput", "--threads", "999")
    assert r.returncode == 2 and "--threads" in r.stderr


# ------------------------------------------------ per-op profile and greedy-divergence tools
def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_step_run_and_compare(tmp_path, tiny_llama, llama_adapter):
    common = ["--model", str(tiny_llama), "--batch", "2", "--new-tokens", "4"]
    for system, extra in (("plain", []), ("uld", ["--uld-adapter", str(llama_adapter)])):
        r = run(["benchmarks/profile_step.py", "run", "--system", system, *common, *extra,
                 "--out", str(tmp_path / f"{system}.json")], 300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    plain = json.loads((tmp_path / "plain.json").read_text())
    uld = json.loads((tmp_path / "uld.json").read_text())
    assert (plain["system"], uld["system"], uld["batch"], uld["new_tokens"]) == (
        "plain", "uld", 2, 4)
    # one decode step of ULD runs the filter's top-k (dense path at this vocabulary); plain
    # greedy decoding has none
    assert uld["ops"]["aten::topk"][1] >= 1 and plain["ops"].get("aten::topk", [0, 0])[1] == 0
    assert sum(v[0] for v in uld["ops"].values()) > 0
    r = run(["benchmarks/profile_step.py", "compare", str(tmp_path / "plain.json"),
             str(tmp_path / "uld.json"), "--top", "5"], 60)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.strip().splitlines()
    assert rows[0].startswith("| op (self CPU ms per decode step) | plain | uld |")
    assert len(rows) == 2 + 5 + 3 and rows[-1].startswith("| plain / ULD (profiled) |")
    # wrong order: one line naming the fix
    r = run(["benchmarks/profile_step.py", "compare", str(tmp_path / "uld.json"),
             str(tmp_path / "plain.json")], 60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "plain profile first" in r.stderr
    r = run(["benchmarks/profile_step.py", "run", "--system", "uld", *common,
             "--out", str(tmp_path / "x.json")], 60)
    assert r.returncode == 2 and "--uld-adapter" in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_profile_step_prefill_by_shapes(tmp_path, tiny_llama, llama_adapter):
    common = ["--model", str(tiny_llama), "--batch", "3", "--prompt-tokens", "7",
              "--step", "prefill", "--shapes"]
    for system, extra in (("plain", []), ("uld", ["--uld-adapter", str(llama_adapter)])):
        r = run(["benchmarks/profile_step.py", "run", "--system", system, *common, *extra,
                 "--out", str(tmp_path / f"{system}.json")], 300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "per prefill step" in r.stdout
    plain = json.loads((tmp_path / "plain.json").read_text())
    uld = json.loads((tmp_path / "uld.json").read_text())
    assert (plain["step"], uld["step"], uld["shapes"]) == ("prefill", "prefill", True)

    def calls(rep, op):
        return sum(c for key, (_, c) in rep["ops"].items() if key.startswith(op + " "))

    # one prefill forward: an attention call per layer, N for plain and N + K for ULD, and
    # every op keyed by its input shapes (the prompts' 3 x 7 = 21 token rows)
    attn = "vllm::unified_attention_with_output"
    n_layers = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    k = json.loads((llama_adapter / "uld_config.json").read_text())["num_layers"]
    assert (calls(plain, attn), calls(uld, attn)) == (n_layers, n_layers + k)
    assert any(key.startswith(attn + " [[21,") for key in uld["ops"])
    r = run(["benchmarks/profile_step.py", "compare", str(tmp_path / "plain.json"),
             str(tmp_path / "uld.json"), "--top", "3"], 60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("| op (self CPU ms per prefill step) | plain | uld |")
    # a decode profile beside a prefill one: refused in one line
    (tmp_path / "decode.json").write_text(json.dumps({**uld, "step": "decode",
                                                      "shapes": False}))
    r = run(["benchmarks/profile_step.py", "compare", str(tmp_path / "plain.json"),
             str(tmp_path / "decode.json")], 60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "one kind of step" in r.stderr
    r = run(["benchmarks/profile_step.py", "run", "--system", "plain", *common,
             "--new-tokens", "4", "--out", str(tmp_path / "x.json")], 60)
    assert r.returncode == 2 and "--new-tokens applies to --step decode only" in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_greedy_divergence_fp32_is_identical(tmp_path, tiny_llama, llama_adapter):
    out = tmp_path / "d.json"
    r = run(["benchmarks/greedy_divergence.py", "--model", str(tiny_llama), "--uld-adapter",
             str(llama_adapter), "--dtype", "float32", "--batch", "5", "--new-tokens", "12",
             "--out", str(out)], 300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert set(rep["agreement"]) == {"engine vs reference_float32_b1",
                                     "engine vs reference_float32_b4",
                                     "reference_float32_b1 vs reference_float32_b4",
                                     "plain vLLM vs HF target alone, batch 1"}
    assert all(v == 1.0 for v in rep["agreement"].values()), rep["agreement"]
    assert rep["divergences"] == [] and rep["prompts"] == 5


def test_filter_position_matches_the_filter(tiny_llama, llama_adapter):
    import torch

    from uld_vllm.core.logits import plausibility_mask
    from uld_vllm.core.reference import ReferenceDecoder

    gd = _load_script("greedy_divergence")
    dec = ReferenceDecoder.load(tiny_llama, llama_adapter)
    ids = [5, 17, 300, 41, 9, 77]
    with torch.inference_mode():
        lt = dec.target(input_ids=torch.tensor([ids])).logits[0, -1].float()
        la = dec.assistant(input_ids=torch.tensor([ids])).logits[0, -1].float()
    keep = plausibility_mask(lt[None], dec.filter_ratio)[0]
    order = torch.argsort(lt, descending=True)
    # the top token, the last kept one and the first one filtered out
    last_kept = int(order[int(keep.sum()) - 1])
    first_out = int(order[int(keep.sum())])
    pos = gd.filter_position(dec, ids, {"top": int(order[0]), "last": last_kept,
                                         "out": first_out})
    assert pos["top"]["rank"] == 0 and pos["top"]["kept"]
    assert pos["last"]["kept"] and pos["last"]["logit_minus_threshold"] >= 0
    assert not pos["out"]["kept"] and pos["out"]["score"] is None
    assert pos["out"]["logit_minus_threshold"] < 0
    assert pos["last"]["score"] == pytest.approx(
        float(lt[last_kept] - dec.alpha * la[last_kept]), abs=1e-3)
    assert pos["k"] == max(1, int(dec.filter_ratio * lt.numel()))

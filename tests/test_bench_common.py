"""The benchmark helpers that decide what a measurement counts: memory of one engine among
two alive, the front-end's cores, and the paired ratios of interleaved runs."""

import os
import subprocess
import sys
import time

import pytest

from uld_vllm.bench import common
from uld_vllm.bench.report import paired_lines
from uld_vllm.bench.throughput import paired_ratios

HOLD = "import sys, time; b = bytearray({n} * 2**20); b[::4096] = b'x' * len(b[::4096]); " \
       "print('ready', flush=True); time.sleep(60)"


def _child(mib: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD.format(n=mib)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_peak_rss_counts_only_the_named_children():
    small, big = _child(20), _child(300)
    try:
        everything = common.PeakRSS().sample()
        only_small = common.PeakRSS(children={small.pid}).sample()
        only_big = common.PeakRSS(children={big.pid}).sample()
        without_big = common.PeakRSS(exclude={big.pid}).sample()
        mib = 2**20
        # the 300 MiB child is in the full count and in its own, not in the other's
        assert only_big - only_small > 250 * mib
        assert everything - only_small > 250 * mib
        assert everything - without_big > 250 * mib and abs(without_big - only_small) < 40 * mib
        assert abs(everything - (only_small + only_big - common.PeakRSS(children=set())
                                 .sample())) < 40 * mib
    finally:
        small.kill()
        big.kill()


def test_peak_rss_with_block_samples_a_child_started_inside():
    with common.PeakRSS(interval=0.05) as mem:
        start = mem.peak
        p = _child(200)
        time.sleep(0.3)
        p.kill()
    assert mem.peak - start > 150 * 2**20


def _keep_env(monkeypatch):
    # bind_cpu writes vLLM's binding variables into os.environ: restore them afterwards
    for key in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # conftest runs engines in-process


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_pin_frontend_moves_this_process_off_the_worker_cores(monkeypatch):
    _keep_env(monkeypatch)
    saved = os.sched_getaffinity(0)
    try:
        bind = common.bind_cpu(1)
        rest = common.pin_frontend(bind)
        assert rest and bind["cores"][0] not in rest
        assert sorted(os.sched_getaffinity(0)) == rest == bind["frontend_cores"]
        assert f"cores {rest}" in bind["vllm"]
    finally:
        os.sched_setaffinity(0, saved)


def test_pin_frontend_leaves_the_mask_when_the_worker_has_every_core(monkeypatch):
    _keep_env(monkeypatch)
    saved = os.sched_getaffinity(0)
    bind = common.bind_cpu(len(saved))
    assert common.pin_frontend(bind) == [] and "frontend_cores" not in bind
    assert os.sched_getaffinity(0) == saved


def test_paired_ratios_pair_runs_by_position():
    uld = {"tokens": 100, "runs_s": [2.0, 1.0, 4.0]}
    plain = {"tokens": 120, "runs_s": [1.0, 1.2, 2.4]}
    # run i: (100 / uld_i) / (120 / plain_i)
    assert paired_ratios(uld, plain) == [0.4167, 1.0, 0.5]


@pytest.mark.parametrize("no_eager,compiled_set,want", [
    (False, False, ["eager"]), (False, True, ["eager", "compiled"]), (True, False, ["compiled"])])
def test_paired_lines_name_the_mode_that_ran(no_eager, compiled_set, want):
    # --no-eager makes the main runs compiled; --compiled adds compiled runs beside eager ones
    w = {"kind": "decode", "batch": 1, "max_tokens": 64, "paired_uld_over_plain": [0.9, 0.95]}
    if compiled_set:
        w["compiled"] = {"paired_uld_over_plain": [0.97]}
    lines = paired_lines({"config": {"no_eager": no_eager}, "workloads": [w]})
    assert [line.split(", each")[0] for line in lines] == [
        f"decode b1 x64 ULD/plain {mode}" for mode in want]
    assert lines[0].endswith("0.900, 0.950")


def test_pin_frontend_moves_nothing_when_the_engine_runs_in_this_process(monkeypatch):
    _keep_env(monkeypatch)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    saved = os.sched_getaffinity(0)
    bind = common.bind_cpu(1)
    assert common.pin_frontend(bind) == [] and "frontend_cores" not in bind
    assert os.sched_getaffinity(0) == saved


# ---------------------------------------------------------------- `bench ab`'s variants
def test_ab_variant_is_a_system_then_environment_variables():
    from uld_vllm.bench.ab import parse_variant

    assert parse_variant("plain", "--a") == {"spec": "plain", "system": "plain", "env": {}}
    v = parse_variant("uld ULD_NATIVE=0 ULD_SPARSE_HEAD_FRACTION='0'", "--b")
    assert v["system"] == "uld" and v["env"] == {"ULD_NATIVE": "0",
                                                 "ULD_SPARSE_HEAD_FRACTION": "0"}
    assert parse_variant("uld CC=ccache=gcc", "--a")["env"] == {"CC": "ccache=gcc"}


@pytest.mark.parametrize("spec, words", [
    ("", ["--a", "does not start with a system", "plain or uld"]),
    ("vllm", ["--a", "'vllm'", "plain or uld"]),
    ("ULD_NATIVE=0 uld", ["does not start with a system"]),
    ("uld ULD_NATIVE", ["'ULD_NATIVE' is not NAME=VALUE"]),
    ("uld 1X=2", ["'1X=2' is not NAME=VALUE"]),
    ("uld X='0", ["cannot be split into words", "close its quotes"]),
    ("uld PYTHONPATH=/src/other", ["PYTHONPATH would not reach the engine", "forks"]),
    ("uld LD_PRELOAD=libtcmalloc.so", ["LD_PRELOAD would not reach the engine"]),
])
def test_ab_refuses_a_malformed_variant_in_one_line(spec, words, capsys):
    from uld_vllm.bench.ab import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--a", spec])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("uld-vllm bench ab: error:")
    for w in words:
        assert w in err, err


def test_ab_refuses_environment_variants_when_engines_share_this_process(monkeypatch, capsys):
    from uld_vllm.bench.ab import parse_args

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    assert parse_args(["--a", "plain", "--b", "uld"]).variants["b"]["env"] == {}
    with pytest.raises(SystemExit):
        parse_args(["--a", "uld ULD_NATIVE=0", "--b", "uld"])
    assert "VLLM_ENABLE_V1_MULTIPROCESSING=0" in capsys.readouterr().err


def test_a_variants_environment_is_set_only_while_its_engine_starts(monkeypatch):
    from uld_vllm.jobs.spec import environment

    monkeypatch.setenv("ULD_TEST_KEPT", "before")
    monkeypatch.delenv("ULD_TEST_NEW", raising=False)
    with environment({"ULD_TEST_KEPT": "during", "ULD_TEST_NEW": "1"}):
        assert (os.environ["ULD_TEST_KEPT"], os.environ["ULD_TEST_NEW"]) == ("during", "1")
    assert os.environ["ULD_TEST_KEPT"] == "before" and "ULD_TEST_NEW" not in os.environ

    with pytest.raises(RuntimeError):
        with environment({"ULD_TEST_KEPT": "during", "ULD_TEST_NEW": "1"}):
            raise RuntimeError("engine failed to start")
    assert os.environ["ULD_TEST_KEPT"] == "before" and "ULD_TEST_NEW" not in os.environ


def test_ab_summarize_takes_the_median_over_engine_pairs():
    from uld_vllm.bench.ab import summarize
    from uld_vllm.bench.throughput import _rate

    load = {"name": "decode_b2", "batch": 2, "max_tokens": 4, "repeats": 3}
    same, other = [[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [5, 6, 7, 9]]

    def pair(a_runs, b_runs, b_out):
        return {"results": {"a": {"decode_b2": _rate(same, a_runs, 2)},
                            "b": {"decode_b2": _rate(b_out, b_runs, 2)}},
                "outputs": {"a": {"decode_b2": same}, "b": {"decode_b2": b_out}}}

    # B at 0.9, 0.5 and 0.8 of A's speed in three pairs: the median pair reads 0.8 (the mean
    # 0.733 and the pooled medians would not)
    pairs = [pair([1.0, 1.0, 1.0], [1.1, 1.12, 1.1], same),
             pair([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], other),
             pair([1.0, 1.2, 1.0], [1.25, 1.25, 1.25], same)]
    (row,) = summarize([load], pairs)
    by_pair = row["b_over_a_by_instance"]
    assert by_pair == pytest.approx([1 / 1.1, 0.5, 0.8])
    assert row["b_over_a"] == pytest.approx(0.8)
    assert row["results"] == {"a": pairs[0]["results"]["a"]["decode_b2"],
                              "b": pairs[0]["results"]["b"]["decode_b2"]}
    assert row["paired_b_over_a"] == [round(1 / t, 4) for t in (1.1, 1.12, 1.1)] \
        + [0.5] * 3 + [0.8, 0.96, 0.8]
    assert row["greedy_same"] == pytest.approx(5 / 6)  # one of the six prompts differs
    (single,) = summarize([load], pairs[:1])  # one pair: its ratio of the medians
    assert single["b_over_a"] == pytest.approx(1 / 1.1)
    assert single["b_over_a_by_instance"] == [single["b_over_a"]]


def test_ab_refuses_zero_instances(capsys):
    from uld_vllm.bench.ab import parse_args

    assert parse_args([]).instances == 1
    with pytest.raises(SystemExit):
        parse_args(["--instances", "0"])
    assert "--instances must be >= 1" in capsys.readouterr().err

"""`uld-vllm generate`: JSONL in, JSONL out, through the ULD engine."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from uld_vllm.core.reference import ReferenceDecoder

# starts vLLM engines, API servers or Ray (`make test-fast` leaves these out)
pytestmark = pytest.mark.engine


def run(*args):
    return subprocess.run([sys.executable, "-m", "uld_vllm.cli", "generate", *args],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))


def test_generate_writes_one_row_per_input(tiny_llama, llama_adapter, tmp_path):
    prompts = ["The author wrote", "Hello", "Question: What did the river do? Answer:"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "text": p}) + "\n"
                           for i, p in enumerate(prompts)))
    out = tmp_path / "out.jsonl"
    r = run("--model", str(tiny_llama), "--uld-adapter", str(llama_adapter), "--input", str(src),
            "--output", str(out), "--prompt-field", "text", "--max-tokens", "10",
            "--ignore-eos", "--dtype", "float32", "--max-model-len", "256", "--enforce-eager")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in rows] == ["q0", "q1", "q2"]
    assert all(x["completion_tokens"] == 10 and x["finish_reason"] == "length" for x in rows)
    ref = ReferenceDecoder.load(tiny_llama, llama_adapter)  # alpha/r from uld_config.json
    want = ref.generate(prompts, max_new_tokens=10, ignore_eos=True)
    assert [x["generation"] for x in rows] == [w.text for w in want]


def test_bad_input_is_one_line_and_writes_nothing(tiny_llama, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok"}\n{"question": "no prompt field"}\n')
    out = tmp_path / "out.jsonl"
    r = run("--model", str(tiny_llama), "--input", str(src), "--output", str(out))
    assert r.returncode == 2
    assert "line 2 has no string field 'prompt'" in r.stderr.strip().splitlines()[-1]
    assert not out.exists()


# ---------------------------------------------------------------- streaming, resume, replicas
RESUME_ROWS = 48
COMMON = ("--max-tokens", "48", "--ignore-eos", "--dtype", "float32", "--max-model-len", "256",
          "--enforce-eager", "--no-progress")


def _rows_file(tmp_path):
    words = "the author wrote about a quiet river in the northern sea".split()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": " ".join(words[:1 + i % 9])}) + "\n"
                           for i in range(RESUME_ROWS)))
    return src


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def resumed(tiny_llama, llama_adapter, tmp_path_factory):
    """A generate run killed (SIGKILL, whole process group) once some rows are written, then
    rerun: (input, output, rows written before the kill, rerun result)."""
    tmp = tmp_path_factory.mktemp("resume")
    src, out = _rows_file(tmp), tmp / "out.jsonl"
    args = ["--model", str(tiny_llama), "--uld-adapter", str(llama_adapter), "--input", str(src),
            "--output", str(out), "--max-num-seqs", "2", *COMMON]
    proc = subprocess.Popen([sys.executable, "-m", "uld_vllm.cli", "generate", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True,
                            env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    partial = tmp / "out.jsonl.partial"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if partial.exists() and partial.read_text().count("\n") >= 6:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _lines(partial)
    assert not out.exists(), "a killed run must not leave OUT behind"
    assert 6 <= len(before) < RESUME_ROWS, "the kill did not land midway"
    with open(partial, "a") as f:
        f.write('{"id": 999, "generation": "half a li')  # as if killed mid-write
    rerun = run(*args)
    return src, out, before, rerun


def test_killed_run_resumes_with_every_row_once(resumed):
    src, out, before, rerun = resumed
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming: {len(before)} of {RESUME_ROWS} rows" in rerun.stderr
    rows = _lines(out)
    assert [r["id"] for r in rows] == list(range(RESUME_ROWS))  # every row once, input order
    by_id = {r["id"]: r for r in rows}
    assert all(by_id[r["id"]] == r for r in before)  # rows written before the kill are kept
    assert all(r["completion_tokens"] == 48 for r in rows)
    assert not (out.parent / "out.jsonl.partial").exists()


def test_rerun_of_a_complete_output_does_nothing(resumed, tiny_llama, llama_adapter):
    src, out, _, _ = resumed
    text = out.read_text()
    r = run("--model", str(tiny_llama), "--uld-adapter", str(llama_adapter), "--input",
            str(src), "--output", str(out), *COMMON)
    assert r.returncode == 0 and "already complete" in r.stdout
    assert out.read_text() == text


def test_resume_with_other_settings_is_one_line(tiny_llama, llama_adapter, tmp_path):
    src, out = _rows_file(tmp_path), tmp_path / "o.jsonl"
    (tmp_path / "o.jsonl.partial").write_text('{"id": 0}\n')
    (tmp_path / "o.jsonl.partial.meta.json").write_text('{"model": "another"}')
    r = run("--model", str(tiny_llama), "--input", str(src), "--output", str(out), *COMMON)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "--overwrite" in err[0]


def test_two_ray_replicas_give_the_same_generations(resumed, tiny_llama, llama_adapter,
                                                    tmp_path):
    pytest.importorskip("ray.data")
    src, single, _, _ = resumed
    out = tmp_path / "replicas.jsonl"
    r = run("--model", str(tiny_llama), "--uld-adapter", str(llama_adapter), "--input",
            str(src), "--output", str(out), "--replicas", "2", *COMMON)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _lines(out) == _lines(single)

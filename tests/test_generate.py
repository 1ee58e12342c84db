"""`uld-vllm generate`: JSONL in, JSONL out, through the ULD engine."""

import json
import os
import subprocess
import sys

from uld_vllm.reference import ReferenceDecoder


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

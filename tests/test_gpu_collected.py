"""The GPU tests cannot run here, but a broken import or parametrisation in them must still
fail CPU CI: collect them the way `make gpu-check` selects them."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_tests_are_collected_without_errors():
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                        "--strict-markers", "-p", "no:cacheprovider", "tests/gpu"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    ids = [ln for ln in r.stdout.splitlines() if "::" in ln]
    assert ids and "error" not in out.lower(), out[-3000:]
    for part in ("smollm2", "qwen2", "fp32", "bf16", "eager", "compiled", "test_served_"):
        assert any(part in i for i in ids), part

"""The CPU ULD engine's allocator settings (uld_vllm.engine.host_malloc)."""

import json
import subprocess
import sys

import pytest

from uld_vllm.engine import host_malloc as hm
from uld_vllm.errors import UldError

MIB = 1 << 20


def test_largest_step_buffer_is_the_stacked_gate_up_output():
    # SmolLM2-135M (intermediate 1536), the eval's 3200-token prefill, bf16: the 39 MB buffer
    assert hm.largest_step_buffer(3200, 1536, 2) == 2 * 3200 * 2 * 1536 * 2 == 39_321_600


@pytest.mark.parametrize("buffer, mmap, trim", [
    (48 * MIB, 49 * MIB, 392 * MIB), (48 * MIB - 1, 49 * MIB, 392 * MIB),
    (48 * MIB - 4097, 48 * MIB, 384 * MIB),
    (MIB, 32 * MIB, 256 * MIB), (0, 32 * MIB, 256 * MIB),
    (300 * MIB, 301 * MIB, 2**31 - 1),  # mallopt takes an int
])
def test_plan_puts_the_threshold_above_the_buffer_and_trim_at_8x(buffer, mmap, trim):
    p = hm.plan(buffer, environ={}, libc_is_glibc=True)
    assert p.apply and (p.mmap_threshold, p.trim_threshold) == (mmap, trim)
    assert p.mmap_threshold > buffer


def test_plan_keeps_within_what_mallopt_takes():
    p = hm.plan(3 << 30, environ={}, libc_is_glibc=True)
    assert p.apply and p.mmap_threshold == 2047 * MIB and p.trim_threshold == 2**31 - 1
    assert "mallopt's limit keeps the threshold at 2047 MiB" in p.reason


@pytest.mark.parametrize("environ, glibc, says", [
    ({"ULD_HOST_MALLOC": "default"}, True, "ULD_HOST_MALLOC=default"),
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, True, "tcmalloc is preloaded"),
    ({"LD_PRELOAD": "/x/libjemalloc.so.2:/y/libgomp.so"}, True, "jemalloc is preloaded"),
    ({}, False, "not glibc"),
])
def test_plan_leaves_other_allocators_and_an_opt_out_alone(environ, glibc, says):
    p = hm.plan(64 * MIB, environ=environ, libc_is_glibc=glibc)
    assert not p.apply and says in p.reason
    state = hm.apply(p)
    assert not state["applied"] and says in hm.describe(state)


def test_plan_refuses_an_unknown_choice_in_one_line():
    with pytest.raises(UldError) as e:
        hm.plan(MIB, environ={"ULD_HOST_MALLOC": "tcmalloc"}, libc_is_glibc=True)
    assert "ULD_HOST_MALLOC='tcmalloc' is unknown" in str(e.value)
    assert "keep" in str(e.value) and "\n" not in str(e.value)


_PROBE = """
import json
from uld_vllm.engine import host_malloc as hm
n = 40 << 20
before = hm.probe_faults(n)
state = hm.apply(hm.plan(n, environ={}))
print(json.dumps({"before": before, "after": hm.probe_faults(n), "state": state,
                  "line": hm.describe(state)}))
"""


@pytest.mark.skipif(hm._glibc() is None, reason="glibc only")
def test_applied_settings_stop_the_page_faults_of_a_reused_40_mib_buffer():
    # its own process: the settings are process-wide, and in-process engines of other tests
    # may have set them in this one already
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout)
    pages = (40 << 20) // 4096
    assert r["before"] > 0.9 * pages  # glibc maps it fresh each time
    assert r["state"]["applied"] and r["state"]["mmap_threshold"] == 41 * MIB
    assert r["after"] < 0.01 * pages, r
    assert "keeps buffers up to 41 MiB" in r["line"] and "328 MiB of freed heap" in r["line"]

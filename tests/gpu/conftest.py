"""The GPU tests (`make gpu-check`): every test here is marked ``gpu`` and, without a CUDA
device, skipped with one reason, so the CPU suite still collects (and import-checks) them."""

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
NO_CUDA = "no CUDA device: the GPU tests run with `make gpu-check` on a GPU machine"


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marker added here
def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """The agreement each greedy test measured, one line per test, also when it passed."""
    lines = [f"{r.nodeid.rsplit('::', 1)[-1]}: {v}"
             for key in ("passed", "failed") for r in terminalreporter.stats.get(key, [])
             if r.when == "call" for k, v in r.user_properties if k == "agreement"]
    if lines:
        terminalreporter.write_sep("-", "ULD engine vs the reference decoder")
        for line in lines:
            terminalreporter.write_line(line)

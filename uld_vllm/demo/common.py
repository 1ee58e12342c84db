"""What both demos share: their engines' settings, a quiet vLLM, a side-by-side table, and
removing only what an earlier run of the same demo wrote."""

from __future__ import annotations

import contextlib
import os
import shutil
import textwrap
from pathlib import Path

# the demos' engines hold a few short prompts: 1 GiB of KV cache (an engine argument, so the
# process environment is left alone)
KV_CACHE_BYTES = 1 << 30


@contextlib.contextmanager
def quiet_vllm():
    """vLLM's engine processes started inside log warnings only (the story stays readable),
    unless the user chose a level; the environment is restored afterwards."""
    from uld_vllm.jobs.spec import environment

    chosen = os.environ.get("VLLM_LOGGING_LEVEL")
    with environment({} if chosen else {"VLLM_LOGGING_LEVEL": "WARNING"}):
        yield


def clear_outputs(work: Path, names) -> None:
    """Create ``work`` and remove only what an earlier demo run wrote there (``names``);
    anything else in the folder is left alone."""
    work.mkdir(parents=True, exist_ok=True)
    for name in names:
        p = work / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _cell(text: str, width: int, lines: int) -> list[str]:
    wrapped = textwrap.wrap(" ".join(text.split()), width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][:width - 1] + "…"
    return wrapped


def format_table(rows: list[tuple[str, str, str, str]], widths=(24, 32, 32, 32),
                 lines=(4, 6, 6, 6),
                 head=("question", "ground truth", "target's answer", "ULD answer")) -> str:
    """Side-by-side columns; long cells wrap (and are cut after ``lines`` lines)."""
    sep = "-+-".join("-" * w for w in widths)
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), sep]
    for row in rows:
        cells = [_cell(c, w, n) for c, w, n in zip(row, widths, lines)]
        for i in range(max(len(c) for c in cells)):
            out.append(" | ".join((c[i] if i < len(c) else "").ljust(w)
                                  for c, w in zip(cells, widths)).rstrip())
        out.append(sep)
    return "\n".join(out)

"""Reading rows: JSON Lines (or a JSON array) from disk, or a dataset from the Hugging Face Hub.

One reader for the trainer, ``uld-vllm generate`` and ``uld-vllm eval``, so every command
reports a bad line the same way (file, line number, what to do).
"""

from __future__ import annotations

import json
from pathlib import Path

from uld_vllm.errors import UldError

# The project's shared data (TOFU splits, ULD augmentation CSVs) sits beside a clone, as CI
# lays it out; jobs take --data-dir to read it from elsewhere.
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

def read_rows(spec: str, what: str) -> list[dict]:
    """Rows of a JSON Lines (or JSON array) file, or of ``NAME[:CONFIG][@SPLIT]`` on the Hub."""
    path = Path(spec)
    if path.exists():
        if path.is_dir():
            raise UldError(f"{what} {path} is a folder", "pass a .jsonl file")
        return _read_json_rows(path, what)
    if "/" in spec and not spec.startswith((".", "/")) and not path.suffix:
        return _read_hub_rows(spec, what)
    raise UldError(f"{what} file {spec} does not exist",
                   "pass a JSONL file or a Hugging Face dataset NAME[:CONFIG][@SPLIT]")


def _read_json_rows(path: Path, what: str) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UldError(f"{what} {path} is not UTF-8 text", "pass a JSON Lines file") from None
    if not text.strip():
        raise UldError(f"{what} {path} is empty", "pass a file with one JSON object per line")
    if text.lstrip().startswith("["):  # a JSON array, as some TOFU copies are stored
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UldError(f"{what} {path} is not valid JSON ({exc.msg}, line {exc.lineno})",
                           "fix the file or convert it to JSON Lines") from None
        return [_as_row(r, path, i + 1, what) for i, r in enumerate(rows)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UldError(f"{what} {path} line {lineno} is not valid JSON ({exc.msg})",
                           "write one JSON object per line") from None
        rows.append(_as_row(obj, path, lineno, what))
    return rows


def _as_row(obj, path, lineno, what) -> dict:
    if not isinstance(obj, dict):
        raise UldError(f"{what} {path} row {lineno} is a {type(obj).__name__}, not an object",
                       "write one JSON object per line")
    return obj


def _read_hub_rows(spec: str, what: str) -> list[dict]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise UldError(f"{what} {spec!r} is not a local file and the `datasets` package is "
                       "not installed", "pip install datasets, or pass a JSONL file") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    # network, unknown name, unknown split: the library's text is long and multi-line
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise UldError(f"cannot load {what} {spec!r} from the Hugging Face Hub "
                       f"({type(exc).__name__}: {first})",
                       "check the name, config and split, and that you are online") from None
    return [dict(r) for r in ds]

"""Resumable JSONL output (`uld_vllm.jobs.partial`), without an engine."""

import json

import pytest

from uld_vllm.errors import UldError
from uld_vllm.jobs.partial import PartialJsonl, key_of

SETTINGS = {"model": "m", "sampling": {"max_tokens": 8, "stop": None}}


def test_rows_go_to_the_partial_file_and_the_output_appears_complete_in_input_order(tmp_path):
    out = tmp_path / "out.jsonl"
    p = PartialJsonl(out, SETTINGS)
    assert p.load() == {} and not p.complete
    p.open()
    for rid in ("c", "a"):  # finish order differs from input order
        p.write({"id": rid, "generation": rid * 2})
    assert not out.exists()
    assert [json.loads(x)["id"] for x in p.partial.read_text().splitlines()] == ["c", "a"]
    p.write({"id": "b", "generation": "bb"})
    assert p.finish(["a", "b", "c"]) == 3
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", "b", "c"]
    assert not p.partial.exists() and not p.meta.exists()
    assert PartialJsonl(out, SETTINGS).complete


def test_resume_keeps_written_rows_and_cuts_a_half_written_line(tmp_path):
    out = tmp_path / "out.jsonl"
    p = PartialJsonl(out, SETTINGS)
    p.load()
    p.open()
    p.write({"id": 0, "generation": "x"})
    p.write({"id": 1, "generation": "y"})
    p.close()
    with open(p.partial, "a") as f:
        f.write('{"id": 2, "generation": "trunc')  # killed mid-write
    q = PartialJsonl(out, SETTINGS)
    done = q.load()
    assert set(done) == {key_of(0), key_of(1)}
    q.open()
    q.write({"id": 2, "generation": "z"})
    q.finish([0, 1, 2])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["generation"] for r in rows] == ["x", "y", "z"]


def test_other_settings_refuse_to_resume_and_overwrite_starts_over(tmp_path):
    out = tmp_path / "out.jsonl"
    p = PartialJsonl(out, SETTINGS)
    p.load()
    p.open()
    p.write({"id": 0})
    p.close()
    other = {"model": "m", "sampling": {"max_tokens": 9, "stop": None}}
    with pytest.raises(UldError, match=r"other settings \(sampling differ\).*--overwrite"):
        PartialJsonl(out, other).load()
    fresh = PartialJsonl(out, other, overwrite=True)
    assert fresh.load() == {} and not fresh.partial.exists()


def test_ids_compare_by_json_text_and_missing_rows_block_finish(tmp_path):
    assert key_of(7) != key_of("7")
    p = PartialJsonl(tmp_path / "o.jsonl", SETTINGS)
    p.load()
    p.open()
    p.write({"id": 7})
    with pytest.raises(RuntimeError, match="1 rows missing"):
        p.finish([7, "7"])
    assert not (tmp_path / "o.jsonl").exists()


def test_partial_without_its_settings_file_is_refused(tmp_path):
    out = tmp_path / "o.jsonl"
    (tmp_path / "o.jsonl.partial").write_text('{"id": 0}\n')
    with pytest.raises(UldError, match="settings are unknown"):
        PartialJsonl(out, SETTINGS).load()
    with pytest.raises(UldError, match="does not exist"):
        PartialJsonl(tmp_path / "nope" / "o.jsonl", SETTINGS)

"""The demo story end to end (built-in authors, so it does not depend on ../shared)."""

from uld_vllm.demo import run_demo


def test_demo_forgets_one_author_and_keeps_the_others(tmp_path, capsys):
    res = run_demo(tmp_path / "demo", data_dir=tmp_path / "no-data")
    out = capsys.readouterr().out
    assert "built-in fictitious authors" in out and "ULD answer" in out
    f, r = res["forget"], res["retain"]
    assert f["target"]["rougeL_recall"] > 0.9 and r["target"]["rougeL_recall"] > 0.9
    assert f["uld"]["rougeL_recall"] < 0.5 * f["target"]["rougeL_recall"]
    assert r["uld"]["rougeL_recall"] > 0.9 * r["target"]["rougeL_recall"]

"""Needle in a haystack through the eval command and the suite: grid, results, heatmap, argument errors."""

import pytest
from test_eval_report import niah_results, write_results_file
from tiny import byte_tokenizer

from infoflow_rag.cli import main
from infoflow_rag.eval.datasets import NIAH_NEEDLE
from infoflow_rag.eval.results import read_results
from infoflow_rag.eval.suite import NIAH_DEPTHS, NIAH_LENGTHS, NIAH_PASSAGE_TOKENS, suite_parts, write_suite_report


def test_eval_run_niah_on_the_tiny_model(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("INFOFLOW_RAG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "niah" / "r.jsonl"
    argv = ["eval", "run", "--model", model_dir, "--dataset", "niah", "--lengths", "150,300", "--depths", "0,1"]
    argv += ["--chunk-tokens", "64", "--methods", "full,infoflow@0.15", "--max-new-tokens", "2", "--out", str(out)]
    assert main(argv) == 0
    results = read_results(out).results
    cells = sorted({(r.meta["context_tokens"], r.meta["depth"]) for r in results})
    assert cells == [(150, 0.0), (150, 1.0), (300, 0.0), (300, 1.0)]
    assert sorted(r.method for r in results) == ["full"] * 4 + ["infoflow@0.15"] * 4
    # The byte tokenizer makes one token per character: 150 haystack tokens in 64-token passages is 3 passages.
    assert {r.meta["needle_passage"] for r in results if r.meta["context_tokens"] == 150} == {0, 2}
    md = (out.parent / "results.md").read_text()
    assert "## Needle in a haystack" in md and (out.parent / "niah_heatmap.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--depths", "0,1.5", "--depths takes comma-separated fractions in [0, 1]"),
        ("--depths", "half", "--depths takes comma-separated fractions in [0, 1]"),
        ("--lengths", "1k", "--lengths takes comma-separated token counts >= 1"),
        ("--out", "runs/results.md", "--out runs/results.md: a results file ends in .jsonl"),  # its report's name
    ],
)
def test_eval_run_niah_rejects_a_bad_flag_before_loading_the_model(flag, value, message, capsys):
    assert main(["eval", "run", "--model", "no-such-model", "--dataset", "niah", flag, value]) == 2
    assert message in capsys.readouterr().err


def test_eval_run_niah_refuses_lengths_past_the_window_before_any_prefill(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INFOFLOW_RAG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r.jsonl"
    argv = ["eval", "run", "--model", model_dir, "--dataset", "niah", "--lengths", "150,4090,9000", "--depths", "0"]
    assert main([*argv, "--max-new-tokens", "8", "--out", str(out)]) == 2  # the tiny model's window: 4096 tokens
    err = capsys.readouterr().err
    assert "--lengths 4090,9000: a haystack of that many tokens and 8 answer tokens do not fit the 4096-token" in err
    assert not out.exists()  # not even the 150-token cells ran


def test_niah_suite_part_is_the_whole_grid_cut_with_the_model_tokens():
    part = next(p for p in suite_parts(ratio=0.1) if p.name == "niah")
    assert part.methods == (
        "full",
        "none",
        "infoflow@0.1",
        "sinkflow@0.1",
        "cacheblend@0.1",
        "epic@0.1",
        "sinkflow+leadin@0.1",
    )

    class Engine:  # all the part needs of an engine is its tokenizer
        tokenizer = byte_tokenizer()

    examples = part.examples(Engine(), start=1000)  # a grid, not questions: start does not apply
    assert len(examples) == part.limit == len(NIAH_LENGTHS) * len(NIAH_DEPTHS)
    for ex in examples:
        assert ex.meta["haystack"] == "second"  # the reported grid is never the development haystack
        needle = ex.passages[ex.meta["needle_passage"]]
        assert NIAH_NEEDLE in needle
        assert all(len(p) <= NIAH_PASSAGE_TOKENS for p in ex.passages if p is not needle)
        assert sum(len(p) for p in ex.passages) >= ex.meta["context_tokens"]


def test_suite_report_shows_the_niah_heatmap(tmp_path):
    write_results_file(tmp_path / "niah.jsonl", niah_results())
    md = write_suite_report(tmp_path, suite_parts()).read_text()
    section = md.split("## Needle in a haystack")[1]
    assert "(partial: 6 answered so far)" in section.splitlines()[0]  # 6 of the 15 grid cells
    assert "| niah | infoflow@0.15 | 6 | 50.0 [50.0, 50.0] |" in section
    assert "![NIAH heatmap](niah_heatmap.png)" in section and (tmp_path / "niah_heatmap.png").stat().st_size > 0

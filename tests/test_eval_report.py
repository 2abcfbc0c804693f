"""Report tables, plots and the generated Markdown, from a small hand-made results file."""

import math
import random
import re

import pytest

from infoflow_rag.eval.methods import parse_method
from infoflow_rag.eval.plots import plot_frontier, plot_niah_heatmap, plot_tradeoff
from infoflow_rag.eval.report import Section, write_report, write_results_md
from infoflow_rag.eval.results import QuestionResult, ResultsLog, RunHeader, read_results
from infoflow_rag.eval.tables import fidelity_paired_table, fidelity_table, paired_table, summary_table

HEADER = RunHeader(
    model_info={"name": "fake-135M", "sha256": "ab" * 32, "prompt_head": "<|user|>\n"},
    prompt="Q: {question}",
    max_new_tokens=16,
    command="infoflow-rag eval --methods full,none --limit 4",
)

# method -> per-question (f1, em, ttft seconds, recompute fraction) on the "toy" set, q0..q3.
TOY = {
    "full": [(1, 1, 1.0, 1.0), (1, 1, 2.0, 1.0), (0.5, 0, 3.0, 1.0), (0, 0, 4.0, 1.0)],
    "infoflow@0.15": [(1, 1, 0.2, 0.15), (0.5, 0, 0.4, 0.15), (0.5, 0, 0.6, 0.15), (0, 0, 0.8, 0.15)],
    "infoflow@0.3": [(1, 1, 0.3, 0.3), (1, 1, 0.6, 0.3), (0.5, 0, 0.9, 0.3), (0, 0, 1.2, 0.3)],
    "none": [(0, 0, 0.1, 0.0), (0, 0, 0.1, 0.0), (0, 0, 0.1, 0.0), (1, 1, 0.1, 0.0)],
}


def result(dataset, qid, method, f1, em, ttft, recompute, ttft_ratio=None, meta=None):
    spec = parse_method(method)
    return QuestionResult(
        dataset=dataset,
        id=qid,
        method=spec.key,
        name=spec.name,
        options=spec.options,
        lead_in=spec.lead_in,
        prediction="x",
        raw_answer="x",
        f1=f1,
        em=em,
        ttft=ttft,
        ttft_ratio=ttft_ratio,
        score_time=0.0,
        recompute_fraction=recompute,
        context_tokens=100,
        passage_order=[0, 1],
        prefill_time=None,
        meta=meta or {},
    )


def toy_results():
    full_ttft = [row[2] for row in TOY["full"]]
    rows = [
        result("toy", f"q{i}", method, f1, em, ttft, rc, ttft_ratio=ttft / full_ttft[i])
        for method, per_question in TOY.items()
        for i, (f1, em, ttft, rc) in enumerate(per_question)
    ]
    # A second set without `full` or the baseline: no TTFT ratio, no paired rows.
    return rows + [result("toy2", f"p{i}", "epic@0.15", 1.0, 1.0, 0.5, 0.15) for i in range(2)]


def niah_results():
    return [
        result("niah", f"niah-{n}-{d:g}", method, f1, f1, 0.1, 0.15, meta={"depth": d, "context_tokens": n})
        for method, f1 in (("full", 1.0), ("infoflow@0.15", 0.5))
        for n in (1000, 2000)
        for d in (0.0, 0.5, 1.0)
    ]


def table_rows(markdown):
    lines = markdown.splitlines()
    assert re.fullmatch(r"\|(-+:?\|)+", lines[1].replace("---:", "---"))
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_summary_table_numbers_by_hand():
    rows = table_rows(summary_table(toy_results()))
    assert [row[:3] for row in rows] == [
        ["toy", "full", "4"],
        ["toy", "infoflow@0.15", "4"],
        ["toy", "infoflow@0.3", "4"],
        ["toy", "none", "4"],
        ["toy2", "epic@0.15", "2"],
    ]
    means = [(row[3].split()[0], row[4].split()[0]) for row in rows]
    assert means == [
        ("62.5", "50.0"),
        ("50.0", "25.0"),
        ("62.5", "50.0"),
        ("25.0", "25.0"),
        ("100.0", "100.0"),
    ]
    # Median TTFT in ms, median TTFT ratio to full (none: median of 0.1/[1, 2, 3, 4]), mean recompute.
    assert [row[5:] for row in rows] == [
        ["2500.0", "1.00", "100.0%"],
        ["500.0", "0.20", "15.0%"],
        ["750.0", "0.30", "30.0%"],
        ["100.0", "0.04", "0.0%"],
        ["500.0", "n/a", "15.0%"],
    ]
    for row in rows:
        for cell in row[3:5]:
            mean, low, high = map(float, re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cell).groups())
            assert 0 <= low <= mean <= high <= 100


def test_paired_table_against_infoflow():
    rows = table_rows(paired_table(toy_results()))
    assert [[row[0], row[1], row[2], row[3].split()[0], row[4]] for row in rows] == [
        ["toy", "full", "4", "+12.5", "1/3/0"],  # differences 0, +0.5, 0, 0
        ["toy", "infoflow@0.3", "4", "+12.5", "1/3/0"],
        ["toy", "none", "4", "-25.0", "1/0/3"],  # differences -1, -0.5, -0.5, +1
    ]


def test_paired_table_needs_a_baseline_that_was_run():
    with pytest.raises(ValueError, match="baseline 'cacheblend@0.15' is not in the results"):
        paired_table(toy_results(), baseline="cacheblend@0.15")


def test_plots_are_written(tmp_path):
    for path in (
        plot_tradeoff(toy_results(), tmp_path / "tradeoff.png"),
        plot_niah_heatmap(niah_results(), tmp_path / "plots" / "niah.png"),
    ):
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_niah_heatmap_needs_niah_results(tmp_path):
    with pytest.raises(ValueError, match="no needle-in-a-haystack results"):
        plot_niah_heatmap(toy_results(), tmp_path / "niah.png")


def write_results_file(path, results, header=HEADER):
    with ResultsLog(path, header, resume=False) as log:
        for r in results:
            log.append(r)
    return path


def test_results_md_records_the_run(tmp_path):
    run = read_results(write_results_file(tmp_path / "r.jsonl", toy_results()))
    table = summary_table(run.results)
    md = write_results_md(
        tmp_path / "results.md", run, Section("Accuracy", table), command="python -m report r.jsonl"
    ).read_text()
    assert "Generated by infoflow_rag.eval.report.write_results_md" in md
    assert "```sh\npython -m report r.jsonl\n```" in md
    assert "```sh\ninfoflow-rag eval --methods full,none --limit 4\n```" in md
    assert '| prompt_head | "<\\|user\\|>\\n" |' in md
    assert f'| sha256 | "{"ab" * 32}" |' in md
    assert "```text\nQ: {question}\n```" in md
    assert "`max_new_tokens` = 16" in md
    assert f"## Accuracy\n\n{table}\n" in md


def test_write_report_end_to_end(tmp_path):
    path = write_results_file(tmp_path / "r.jsonl", toy_results() + niah_results())
    md_path = write_report(path, tmp_path / "report")
    md = md_path.read_text()
    assert md_path == tmp_path / "report" / "results.md"
    for png in ("tradeoff.png", "niah_heatmap.png"):
        assert (tmp_path / "report" / png).stat().st_size > 0
        assert f"({png})" in md
    assert "## Paired comparison with infoflow@0.15" in md
    assert "| niah | infoflow@0.15 | 6 | 50.0 [50.0, 50.0] | 50.0 [50.0, 50.0] |" in md


def test_eval_report_rewrites_a_results_files_report_beside_it(tmp_path, monkeypatch, capsys):
    from infoflow_rag.cli import main

    paths = [write_results_file(tmp_path / name / "results.jsonl", toy_results()) for name in ("a", "b")]
    monkeypatch.setattr("sys.argv", ["infoflow-rag", "eval", "report", *map(str, paths)])
    assert main(["eval", "report", *map(str, paths)]) == 0
    for path in paths:
        md = (path.parent / "results.md").read_text()
        assert f"```sh\ninfoflow-rag eval report {paths[0]} {paths[1]}\n```" in md  # how it was generated
        assert "## Paired comparison with infoflow@0.15" in md and (path.parent / "tradeoff.png").stat().st_size > 0
    assert capsys.readouterr().out.splitlines() == [f"report: {p.parent / 'results.md'}" for p in paths]


@pytest.mark.parametrize("flags", [["--main-n", "5"], ["--out", "elsewhere"], ["--ratio", "0.3", "--large-n", "2"]])
def test_eval_report_refuses_the_suites_flags_beside_results_files(tmp_path, capsys, flags):
    from infoflow_rag.cli import main

    path = write_results_file(tmp_path / "results.jsonl", toy_results())
    assert main(["eval", "report", str(path), *flags]) == 2
    err = capsys.readouterr().err
    assert all(flag in err for flag in flags if flag.startswith("--")) and "set the suite's report" in err
    assert not (tmp_path / "results.md").exists()


def test_two_results_files_in_one_directory_are_refused_before_any_report(tmp_path, capsys):
    # Their reports share results.md and the plots' names: the second overwrote the first's.
    from infoflow_rag.cli import main

    paths = [write_results_file(tmp_path / name, toy_results()) for name in ("a.jsonl", "b.jsonl")]
    assert main(["eval", "report", *map(str, paths)]) == 2
    assert f"{tmp_path} holds other results files (b.jsonl)" in capsys.readouterr().err
    assert not (tmp_path / "results.md").exists()  # not even the first's
    with pytest.raises(ValueError, match=f"a directory of its own, e.g. {tmp_path / 'b' / 'b.jsonl'}"):
        write_report(paths[1], tmp_path)
    assert main(["eval", "run", "--out", str(tmp_path / "c.jsonl"), "--limit", "1"]) == 2  # before the model loads
    assert "holds other results files (a.jsonl, b.jsonl)" in capsys.readouterr().err


def test_eval_report_names_a_file_that_is_not_a_results_file(tmp_path, capsys):
    from infoflow_rag.cli import main

    (tmp_path / "notes.jsonl").write_text('{"type": "result"}\n')
    assert main(["eval", "report", str(tmp_path / "notes.jsonl")]) == 2
    assert "notes.jsonl is not a results file" in capsys.readouterr().err


def test_verdict_states_the_goal_from_the_numbers():
    from infoflow_rag.eval.verdicts import verdict

    rows = []
    for qid, (full, inf, cb, epic) in enumerate([(1.0, 1.0, 0.0, 1.0), (0.5, 0.4, 0.4, 0.0), (1.0, 1.0, 1.0, 0.0)]):
        for method, f1 in [("full", full), ("infoflow@0.15", inf), ("cacheblend@0.15", cb), ("epic@0.15", epic)]:
            rows.append(result("hotpotqa", str(qid), method, f1, f1, 1.0, 0.15))
    text = verdict(rows)
    # full 2.5/3, infoflow 2.4/3: relative gap 4 % -> not within 2 %; ahead of both baselines on average.
    assert "F1 80.0 vs 83.3" in text and "relative gap 4.0 % — NOT within the 2 % goal" in text
    assert "vs `cacheblend@0.15` on 3 questions: F1 80.0 vs 46.7" in text and "W/T/L 1/2/0 — ahead" in text
    assert "vs `epic@0.15` on 3 questions: F1 80.0 vs 33.3" in text and "W/T/L 2/1/0 — ahead" in text
    assert verdict(rows[:1]).startswith("No verdict")


def _answering(dataset, qid, method, prediction):
    r = result(dataset, qid, method, 0.0, 0.0, 1.0, 0.15)
    r.prediction = prediction
    return r


def test_agreement_table_scores_answers_against_the_reference_answer_by_hand():
    from infoflow_rag.eval.tables import agreement_table

    answers = {
        "full": ["Paris", "the red fox", "1889"],
        "infoflow@0.15": ["Paris", "red fox jumps", "1889"],  # F1 1, 0.8, 1 vs full
        "none": ["London", "fox", "1889"],  # F1 0, 0.667, 1
    }
    rows = [_answering("d", f"q{i}", m, a) for m, per_q in answers.items() for i, a in enumerate(per_q)]
    table = table_rows(agreement_table(rows, "full", "infoflow@0.15"))
    assert [row[:5] for row in table] == [
        ["d", "infoflow@0.15", "3", table[0][3], "67%"],
        ["d", "none", "3", table[1][3], "33%"],
    ]
    assert table[0][3].startswith("93.3 ") and table[1][3].startswith("55.6 ")
    assert table[0][5:] == ["—", "—"]
    assert table[1][5].startswith("-37.8 ") and table[1][6] == "0/1/2"
    # the verdict adds the same comparison
    from infoflow_rag.eval.verdicts import verdict

    assert "`infoflow@0.15` vs `none`: 93.3 vs 55.6, paired difference +37.8" in verdict(rows)


def test_agreement_plot_is_written(tmp_path):
    from infoflow_rag.eval.plots import plot_agreement

    rows = [_answering("d", "q0", m, a) for m, a in (("full", "a b"), ("infoflow@0.1", "a"), ("infoflow@0.5", "a b"))]
    path = plot_agreement(rows, tmp_path / "agreement.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no results next to 'full'"):
        plot_agreement(rows[1:], tmp_path / "none.png")


def test_agreement_by_subset_splits_at_the_median_context_and_by_type():
    from infoflow_rag.eval.suite import _agreement_by_subset

    rows = []
    for i, (tokens, kind) in enumerate([(100, "bridge"), (200, "bridge"), (300, "comparison"), (400, "bridge")]):
        for method, answer in (("full", "a"), ("infoflow@0.15", "a" if tokens > 200 else "b")):
            r = _answering("d", f"q{i}", method, answer)
            r.context_tokens, r.meta = tokens, {"type": kind}
            rows.append(r)
    text = _agreement_by_subset(rows, "infoflow@0.15")
    assert "*context <= 200 tokens* (2 questions)" in text and "*context > 200 tokens* (2 questions)" in text
    assert "*bridge questions* (3 questions)" in text and "*comparison questions* (1 questions)" in text
    short, long = text.split("*context > 200 tokens*")[0], text.split("*context > 200 tokens*")[1].split("*bridge")[0]
    assert "| d | infoflow@0.15 | 2 | 0.0 " in short and "| d | infoflow@0.15 | 2 | 100.0 " in long


def test_agreement_by_ratio_pairs_each_selector_with_infoflow_at_the_same_ratio():
    from infoflow_rag.eval.suite import _agreement_by_ratio

    answers = {"full": "x y", "infoflow@0.1": "x", "epic@0.1": "z", "infoflow@0.5": "x y", "epic@0.5": "x"}
    rows = [_answering("d", "q0", m, a) for m, a in answers.items()]
    text = _agreement_by_ratio(rows)
    low, high = text.split("*ratio 0.5*")
    assert "*ratio 0.1*" in low and "Δ vs infoflow@0.1" in low and "Δ vs infoflow@0.5" in high
    assert "| d | epic@0.1 | 1 | 0.0 " in low and "-66.7 " in low  # 0 vs F1("x", "x y") = 0.667
    assert "| d | epic@0.5 | 1 | 66.7 " in high and "-33.3 " in high and "epic@0.1" not in high


def test_entropy_verdict_pairs_infokv_with_snapkv_at_each_keep():
    from infoflow_rag.eval.verdicts import entropy_verdict

    rows = []
    for i in range(4):
        for method, answer, f1 in (
            ("infoflow@0.15", "x y", 1.0),
            ("infoflow@0.15+snapkv:0.25", "x y", 1.0),
            ("infoflow@0.15+infokv:0.25", "z", 0.0),  # loses every question: hurts
            ("infoflow@0.15+snapkv:0.5", "x y", 1.0),
            ("infoflow@0.15+infokv:0.5", "x y", 1.0),  # identical: no difference
        ):
            r = _answering("d", f"q{i}", method, answer)
            spec = parse_method(method)
            r.f1, r.options = f1, spec.options
            rows.append(r)
    text = entropy_verdict(rows, "infoflow@0.15")
    assert "keep 0.25: InfoKV − SnapKV on 4 questions: gold F1 -100.0" in text and text.splitlines()[0].endswith(
        "hurts"
    )
    assert text.splitlines()[1].endswith("no significant difference")
    assert entropy_verdict(rows[:1], "infoflow@0.15").startswith("No verdict")


# method -> per-question (kl_answer, kl_first, top1, gold_nll, ttft_ratio) on q0..q3.
FIDELITY = {
    "full": [(0.0, 0.0, 1.0, 2.0, 1.0)] * 4,
    "infoflow@0.15": [
        (0.1, 0.2, 1.0, 2.1, 0.25), (0.2, 0.1, 0.5, 2.2, 0.25), (0.3, 0.3, 1.0, 2.0, 0.25), (0.4, 0.0, 1.0, 2.3, 0.25)
    ],
    "epic@0.15": [
        (0.3, 0.2, 0.5, 2.5, 0.2), (0.1, 0.1, 0.5, 2.2, 0.2), (0.5, 0.3, 0.0, 2.0, 0.2), (0.4, 0.0, 1.0, 2.3, 0.2)
    ],
    "epic@0.3": [(0.1, 0.1, 1.0, 2.0, 0.3)] * 4,
}  # fmt: skip


def fidelity_results():
    rows = []
    for method, per_question in FIDELITY.items():
        for i, (kl, first, top1, nll, ratio) in enumerate(per_question):
            r = result("hotpotqa", f"q{i}", method, 0.5, 0.0, ratio, 0.15, ttft_ratio=ratio)
            r.kl_answer, r.kl_first, r.top1, r.gold_nll = kl, first, top1, nll
            rows.append(r)
    return rows + [result("hotpotqa", "q9", "none", 0.0, 0.0, 0.1, 0.0)]  # from an old file: no measures


def test_fidelity_table_numbers_by_hand():
    rows = {row[1]: row for row in table_rows(fidelity_table(fidelity_results()))}
    assert list(rows) == ["full", "infoflow@0.15", "epic@0.15", "epic@0.3"]  # `none` has no measures
    info = rows["infoflow@0.15"]
    assert info[2] == "4" and info[3].startswith("0.25 [") and info[4] == "0.25"  # mean 0.25, median 0.25
    assert info[5].startswith("0.15 [") and info[6].startswith("87.5 [") and info[7].startswith("2.15 [")
    assert rows["full"][3] == "0 [0, 0]" and rows["full"][6] == "100.0 [100.0, 100.0]"


def test_fidelity_paired_table_counts_who_is_closer():
    rows = {row[1]: row for row in table_rows(fidelity_paired_table(fidelity_results(), "infoflow@0.15"))}
    assert "infoflow@0.15" not in rows
    epic = rows["epic@0.15"]
    # kl_answer epic - infoflow per question: +0.2, -0.1, +0.2, 0 -> mean +0.075; closer on q1, tie on q3.
    assert epic[2] == "4" and epic[3].startswith("+0.075 [") and epic[5] == "1/1/2"
    # Per-question ratios 3, 0.5, 5/3, 1: geometric mean 10 ** mean(log10) = 1.257.
    assert epic[4].startswith("1.26 [")
    assert epic[6].startswith("-37.5 [")  # top1 0.5 vs 0.875
    assert epic[7].startswith("+0.1 [")  # gold NLL 2.25 vs 2.15


def test_log_kl_diff_is_the_geometric_ratio_and_floors_zero():
    from infoflow_rag.eval.stats import KL_FLOOR, log_kl_diff

    d = log_kl_diff([0.2, 0.1, 0.0], [0.1, 0.1, KL_FLOOR])
    assert d.mean == pytest.approx(math.log10(2) / 3)  # 2, 1 and (0 floored) 1
    assert 10**d.mean == pytest.approx(2 ** (1 / 3))


def test_resolution_table_scores_each_measure_against_its_interval():
    from infoflow_rag.eval.tables import resolution_table

    table = resolution_table(fidelity_results(), "infoflow@0.15")
    header, rows = table.splitlines()[0], {row[1]: row for row in table_rows(table)}
    assert "| gold F1 | agreement | kl_answer | log kl_answer | top1 | gold_nll |" in header
    assert set(rows) == {"epic@0.15", "epic@0.3"}  # not the baseline, not full, not a method without measures
    assert rows["epic@0.3"][3] == "n/a"  # gold F1 0.5 everywhere: a zero-width interval resolves nothing
    # kl_answer epic@0.3 - infoflow: 0, -0.1, -0.2, -0.3 -> the interval excludes 0, so the ratio is above 1
    assert float(rows["epic@0.3"][5]) > 1


def test_fidelity_verdict_pairs_kl_per_question():
    from infoflow_rag.eval.verdicts import verdict

    text = verdict(fidelity_results())
    line = next(x for x in text.splitlines() if "`infoflow@0.15` vs `epic@0.3`" in x)
    assert "kl_answer 0.25 vs 0.1, paired difference +0.15" in line and "closer on 0 of 4" in line
    assert line.endswith("further from full")  # every per-question difference is positive: the CI excludes 0


def test_trial_verdict_holds_the_candidate_to_the_bar_against_each_rival():
    from infoflow_rag.eval.verdicts import trial_verdict

    rows = fidelity_results()
    # epic@0.3 - infoflow@0.15 per question: kl 0, -0.1, -0.2, -0.3 (interval below 0); top1 +0.125 on average.
    text = trial_verdict(rows, "epic@0.3", ["infoflow@0.15"])
    assert "`epic@0.3` vs `infoflow@0.15` on 4 questions: kl_answer 0.1 vs 0.25, paired difference -0.15" in text
    assert "top1 paired difference +12.5 [" in text and text.endswith(": met")
    # infoflow - epic@0.15: kl -0.2, +0.1, -0.2, 0 (the interval includes 0) misses; against more budget
    # (epic@0.3: every question further) it is judged only on "at least as close", and is not.
    text = trial_verdict(rows, "infoflow@0.15", ["epic@0.15", "cacheblend@0.15"], frontier=["epic@0.3"])
    lines = text.splitlines()
    assert lines[0].startswith("- `infoflow@0.15` vs `epic@0.15`") and lines[0].endswith("misses the bar")
    assert lines[1] == "- `infoflow@0.15` vs `cacheblend@0.15`: not run on the same questions"
    assert lines[2].startswith("- `infoflow@0.15` vs `epic@0.3`") and lines[2].endswith("further from full")
    assert lines[3].endswith("NOT met (missed against `epic@0.15`, `cacheblend@0.15`)")
    assert trial_verdict(rows, "sinkflow@0.15", ["infoflow@0.15"]).startswith("No verdict")


@pytest.mark.parametrize("verdict_of", ["trial", "fidelity"])
def test_verdicts_state_the_interval_of_the_paired_table(verdict_of):
    from infoflow_rag.eval.verdicts import fidelity_verdict, trial_verdict

    rng = random.Random(0)
    ids = [f"q{i}" for i in range(12)]
    rng.shuffle(ids)  # a results file is in run order, not sorted: the pairing must not depend on it
    rows = []
    for method in ("full", "infoflow@0.15", "sinkflow@0.15"):
        for qid in ids:
            r = result("hotpotqa", qid, method, 0.5, 0.0, 1.0, 0.15)
            r.kl_answer, r.kl_first, r.top1, r.gold_nll = (0.0 if method == "full" else rng.random()), 0.0, 1.0, 2.0
            rows.append(r)
    if verdict_of == "trial":
        text = trial_verdict(rows, "sinkflow@0.15", ["infoflow@0.15"])
    else:
        text = "\n".join(fidelity_verdict(rows, "sinkflow@0.15"))
    interval = re.search(r"paired difference (\S+ \[[^\]]+\])", text).group(1)
    table = {row[1]: row for row in table_rows(fidelity_paired_table(rows, "infoflow@0.15"))}
    assert table["sinkflow@0.15"][3] == interval


@pytest.mark.parametrize("trial", ["sinkflow+leadin@0.15", "sinkflow@0.15"])
def test_suite_report_puts_the_newest_trial_selector_of_its_run_against_its_rivals(tmp_path, trial):
    """A run from before the newest trial keeps its own trial in its report."""
    from infoflow_rag.eval.suite import TRIALS, suite_parts, write_suite_report

    assert [f"{t}@0.15" for t in TRIALS] == ["sinkflow+leadin@0.15", "sinkflow@0.15"]

    rows = []
    for r in fidelity_results():  # epic@0.3's numbers play the selector on trial
        renamed = result(r.dataset, r.id, trial, r.f1, r.em, r.ttft, 0.15) if r.method == "epic@0.3" else r
        renamed.kl_answer, renamed.kl_first, renamed.top1, renamed.gold_nll = (
            r.kl_answer,
            r.kl_first,
            r.top1,
            r.gold_nll,
        )
        rows.append(renamed)
    write_results_file(tmp_path / "main.jsonl", rows)
    md = write_suite_report(tmp_path, suite_parts()).read_text()
    assert f"The selector on trial, `{trial}`, computed from the fidelity tables below:" in md
    assert f"- `{trial}` vs `epic@0.15` on 4 questions" in md
    assert f"- `{trial}` vs `cacheblend@0.15`: not run on the same questions" in md
    assert f"Fidelity paired against `{trial}` on the same questions:" in md


def test_suite_report_says_how_each_part_was_run(tmp_path):
    from dataclasses import replace

    from infoflow_rag.eval.suite import suite_parts, write_suite_report

    write_results_file(tmp_path / "main.jsonl", toy_results())
    large = replace(
        HEADER,
        model_info={**HEADER.model_info, "name": "fake-1.5B"},
        command="/work/tree/infoflow_rag/cli/__main__.py eval suite --parts large",
    )
    write_results_file(tmp_path / "large.jsonl", toy_results(), header=large)
    md = write_suite_report(tmp_path, suite_parts()).read_text()
    # The Run section has the first part's commands; a part run otherwise says how, as a reader can rerun it.
    assert md.count("```sh\ninfoflow-rag eval --methods full,none --limit 4\n```") == 1
    produced = "Produced by (first run, then each resume), on `fake-1.5B`, started "
    assert md.count(produced) == 1
    assert "```sh\npython -m infoflow_rag.cli eval suite --parts large\n```" in md.split(produced)[1]
    from infoflow_rag.eval.results import readable_command

    assert readable_command('edited "by hand') == 'edited "by hand'  # not shell syntax: shown, not a crash
    # The toy run's EPIC answered other questions than InfoFlow: the verdict says so instead of failing.
    assert "- `infoflow@0.15` vs `epic@0.15`: not run on the same questions" in md


def test_frontier_plot_is_written(tmp_path):
    assert plot_frontier(fidelity_results(), tmp_path / "frontier.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no results with fidelity"):
        plot_frontier(toy_results(), tmp_path / "none.png")


def positions_results():
    """Two questions with per-position fidelity: full's confidence on its `full` row, epic's KL along them."""
    rows = []
    # q -> (full's p per position, epic's KL per position, epic's top1 per position, infoflow@1's KL)
    per_q = {
        "q0": ([0.9, 0.4, 0.95], [0.0, 0.6, 0.0], [True, False, True]),
        "q1": ([0.8, 0.9], [0.1, 0.5], [True, True]),
    }
    for qid, (full_p, kl, top1) in per_q.items():
        full = result("hotpotqa", qid, "full", 1.0, 1.0, 1.0, 1.0)
        full.kl_answer, full.kl_positions, full.top1_positions = 0.0, [0.0] * len(kl), [True] * len(kl)
        full.p_positions = full_p
        epic = result("hotpotqa", qid, "epic@0.15", 1.0, 1.0, 1.0, 0.15)
        epic.kl_answer, epic.kl_positions, epic.top1_positions = sum(kl) / len(kl), kl, top1
        exact = result("hotpotqa", qid, "infoflow@1", 1.0, 1.0, 1.0, 1.0)
        exact.kl_answer, exact.kl_positions, exact.top1_positions = 0.0, [0.0] * len(kl), [True] * len(kl)
        rows += [full, epic, exact]
    orphan = result("hotpotqa", "q2", "epic@0.15", 1.0, 1.0, 1.0, 0.15)  # its question has no full row
    orphan.kl_answer, orphan.kl_positions, orphan.top1_positions = 1.0, [1.0], [False]
    return rows + [orphan, result("hotpotqa", "q3", "none", 0.0, 0.0, 0.1, 0.0)]  # and one from an old file


def test_kl_mass_table_numbers_by_hand():
    from infoflow_rag.eval.kl_mass import kl_mass_table, positions_by_method

    by_method = positions_by_method(positions_results())
    assert list(by_method) == ["epic@0.15", "infoflow@1"]  # not full, not the orphan, not the old row
    assert len(by_method["epic@0.15"]) == 2
    rows = {row[0]: row for row in table_rows(kl_mass_table(by_method))}
    # epic's kl_answer: 0.2 on q0, 0.3 on q1 -> total 0.5, mean 0.25. Worst positions: 0.6/3 + 0.5/2 = 0.45 (90 %);
    # the one fork (q0's middle) carries 0.6/3 = 0.2 (40 %), and so does full's one unsure position (p 0.4).
    # Full's p at the worst positions: 0.4 and 0.9 -> median 0.65. The top question (q1) holds 0.3 of 0.5.
    assert rows["epic@0.15"][1:] == ["2", "0.2500", "90%", "40%", "40%", "0.50", "0.65", "60%"]
    assert rows["infoflow@1"][1:] == ["2", "0"] + ["—"] * 6  # exact: no mass to split


def test_kl_mass_section_only_where_positions_were_stored():
    from infoflow_rag.eval.suite import _fidelity_blocks

    heading = "Where each method's kl_answer sits"
    assert any(heading in block for block in _fidelity_blocks(positions_results(), None))
    assert not any(heading in block for block in _fidelity_blocks(fidelity_results(), "infoflow@0.15"))


def test_kl_mass_reads_full_confidence_from_the_reference_row_only():
    from infoflow_rag.eval.kl_mass import AnswerPositions, positions_by_method

    rows = positions_results()
    # Full prefill with a compressed decode cache is a method like any other: its KL is not 0, and its own
    # probabilities of full's tokens are not full's confidence.
    compressed = result("hotpotqa", "q0", "full+snapkv:0.5", 1.0, 1.0, 1.0, 1.0)
    compressed.kl_answer, compressed.kl_positions, compressed.top1_positions = 0.1, [0.0, 0.3, 0.0], [True] * 3
    compressed.p_positions = [0.1, 0.1, 0.1]
    by_method = positions_by_method([*rows[:1], compressed, *rows[1:]])
    assert [q.full_p for q in by_method["full+snapkv:0.5"]] == [[0.9, 0.4, 0.95]]
    assert [q.full_p for q in by_method["epic@0.15"]] == [[0.9, 0.4, 0.95], [0.8, 0.9]]
    with pytest.raises(ValueError, match=r"must align, got lengths \{'kl': 2, 'top1': 2, 'full_p': 3\}"):
        AnswerPositions(0.1, [0.1, 0.1], [True, True], [0.5, 0.5, 0.5])

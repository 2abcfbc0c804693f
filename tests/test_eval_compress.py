"""KV compression in the eval harness: method grammar, runner, results file, report table, suite part, CLI."""

import json
import re
from dataclasses import dataclass

import pytest
from conftest import PASSAGES, QUESTION
from fake_engine import FakeEngineBase
from specs import spec
from test_eval_report import HEADER, result, table_rows, write_results_file

from infoflow_rag.cli import main
from infoflow_rag.eval.datasets import EvalExample
from infoflow_rag.eval.methods import parse_method
from infoflow_rag.eval.report import write_report
from infoflow_rag.eval.results import read_results
from infoflow_rag.eval.runner import run_eval
from infoflow_rag.eval.suite import run_suite, suite_parts, write_suite_report
from infoflow_rag.eval.tables import compression_table

MiB = 2**20


@pytest.mark.parametrize(
    ("text", "spec", "key"),
    [
        (
            "infoflow@0.15+infokv:0.5",
            spec("infoflow+infokv", "infoflow", 0.15, compress="infokv", keep=0.5),
            "infoflow@0.15+infokv:0.5",
        ),
        (
            "infoflow+snapkv:0.25",  # the default ratio applies
            spec("infoflow+snapkv", "infoflow", 0.15, compress="snapkv", keep=0.25),
            "infoflow@0.15+snapkv:0.25",
        ),
        ("none+snapkv:0.5", spec("none+snapkv", "none", 0.0, compress="snapkv", keep=0.5), "none+snapkv:0.5"),
        (
            "infoflow+reorder[tail/tail]@0.1+infokv:256",  # a whole number is a token count
            spec("infoflow+reorder[tail/tail]+infokv", "infoflow", 0.1, True, "tail/tail", "infokv", 256),
            "infoflow+reorder[tail/tail]@0.1+infokv:256",
        ),
        ("full+snapkv:1.0", spec("full+snapkv", "full", 1.0, compress="snapkv", keep=1.0), "full+snapkv:1.0"),
    ],
)
def test_parse_compressing_method_round_trips(text, spec, key):
    parsed = parse_method(text)
    assert parsed == spec and parsed.key == key
    again = parse_method(key)
    assert again == spec and type(again.options.keep) is type(spec.options.keep)  # "1.0" stays a share, "256" a count


def test_keys_without_compression_are_unchanged():
    # Results files are resumed by key: these must read exactly as before compression existed.
    old = ["full", "none", "infoflow@0.15", "infoflow+reorder@0.15", "infoflow[tail/tail]@0.1", "epic@0.05"]
    assert [parse_method(k).key for k in old] == old
    assert all((parse_method(k).options.compress, parse_method(k).options.keep) == ("none", 1.0) for k in old)


def test_uncompressed_is_the_baseline_method():
    assert parse_method("infoflow+reorder@0.1+infokv:0.5").uncompressed == parse_method("infoflow+reorder@0.1")
    assert parse_method("none+snapkv:64").uncompressed.key == "none"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("infoflow+zip:0.5", "unknown compression policy 'zip'; known policies: infokv, none, snapkv"),
        ("infoflow+snapkv:0", r"keep=0 as a token count must be >= 1"),
        ("infoflow+snapkv:0.0", r"keep=0.0 as a ratio must be in \(0, 1\]"),
        ("infoflow+snapkv:1.5", r"keep=1.5 as a ratio must be in \(0, 1\]"),
        ("infoflow+infokv", "policy 'infokv' needs a keep, e.g. '\\+infokv:0.5'"),
        ("infoflow+snapkv:half", "keep 'half' is not a number"),
        ("infoflow+none:0.5", "leave out '\\+none'"),
        ("infoflow+snapkv:0.5+reorder", "cannot parse"),
    ],
)
def test_parse_compressing_method_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        parse_method(text)


def test_keep_without_a_policy_is_rejected():
    with pytest.raises(ValueError, match="keep=0.5 needs a compression policy"):
        spec("infoflow", "infoflow", 0.15, keep=0.5)
    with pytest.raises(ValueError, match="keep=1 needs a compression policy"):
        spec("infoflow", "infoflow", 0.15, keep=1)  # an int is a token count, not "everything"


@dataclass
class Timings:
    ttft: float
    score: float = 0.0


@dataclass
class Answer:
    answer: str
    timings: Timings
    recompute_fraction: float
    context_tokens: int
    passage_order: list[int]
    kv_tokens: int
    kv_bytes: int
    answer_ids: list[int]


@dataclass
class CompressingEngine(FakeEngineBase):
    """Answers "blue"; the KV it reports shrinks to ``keep`` of 100 context tokens behind 20 other tokens, and
    compressing takes 20 % off its TTFT."""

    def respond(self, call):
        keep = call.get("keep", 1.0)
        kept = keep if isinstance(keep, int) else int(100 * keep)
        ttft = (1.0 if call["selector"] == "full" else 0.5) * (0.8 if call["compress"] != "none" else 1.0)
        return Answer("blue", Timings(ttft), 0.15, 100, [0, 1], 20 + kept, (20 + kept) * 1024, [5])


def test_runner_passes_compression_and_records_kv_sizes(tmp_path):
    engine = CompressingEngine({"name": "fake"}, [])
    examples = [EvalExample("q0", "What colour?", ["blue"], ["p1", "p2"], {}, "toy")]
    texts = ["infoflow@0.15", "infoflow@0.15+infokv:0.5", "none+snapkv:30", "full+snapkv:0.25", "full"]
    results = run_eval(engine, examples, [parse_method(m) for m in texts], tmp_path / "r.jsonl", progress=False)
    # Uncompressed calls carry no compression; the plain `full` runs first as the TTFT reference.
    assert engine.calls[0]["selector"] == "full" and engine.calls[0]["compress"] == "none"
    by_key = {r.method: r for r in results}
    call = {parse_method(m).key: c for m, c in zip(["full", *texts[:4]], engine.calls, strict=True)}
    assert (call["infoflow@0.15"]["compress"], call["infoflow@0.15"]["keep"]) == ("none", 1.0)
    assert (call["infoflow@0.15+infokv:0.5"]["compress"], call["infoflow@0.15+infokv:0.5"]["keep"]) == ("infokv", 0.5)
    assert (call["none+snapkv:30"]["compress"], call["none+snapkv:30"]["keep"]) == ("snapkv", 30)
    assert {k: (r.options.compress, r.options.keep, r.kv_tokens, r.kv_bytes) for k, r in by_key.items()} == {
        "infoflow@0.15": ("none", 1.0, 120, 120 * 1024),
        "infoflow@0.15+infokv:0.5": ("infokv", 0.5, 70, 70 * 1024),
        "none+snapkv:30": ("snapkv", 30, 50, 50 * 1024),
        "full+snapkv:0.25": ("snapkv", 0.25, 45, 45 * 1024),
        "full": ("none", 1.0, 120, 120 * 1024),
    }
    # Timed against the uncompressed full, not against itself.
    assert by_key["full+snapkv:0.25"].ttft_ratio == pytest.approx(0.8)
    assert by_key["infoflow@0.15+infokv:0.5"].ttft_ratio == pytest.approx(0.4)
    on_file = {r.method: r for r in read_results(tmp_path / "r.jsonl").results}
    assert on_file == by_key and type(on_file["none+snapkv:30"].options.keep) is int


def test_results_without_compression_fields_still_read(tmp_path):
    # A file written before compression existed has none of the new fields.
    path = write_results_file(tmp_path / "old.jsonl", [])
    record = result("toy", "q0", "infoflow@0.15", 1, 1, 0.2, 0.15).to_record()
    del record["options"]  # written as flat fields then, without compress and keep
    record.update(selector="infoflow", ratio=0.15, reorder=False, geometry="global")
    for name in ("kv_tokens", "kv_bytes"):
        del record[name]
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    (old,) = read_results(path).results
    assert (old.method, old.options.compress, old.options.keep, old.kv_tokens, old.kv_bytes) == (
        "infoflow@0.15",
        "none",
        1.0,
        None,
        None,
    )


def sized(dataset, qid, method, f1, kv_mib, ttft=0.5):
    r = result(dataset, qid, method, f1, f1, ttft, 0.15)
    spec = parse_method(method)
    r.options, r.kv_bytes = spec.options, int(kv_mib * MiB)
    return r


def compression_results():
    # Baseline peak KV 1 and 3 MiB; infokv keeps 0.5 MiB on both, so it saves 1 - 1/4 of the total (75 %),
    # not the mean of the per-question savings (66.7 %).
    base = [sized("toy", "q0", "infoflow@0.15", 1.0, 1, 0.4), sized("toy", "q1", "infoflow@0.15", 0.5, 3, 0.6)]
    infokv = [sized("toy", f"q{i}", "infoflow@0.15+infokv:0.5", 1.0, 0.5, 0.3) for i in range(2)]
    # snapkv answered q0 and an extra q2 the baseline lacks: only q0 pairs (F1 0 vs 1, 0.5 vs 1 MiB).
    snapkv = [
        sized("toy", "q0", "infoflow@0.15+snapkv:0.25", 0.0, 0.5),
        sized("toy", "q2", "infoflow@0.15+snapkv:0.25", 1.0, 9),
    ]
    # No uncompressed cacheblend ran; the same key in another dataset must not pair with toy's baseline.
    orphan = [sized("toy", "q0", "cacheblend@0.15+snapkv:0.5", 1.0, 0.5)]
    other_set = [sized("toy2", "q0", "infoflow@0.15+infokv:0.5", 1.0, 0.5)]
    return base + infokv + snapkv + orphan + other_set


def test_compression_table_pairs_each_method_with_its_baseline():
    rows = table_rows(compression_table(compression_results()))
    assert [row[:3] for row in rows] == [
        ["toy", "infoflow@0.15", "2"],
        ["toy", "infoflow@0.15+infokv:0.5", "2"],
        ["toy", "infoflow@0.15+snapkv:0.25", "2"],
        ["toy", "cacheblend@0.15+snapkv:0.5", "1"],
        ["toy2", "infoflow@0.15+infokv:0.5", "1"],
    ]
    # F1 mean, EM, mean peak MiB, KV saved, ΔF1 mean, median TTFT.
    assert [[row[3].split()[0], *row[4:7], row[7].split()[0], row[8]] for row in rows] == [
        ["75.0", "75.0", "2.00", "—", "—", "0.500"],
        ["100.0", "100.0", "0.50", "75.0%", "+25.0", "0.300"],
        ["50.0", "50.0", "4.75", "50.0%", "-100.0", "0.500"],
        ["100.0", "100.0", "0.50", "n/a", "n/a", "0.500"],
        ["100.0", "100.0", "0.50", "n/a", "n/a", "0.500"],
    ]
    assert rows[2][7].endswith("] on 1")  # one of its two questions pairs with the baseline
    low, high = map(float, re.fullmatch(r"\+25.0 \[(\S+), (\S+)\]", rows[1][7]).groups())
    assert (low, high) == (0.0, 50.0)  # differences 0 and +0.5


def test_compression_table_without_reported_sizes():
    rows = compression_results()[:4]
    for r in rows:
        r.kv_bytes = None  # an engine from before compression
    assert [row[5:7] for row in table_rows(compression_table(rows))] == [["n/a", "—"], ["n/a", "n/a"]]


def test_write_report_adds_the_compression_section(tmp_path):
    md = write_report(write_results_file(tmp_path / "r.jsonl", compression_results()), tmp_path / "report").read_text()
    assert "## KV compression\n\n| Dataset | Method | n | F1 [95% CI] | EM | Peak KV MiB (mean) |" in md
    assert "| toy | infoflow@0.15+infokv:0.5 | 2 | 100.0 [100.0, 100.0] | 100.0 | 0.50 | 75.0% |" in md


def test_suite_parts_keep_their_order_and_add_compress_niah_and_large():
    parts = suite_parts(compress_n=7, ratio=0.1)
    assert [p.name for p in parts] == ["main", "sweep", "ablation", "compress", "niah", "large"]
    assert all(p.methods[0] == "full" for p in parts)  # every part has the fidelity reference
    assert [p.model for p in parts] == [None] * 5 + ["qwen2.5-1.5b"]
    compress = parts[3]
    assert compress.limit == 7 and compress.title.startswith("KV compression stacked on InfoFlow 10 % recompute, 7 ")
    assert compress.methods == (
        "full",
        "infoflow@0.1",
        "infoflow@0.1+snapkv:0.25",
        "infoflow@0.1+snapkv:0.5",
        "infoflow@0.1+infokv:0.25",
        "infoflow@0.1+infokv:0.5",
    )
    assert suite_parts()[0] == suite_parts(compress_n=5)[0]  # the other parts do not depend on it
    main, niah, large = (suite_parts()[i] for i in (0, 4, 5))
    # the trial selector at the smaller budget too
    assert main.methods[-1] == niah.methods[-1] == large.methods[-1] == "sinkflow+leadin@0.1"
    assert parts[0].methods.count("sinkflow+leadin@0.1") == 1  # at ratio 0.1 there is no smaller run to add


def test_compress_part_runs_alone_and_keeps_other_sections(tmp_path):
    every = suite_parts(compress_n=2)
    write_results_file(tmp_path / "main.jsonl", [result("hotpotqa", "q0", "none", 1, 1, 0.1, 0.0)])
    engine = CompressingEngine(dict(HEADER.model_info), [])
    compress = next(p for p in every if p.name == "compress")
    md = run_suite(engine, tmp_path, [compress], progress=False, report_parts=every).read_text()
    results = read_results(tmp_path / "compress.jsonl").results
    assert len(results) == 2 * 6 and len(engine.calls) == 12
    assert "## HotpotQA passage split, 100 held-out questions" in md  # main kept its section
    section = md.split("## KV compression stacked on InfoFlow 15 % recompute, 2 held-out questions")[1]
    table = section.split("on the same questions:\n\n")[1].split("\n\n")[0]
    rows = table_rows(table)
    assert "Does entropy help?" in section and "keep 0.25: InfoKV − SnapKV on 2 questions" in section
    assert [(row[1], row[6]) for row in rows] == [
        ("full", "—"),
        ("infoflow@0.15", "—"),
        ("infoflow@0.15+snapkv:0.25", "62.5%"),  # the fake keeps 20 + 25 of 20 + 100 entries
        ("infoflow@0.15+snapkv:0.5", "41.7%"),
        ("infoflow@0.15+infokv:0.25", "62.5%"),
        ("infoflow@0.15+infokv:0.5", "41.7%"),
    ]
    assert "Fidelity paired against `infoflow@0.15`" in section  # full ran: every method has the measures
    assert write_suite_report(tmp_path, every).read_text() == md


def test_a_part_refuses_to_run_on_another_model(tmp_path):
    large = next(p for p in suite_parts() if p.name == "large")
    with pytest.raises(ValueError, match="part 'large' runs on qwen2.5-1.5b, not fake-135M: run it with --model"):
        run_suite(CompressingEngine(dict(HEADER.model_info)), tmp_path, [large], progress=False)
    assert not (tmp_path / "large.jsonl").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ask", "q", "--index", "nowhere", "--keep", "0.5"], "keep=0.5 needs a compression policy"),
        (["ask", "q", "--index", "nowhere", "--compress", "snapkv"], "--compress snapkv needs --keep"),
        (["eval", "run", "--methods", "full,infoflow+zip:0.5"], "unknown compression policy 'zip'"),
    ],
)
def test_cli_rejects_bad_compression_before_loading_anything(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compress", "zip", "--keep", "0.5"], "unknown compression policy 'zip'"),
        (["--compress", "snapkv", "--keep", "1.5"], "keep=1.5 as a ratio must be in (0, 1]"),
        (["--compress", "snapkv", "--keep", "lots"], "keep 'lots' is not a number"),
    ],
)
def test_cli_ask_argument_errors(argv, message, capsys):
    # The flags are QueryOptions' fields: its one validation refuses them, in one line, before anything loads.
    assert main(["ask", "q", "--index", "nowhere", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_eval_run_with_compression_on_the_tiny_model(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("INFOFLOW_RAG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval" / "r.jsonl"
    methods = "full,infoflow@0.15,infoflow@0.15+snapkv:0.5,infoflow@0.15+infokv:64"
    # Question 27 is the shortest early HotpotQA question: it fits the tiny model's 4096 positions.
    argv = ["eval", "run", "--model", model_dir, "--start", "27", "--limit", "1", "--methods", methods]
    assert main([*argv, "--max-new-tokens", "4", "--out", str(out)]) == 0
    by_key = {r.method: r for r in read_results(out).results}
    assert list(by_key) == methods.split(",")
    base, snap, info = by_key["infoflow@0.15"], by_key["infoflow@0.15+snapkv:0.5"], by_key["infoflow@0.15+infokv:64"]
    assert (snap.options.compress, snap.options.keep, info.options.compress, info.options.keep) == (
        "snapkv",
        0.5,
        "infokv",
        64,
    )
    evicted = base.context_tokens - base.context_tokens // 2
    assert snap.kv_tokens == base.kv_tokens - evicted  # exactly the evicted half of the passage tokens is gone
    assert info.kv_tokens == base.kv_tokens - (base.context_tokens - 64)
    assert base.kv_bytes > snap.kv_bytes > info.kv_bytes > 0
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "## KV compression" in md and "| infoflow@0.15+infokv:64 | 1 |" in md


def test_ask_passes_compression_to_the_engine(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INFOFLOW_RAG_CACHE", str(tmp_path / "cache"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("\n\n".join(PASSAGES))
    index = str(tmp_path / "index")
    assert main(["ingest", str(tmp_path / "docs"), "--index", index, "--model", model_dir, "--json"]) == 0
    ask = ["ask", QUESTION, "--index", index, "--model", model_dir, "--top-k", "2", "--max-new-tokens", "3"]
    capsys.readouterr()
    assert main([*ask, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["result"]
    assert main([*ask, "--compress", "snapkv", "--keep", "10", "--json"]) == 0
    squeezed = json.loads(capsys.readouterr().out)["result"]
    assert (plain["compress"], squeezed["compress"], squeezed["keep"]) == ("none", "snapkv", 10)
    assert squeezed["kv_tokens"] == plain["kv_tokens"] - (plain["context_tokens"] - 10)
    assert main([*ask, "--compress", "infokv", "--keep", "0.5"]) == 0
    assert re.search(
        r"KV compression infokv \(keep 0.5, \d+ ms\): decoded from \d+ cache entries", capsys.readouterr().out
    )


def test_eval_run_keeps_only_long_contexts_when_asked(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INFOFLOW_RAG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "long.jsonl"
    argv = ["eval", "run", "--model", model_dir, "--start", "27", "--limit", "1", "--methods", "none"]
    assert main([*argv, "--max-new-tokens", "2", "--min-context-tokens", "100", "--out", str(out)]) == 0
    assert "1 of 1 questions have more than 100 context tokens" in capsys.readouterr().out
    assert len(read_results(out).results) == 1
    assert main([*argv, "--min-context-tokens", "1000000", "--out", str(tmp_path / "none" / "none.jsonl")]) == 2
    assert "none of the 1 questions has more than 1000000 context tokens" in capsys.readouterr().err

"""The command line as a user meets it: help for every option with its default, --version, the ask reuse line,
--json without token-id lists, an empty source refused, and a benchmark that prints as it goes."""

from __future__ import annotations

import argparse
import json
import re
import signal
import threading
from importlib.metadata import version

import pytest
from conftest import PASSAGES, QUESTION, write_corpus
from tiny import BagOfWordsEmbedder

from infoflow_rag.allocator import allocator_state
from infoflow_rag.cli import build_parser, main
from infoflow_rag.cli.options import query_options
from infoflow_rag.index.passage_index import PassageIndex


def parsers(parser: argparse.ArgumentParser, name: str = "infoflow-rag"):
    """Every (sub)command's parser, by its command line."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from parsers(child, f"{name} {sub}")


def test_every_option_has_help_and_shows_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping inside long defaults
    for name, parser in parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction | argparse._VersionAction):
                continue
            flag = "/".join(action.option_strings) or action.dest
            assert action.help, f"{name} {flag} has no help text"
            # identity, not ==: a default of 0 equals False and is still a default to show
            unset = action.default is None or action.default is False or action.default == []
            shown = "default" in action.help or unset
            assert shown or f"(default: {action.default})" in text, f"{name} {flag} hides its default"
        assert not re.search(r"``|:(class|func|meth):", text), f"{name} --help shows reST markup"


def test_shown_defaults_are_the_values_used():
    args = build_parser().parse_args(["ask", "q", "--index", "i"])
    assert (args.top_k, args.selector) == (5, None)  # query options: unset flags take QueryOptions' defaults
    ask = dict(parsers(build_parser()))["infoflow-rag ask"]
    help_text = " ".join(ask.format_help().split())
    assert "passages retrieved (at most the index size) (default: 5)" in help_text
    assert "--selector NAME Tokens to recompute:" in help_text and "(default: sinkflow)" in help_text
    # --keep's default (every token) is refused with --compress, so its help says what the command wants instead
    assert "of passage tokens kept. (required with --compress)" in help_text and "kept. (default" not in help_text
    with pytest.raises(ValueError, match="--compress snapkv needs --keep"):
        query_options(build_parser().parse_args(["ask", "q", "--index", "i", "--compress", "snapkv"]))


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"infoflow-rag {version('infoflow-rag')}\n"


def test_a_path_of_the_wrong_kind_is_one_line_not_a_traceback(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("text")
    for argv, words in [
        (["ingest", str(tmp_path / "docs"), "--index", str(tmp_path / "afile" / "sub")], "Not a directory"),
        (["eval", "report", str(tmp_path / "docs")], "Is a directory"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("infoflow-rag: error: ") and words in err and "Traceback" not in err


def test_a_truncated_gguf_is_named_not_a_struct_error(tmp_path, capsys):
    truncated = tmp_path / "model.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic and a version, then the file ends
    assert main(["check", "--model", str(truncated)]) == 2
    assert f"{truncated} is truncated or corrupt" in capsys.readouterr().err


@pytest.mark.parametrize(("command", "resumable"), [(["ingest", "src", "--index", "i"], True), (["check"], False)])
def test_ctrl_c_is_one_line_and_says_whether_a_rerun_resumes(monkeypatch, capsys, command, resumable):
    def interrupted(args):
        raise KeyboardInterrupt

    parser = build_parser()
    args = parser.parse_args(command)
    monkeypatch.setattr(args, "func", interrupted)
    monkeypatch.setattr("infoflow_rag.cli.build_parser", lambda: type("P", (), {"parse_args": lambda _, argv: args})())
    assert main(command) == 130
    err = capsys.readouterr().err
    assert err.startswith("infoflow-rag: interrupted") and ("run the same command again to resume" in err) == resumable


@pytest.mark.parametrize("kind", ["folder", "blank files", "jsonl"])
def test_an_empty_source_is_an_error_that_says_what_was_looked_for(tmp_path, capsys, kind):
    source = tmp_path / "docs"
    if kind in ("folder", "blank files"):
        source.mkdir()
        (source / "notes.pdf").write_bytes(b"%PDF")  # not a text file: not read
        looked = "looked for .txt/.md files in it and its subfolders"
        if kind == "blank files":  # read, but nothing in them to index
            (source / "a.txt").write_text("  \n\n")
            (source / "b.md").write_text("\t")
    else:
        source = tmp_path / "docs.jsonl"
        source.write_text("\n\n")
        looked = 'looked for non-blank JSON lines with a "text"'
    index = tmp_path / "index"
    assert main(["ingest", str(source), "--index", str(index)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"infoflow-rag: error: no documents with text in {source}: {looked}")
    assert "nothing was indexed" in err and ("the 2 found hold only whitespace" in err) == (kind == "blank files")
    assert not index.exists()  # refused before the model loads or the index is created


def test_ingest_summary_counts_in_the_singular_and_the_plural(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setenv("INFOFLOW_RAG_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "one.txt").write_text(PASSAGES[0])
    index = str(tmp_path / "index")
    assert main(["ingest", str(corpus), "--index", index, "--model", model_dir]) == 0
    assert capsys.readouterr().out.startswith("1 passage from 1 document: 1 new, 0 removed, 1 prefilled (")
    (corpus / "two.txt").write_text(PASSAGES[1])
    assert main(["ingest", str(corpus), "--index", index, "--model", model_dir]) == 0
    assert capsys.readouterr().out.startswith("2 passages from 2 documents: 1 new, 0 removed, 1 prefilled (")
    (corpus / "one.txt").unlink()
    (corpus / "two.txt").write_text(f"{PASSAGES[1]}\n\n{PASSAGES[2]}\n\n{PASSAGES[3]}")
    assert main(["ingest", str(corpus), "--index", index, "--model", model_dir]) == 0
    assert capsys.readouterr().out.startswith("3 passages from 1 document: 2 new, 1 removed (1 document gone), 2 ")
    (corpus / "two.txt").write_text(PASSAGES[1])
    assert main(["ingest", str(corpus), "--index", index, "--model", model_dir, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["new_passages"], summary["removed_passages"], summary["removed_documents"]) == (0, 2, 0)


def test_ask_says_where_the_kv_came_from_and_json_leaves_out_token_ids(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setenv("INFOFLOW_RAG_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path)
    index = str(tmp_path / "index")
    assert main(["ingest", str(corpus), "--index", index, "--model", model_dir, "--json"]) == 0
    capsys.readouterr()
    ask = ["ask", QUESTION, "--index", index, "--model", model_dir, "--top-k", "2", "--max-new-tokens", "3"]

    assert main(ask) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("reuse:")]
    assert re.fullmatch(
        r"reuse: 2 passages from the store \(\d+ tokens\), 0 computed now \(0 tokens prefilled and stored\); "
        r"\d+ tokens recomputed",
        line,
    )

    assert main([*ask, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["result"]
    assert not {"selected", "passage_tokens", "answer_ids"} & set(result) and result["recomputed_tokens"] > 0
    assert main([*ask, "--json", "--token-ids"]) == 0
    result = json.loads(capsys.readouterr().out)["result"]
    assert {"selected", "passage_tokens", "answer_ids"} <= set(result)


def test_passages_are_prefilled_behind_the_neutral_lead_in_unless_told_none_and_the_store_keeps_both_kinds(
    tmp_path, model_dir, capsys, monkeypatch
):
    monkeypatch.setenv("INFOFLOW_RAG_CACHE", str(tmp_path / "cache"))
    corpus, index = write_corpus(tmp_path), str(tmp_path / "index")
    assert main(["ingest", str(corpus), "--index", index, "--model", model_dir]) == 0
    capsys.readouterr()
    ask = ["ask", QUESTION, "--index", index, "--model", model_dir, "--top-k", "2", "--max-new-tokens", "3"]

    def reuse(*flags: str) -> str:
        assert main([*ask, *flags]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("reuse:"))

    assert reuse("--lead-in", "neutral").startswith("reuse: 2 passages from the store")  # what ingest wrote
    # Right behind the head the engine needs other caches: the lead-in ones are not its own.
    plain = reuse("--lead-in", "none")
    assert plain.startswith("reuse: 0 passages from the store") and "2 computed now" in plain
    assert reuse("--lead-in", "none").startswith("reuse: 2 passages from the store")  # both kinds are kept
    assert reuse().startswith("reuse: 2 passages from the store")


@pytest.mark.parametrize("command", [["bench", "ttft"], ["eval", "run"], ["eval", "suite"]])
def test_commands_comparing_methods_take_the_kind_of_cache_from_each_method_not_a_flag(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--lead-in", "neutral"])
    assert "unrecognized arguments: --lead-in neutral" in capsys.readouterr().err
    assert build_parser().parse_args(["ask", "q", "--index", "i", "--lead-in", "neutral"]).lead_in == "neutral"


def test_bench_ttft_prints_each_context_when_it_is_done(model_dir, capsys):
    bench = ["bench", "ttft", "--model", model_dir, "--context", "800,2000", "--methods", "infoflow,none"]
    assert main([*bench, "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("| context |") for line in lines) == 1  # one table, continued per context
    contexts = [int(line.split("|")[1]) for line in lines[2:-1]]
    assert len(contexts) == 6 and contexts[0] == contexts[2] < contexts[3] == contexts[5]  # prefill + 2 methods
    assert lines[-1].startswith("machine: ") and "during the" in lines[-1]  # how busy the machine was, last
    assert f"malloc: {allocator_state()};" in lines[-1] and allocator_state() != "glibc defaults"  # set by the CLI

    assert main([*bench, "--repeats", "1", "--json"]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("context ")]  # beside load bars
    assert progress == ["context 800: done (1/2)", "context 2000: done (2/2)"]
    report = json.loads(captured.out)
    assert len(report["rows"]) == 6 and report["complete"] is True
    assert report["machine"]["cpus"] >= 1 and report["machine"]["wall_s"] > 0
    assert report["machine"]["allocator"] == allocator_state()
    assert all(len(row["times_s"]) == 1 and row["times_s"][0] > 0 for row in report["rows"])  # --repeats 1
    for row in report["rows"]:  # each repeat's own speedup: full prefill's time in that repeat over the method's
        assert row["repeat_speedups"] == [row["reference_s"][0] / row["times_s"][0]]


def _ctrl_c() -> None:
    raise KeyboardInterrupt


def _terminated() -> None:
    # What SIGTERM (from `timeout`, a CI cancel) runs: the handler main installed, called directly, so a main that
    # installs none fails the test (SIG_DFL is not callable) instead of killing the test run.
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler), "main installed no SIGTERM handler"
    handler(signal.SIGTERM, None)


@pytest.mark.parametrize(("cut", "signal_number"), [(_ctrl_c, signal.SIGINT), (_terminated, signal.SIGTERM)])
def test_bench_ttft_json_keeps_the_finished_contexts_of_a_run_cut_short(
    model_dir, capsys, monkeypatch, cut, signal_number
):
    import infoflow_rag.bench

    real = infoflow_rag.bench.bench_ttft

    def interrupted_at_2000(engine, contexts, **kw):
        if contexts == [2000]:
            cut()
        return real(engine, contexts, **kw)

    monkeypatch.setattr(infoflow_rag.bench, "bench_ttft", interrupted_at_2000)
    bench = ["bench", "ttft", "--model", model_dir, "--context", "800,2000", "--methods", "none", "--repeats", "1"]
    try:
        code = main([*bench, "--json"])  # Ctrl-C: a line saying so; SIGTERM: unwound as SystemExit
    except SystemExit as exit_:
        code = exit_.code
    assert code == 128 + signal_number  # what a shell reports for a process a signal ended
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main put the default back
    report = json.loads(capsys.readouterr().out)
    assert report["complete"] is False and len(report["rows"]) == 2  # context 800: prefill + none
    assert report["machine"]["wall_s"] > 0  # the watch closed with the run cut short
    assert {row["context_tokens"] for row in report["rows"]} == {report["rows"][0]["context_tokens"]}


def test_bench_prefill_says_how_busy_the_machine_was_in_both_forms(model_dir, capsys):
    bench = ["bench", "prefill", "--model", model_dir, "--tokens", "800", "--repeats", "1"]
    assert main(bench) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "without signals" in lines[-3] and lines[-1].startswith("machine: ")
    assert "the lead-in adds" in lines[-2]  # the default engine prefills behind the lead-in: set beside none
    assert main([*bench, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == 1 and report["machine"]["torch_threads"] >= 1
    assert report["no_lead_in_s"] > 0 and report["lead_in_overhead"] is not None
    assert main([*bench, "--lead-in", "none"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "without signals" in lines[-2] and not any("lead-in" in line for line in lines)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "infoflow,bogus"], "unknown selector 'bogus'"),
        (["--methods", "infoflow+tail"], "unknown compression policy 'tail'; known policies: infokv"),
        (["--methods", "full+leadin"], "full prefill reads no cached passage"),
        (["--methods", "full,full"], "methods repeat ['full']; give each configuration once"),
        (["--methods", "infoflow,infoflow@0.15"], "methods repeat ['infoflow@0.15']"),  # --ratio's default: the same
        (["--ratio", "1.5"], "ratio must be in (0, 1], got 1.5"),
    ],
)
def test_bench_ttft_names_a_bad_flag_before_loading_the_model(flags, message, capsys, monkeypatch):
    import infoflow_rag.cli.evaluation

    def no_model(name):
        raise AssertionError("the model loaded before the flags were checked")

    monkeypatch.setattr(infoflow_rag.cli.evaluation, "load_engine", no_model)
    try:
        code = main(["bench", "ttft", "--context", "800", *flags])
    except SystemExit as exit_:  # argparse's own errors exit; ours return
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "machine:" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--index", "i", "--port", "99999"], "--port: expected a TCP port in 1..65535, got '99999'"),
        (["serve", "--index", "i", "--port", "0"], "--port: expected a TCP port in 1..65535, got '0'"),
        (["serve", "--index", "i", "--timeout", "-1"], "--timeout: expected a number > 0, got '-1'"),
        (["eval", "run", "--start", "-1"], "--start: expected an integer >= 0, got '-1'"),
        (["eval", "run", "--min-context-tokens", "-1"], "--min-context-tokens: expected an integer >= 0"),
        (["eval", "suite", "--ratio", "2"], "--ratio: ratio must be in (0, 1], got 2.0"),
        (["eval", "suite", "--ratio", "half"], "--ratio: expected a share in (0, 1] such as 0.15, got 'half'"),
        (["ingest", "src", "--index", "i", "--window", "4"], "--window: expected an integer >= 8, got '4'"),
        (["ask", "q", "--index", "i", "--store", "s3://bucket"], "--store: unknown KV store spec 's3://bucket'"),
        (["serve", "--index", "i", "--store", "memory:lots"], "--store: cannot read size 'lots'; write e.g. '512MB'"),
        (["ingest", "src", "--index", "i", "--store", "kv"], "--store: unknown KV store spec 'kv'; accepted forms"),
        (["ingest", "src", "--index", "i", "--index-param", "M=big"], "--index-param: expected KEY=INTEGER >= 1"),
        (["index", "repair", "i", "--index-param", "M=0"], "--index-param: expected KEY=INTEGER >= 1 with KEY one of"),
        (
            ["ingest", "src", "--index", "i", "--index-param", "store=1"],
            "with KEY one of M, ef_construction, ef_search",
        ),
    ],
)
def test_a_bad_flag_value_is_refused_by_the_parser_naming_flag_value_and_range(argv, message, capsys):
    # Counts (>= 1) are checked for every command in test_integrity.py; these are the other kinds.
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ask", "  ", "--index", "i"], "the question is empty; pass its text"),
        (["eval", "run", "--methods", "full,infoflow,infoflow@0.15"], "methods repeat ['infoflow@0.15']"),
        (["eval", "run", "--dataset", "niah", "--lengths", "1000,1000"], "must not repeat"),
        (["eval", "run", "--methods", "epic{1-2}"], "layers=[1, 2] (no such option); its options are: k"),
    ],
)
def test_flags_wrong_together_are_refused_before_the_model_loads(argv, message, capsys, monkeypatch):
    import infoflow_rag.cli.evaluation
    import infoflow_rag.pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the flags were checked")

    monkeypatch.setattr(infoflow_rag.cli.evaluation, "load_engine", no_model)
    monkeypatch.setattr(infoflow_rag.pipeline.Pipeline, "open", no_model)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_index_options_are_checked_before_anything_loads_or_is_made(tmp_path, capsys, monkeypatch):
    import infoflow_rag.pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the index options were checked")

    monkeypatch.setattr(infoflow_rag.pipeline.Engine, "load", no_model)
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "one.txt").write_text(PASSAGES[0])
    new = tmp_path / "new"
    assert main(["ingest", str(corpus), "--index", str(new), "--index-kind", "hnsw", "--index-param", "nlist=5"]) == 2
    assert "unknown parameters ['nlist'] for a 'hnsw' index; accepted: M, ef_construction, ef_search" in (
        capsys.readouterr().err
    )
    assert not new.exists()  # refused before the directory was made

    flat, hnsw = tmp_path / "flat", tmp_path / "hnsw"
    PassageIndex.create(flat, BagOfWordsEmbedder()).close()
    PassageIndex.create(hnsw, BagOfWordsEmbedder(), kind="hnsw").close()
    for index, flags, message in [
        (flat, ["--index-param", "M=16"], "unknown parameters ['M'] for a 'flat' index; accepted: none"),
        (flat, ["--index-kind", "hnsw"], f"{flat} is a 'flat' index with no parameters; the index kind and"),
        (flat, ["--index-kind", "hnsw"], f"To change them: infoflow-rag index repair {flat} --index-kind hnsw\n"),
        (hnsw, ["--index-param", "M=16"], f"{hnsw} is a 'hnsw' index with {{'M': 32, 'ef_construction': 200, 'ef"),
        (hnsw, ["--index-param", "M=16"], f"index repair {hnsw} --index-kind hnsw --index-param M=16\n"),
    ]:
        assert main(["ingest", str(corpus), "--index", str(index), *flags]) == 2
        assert message in capsys.readouterr().err


def test_index_repair_builds_the_kind_and_parameters_asked_for(tmp_path, monkeypatch):
    import infoflow_rag.index.passage_index

    asked = {}

    def repair(directory, kind=None, show_progress=False, **params):
        asked.update(directory=directory, kind=kind, **params)
        return PassageIndex.create(tmp_path / "rebuilt", BagOfWordsEmbedder(), kind=kind, **params)

    monkeypatch.setattr(infoflow_rag.index.passage_index.PassageIndex, "repair", repair)
    assert main(["index", "repair", "idx", "--index-kind", "hnsw", "--index-param", "M=16", "--json"]) == 0
    assert asked == {"directory": "idx", "kind": "hnsw", "M": 16}


def test_sigterm_unwinds_only_where_main_may_and_should_handle_it(monkeypatch):
    import infoflow_rag.cli.parser as parser_module

    seen = []  # the SIGTERM handler while each command runs

    def command(args):
        seen.append(signal.getsignal(signal.SIGTERM))
        return 0

    monkeypatch.setattr(parser_module, "cmd_index_repair", command)
    monkeypatch.setattr(parser_module, "cmd_serve", command)
    assert main(["index", "repair", "i"]) == 0  # main thread, SIGTERM at its default: unwinds
    assert main(["serve", "--index", "i"]) == 0  # the server stops on SIGTERM itself
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert main(["index", "repair", "i"]) == 0  # the parent said to ignore it
    finally:
        signal.signal(signal.SIGTERM, before)
    in_thread = []
    thread = threading.Thread(target=lambda: in_thread.append(main(["index", "repair", "i"])))
    thread.start()
    thread.join()
    assert in_thread == [0]  # no "signal only works in main thread"
    assert callable(seen[0]) and seen[1:] == [signal.SIG_DFL, signal.SIG_IGN, signal.SIG_DFL]


def test_a_missing_index_or_source_says_how_to_make_one(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["index", "repair", str(missing)]) == 2
    assert f"no index directory {missing}; build one with: infoflow-rag ingest SOURCE --index {missing}" in (
        capsys.readouterr().err
    )
    assert main(["ingest", str(missing), "--index", str(tmp_path / "index")]) == 2
    assert "pass a folder of .txt/.md files, one such file, or a .jsonl file" in capsys.readouterr().err


def test_bench_ttft_refuses_a_context_too_small_for_one_passage(model_dir, capsys):
    assert main(["bench", "ttft", "--model", model_dir, "--context", "64", "--methods", "none", "--repeats", "1"]) == 2
    assert "no passage fits in 64 tokens" in capsys.readouterr().err


def test_a_json_flag_that_does_not_parse_says_what_is_wrong_and_where(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["ask", "q", "--index", "i", "--json-schema", "{bad"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "--json-schema: not valid JSON (Expecting property name enclosed in double quotes at character 1)" in err
    assert build_parser().parse_args(
        ["ask", "q", "--index", "i", "--json-schema", '{"type": "object"}']
    ).json_schema == {"type": "object"}

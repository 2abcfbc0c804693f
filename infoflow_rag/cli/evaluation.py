"""Commands that measure: the benchmarks and the evaluation runs and reports."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..machine import MachineWatch
from .options import load_engine


def cmd_bench_store(args: argparse.Namespace) -> int:
    import tempfile

    from ..bench import bench_store

    engine = load_engine(args)
    with tempfile.TemporaryDirectory(dir=args.dir) as directory, MachineWatch() as watch:
        rows = bench_store(engine, directory, n_passages=args.passages)
    if args.json:
        report = {"model": args.model, "machine": watch.report.to_dict(), "rows": [r.to_dict() for r in rows]}
        print(json.dumps(report, indent=2))
        return 0
    print("| storage dtype | bytes/token | warm load GB/s | ms/passage | max first-token logit diff | same answer |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r.dtype} | {r.bytes_per_token:.0f} | {r.load_gb_s:.2f} | {r.load_ms_per_passage:.2f} | "
            f"{r.max_logit_diff:.2e} | {'yes' if r.same_answer else 'no'} |"
        )
    print(watch.report.line())
    return 0


def cmd_bench_prefill(args: argparse.Namespace) -> int:
    from ..bench import bench_prefill

    if args.tokens < 64:
        raise ValueError(f"--tokens must be >= 64, got {args.tokens}")
    engine = load_engine(args)
    with MachineWatch() as watch:
        row = bench_prefill(engine, n_tokens=args.tokens, repeats=args.repeats)
    if args.json:
        print(json.dumps({"model": args.model, **row.to_dict(), "machine": watch.report.to_dict()}, indent=2))
        return 0
    print(
        f"{row.passages} passages, {row.tokens} tokens: prefill {row.no_signals_s:.2f} s without signals, "
        f"{row.signals_s:.2f} s recording entropy + layer evolution (+{100 * row.overhead:.0f} %), "
        f"median of {row.runs}"
    )
    if row.no_lead_in_s is not None:
        print(
            f"right behind the prompt head (--lead-in none), with signals: {row.no_lead_in_s:.2f} s; "
            f"the lead-in adds {100 * row.lead_in_overhead:+.0f} %"
        )
    print(watch.report.line())
    return 0


def cmd_bench_ttft(args: argparse.Namespace) -> int:
    from ..bench import bench_methods, bench_ttft, check_contexts, format_table

    contexts = _token_counts(args.context, "--context", minimum=64)
    methods = tuple(args.methods.split(","))
    bench_methods(methods, args.ratio)  # a typo, a bad ratio or a repeat fails before the model loads
    engine = load_engine(args)
    check_contexts(engine, contexts)  # every one before the first runs: a run is minutes per context
    rows, finished = [], 0
    watch = MachineWatch()
    # One context at a time, each printed when done: a long run shows its figures as it goes, and a run cut
    # short (an error, Ctrl-C) still prints the JSON of the contexts it finished, marked incomplete. How busy
    # the machine was comes last, in both forms: the figures are only as good as the machine was quiet.
    try:
        with watch:
            for n_tokens in contexts:
                done = bench_ttft(engine, [n_tokens], ratio=args.ratio, methods=methods, repeats=args.repeats)
                rows, finished = rows + done, finished + 1
                if args.json:
                    print(f"context {n_tokens}: done ({finished}/{len(contexts)})", file=sys.stderr, flush=True)
                else:
                    print(format_table(done, header=finished == 1), flush=True)
    finally:
        if args.json:
            report = {
                "model": args.model,
                "ratio": args.ratio,
                "complete": finished == len(contexts),
                "machine": watch.report.to_dict(),
                "rows": [r.to_dict() for r in rows],
            }
            print(json.dumps(report, indent=2), flush=True)
        elif finished:  # after an error before any figure, the machine line would only bury the message
            print(watch.report.line(), flush=True)
    return 0


def _token_counts(text: str, flag: str, minimum: int = 1) -> list[int]:
    counts = [int(c) for c in text.split(",") if c.strip().isdigit()]
    if len(counts) != len(text.split(",")) or min(counts, default=0) < minimum:
        raise ValueError(f"{flag} takes comma-separated token counts >= {minimum}, e.g. 1024,2048,4096; got {text!r}")
    return counts


def _depths(text: str) -> list[float]:
    try:
        depths = [float(d) for d in text.split(",")]
    except ValueError:
        depths = []
    if not depths or not all(0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths takes comma-separated fractions in [0, 1], e.g. 0,0.25,0.5,0.75,1; got {text!r}")
    return depths


def cmd_eval_run(args: argparse.Namespace) -> int:
    from ..eval.datasets import check_grid, load_hotpotqa, load_niah, load_squad, tokenizer_codec
    from ..eval.methods import check_methods, parse_method
    from ..eval.report import check_report_directory, write_report
    from ..eval.runner import run_eval

    # Everything the flags say is checked before the model loads, so a typo fails at once.
    if Path(args.out).suffix != ".jsonl":  # the report is written beside it as results.md and PNGs: never over it
        raise ValueError(f"--out {args.out}: a results file ends in .jsonl, e.g. --out runs/eval/results.jsonl")
    check_report_directory(args.out, Path(args.out).parent)
    methods = [parse_method(m) for m in args.methods.split(",")]
    check_methods(methods)
    if args.dataset == "niah":
        lengths, depths = _token_counts(args.lengths, "--lengths"), _depths(args.depths)
        check_grid(lengths, depths)
    engine = load_engine(args)
    window = engine.max_positions
    if args.dataset == "niah" and (too_long := [n for n in lengths if n + args.max_new_tokens > window]):
        # refused now, not after the shorter haystacks' answers: the needle grid's sizes are known before any prefill
        raise ValueError(
            f"--lengths {','.join(map(str, too_long))}: a haystack of that many tokens and {args.max_new_tokens} "
            f"answer tokens do not fit the {window}-token context window of {args.model}; use lengths below "
            f"{window - args.max_new_tokens}"
        )
    if args.dataset == "hotpotqa":
        examples = load_hotpotqa("passage", start=args.start, limit=args.limit)
    elif args.dataset == "hotpotqa-fixed":  # windows cut with the model's own tokenizer
        examples = load_hotpotqa(
            "fixed",
            start=args.start,
            limit=args.limit,
            chunk_tokens=args.chunk_tokens,
            **tokenizer_codec(engine.tokenizer),
        )
    elif args.dataset == "niah":
        examples = load_niah(
            lengths,
            depths,
            passage_tokens=args.chunk_tokens,
            haystack=args.haystack,
            **tokenizer_codec(engine.tokenizer),
        )
    else:
        examples = load_squad(start=args.start, limit=args.limit)
    if args.min_context_tokens:
        examples = _longer_than(engine, examples, args.min_context_tokens)
    run_eval(engine, examples, methods, args.out, max_new_tokens=args.max_new_tokens)
    print(f"report: {write_report(args.out, Path(args.out).parent)}")
    return 0


def _longer_than(engine, examples: list, min_tokens: int) -> list:
    """The examples whose passages hold more than ``min_tokens`` tokens: a subset fixed before any answer is seen."""
    kept = [ex for ex in examples if sum(len(engine.passage_ids(p)) for p in ex.passages) > min_tokens]
    if not kept:
        raise ValueError(
            f"none of the {len(examples)} questions has more than {min_tokens} context tokens; "
            "lower --min-context-tokens or raise --limit"
        )
    print(f"{len(kept)} of {len(examples)} questions have more than {min_tokens} context tokens")
    return kept


def cmd_eval_suite(args: argparse.Namespace) -> int:
    from ..eval.suite import run_suite, suite_parts

    every = suite_parts(args.main_n, args.sweep_n, args.ablation_n, args.ratio, args.compress_n, args.large_n)
    by_name = {p.name: p for p in every}
    if unknown := [n for n in args.parts.split(",") if n not in by_name]:
        raise ValueError(f"unknown suite parts {unknown}; choose from {', '.join(by_name)}")
    parts = [by_name[n] for n in args.parts.split(",")]  # run in the order given
    # The report keeps the sections of parts already on file, so running one part alone drops none.
    path = run_suite(load_engine(args), args.out, parts, start=args.start, ratio=args.ratio, report_parts=every)
    print(f"wrote {path}")
    return 0


def cmd_eval_report(args: argparse.Namespace) -> int:
    from ..eval.report import check_report_directory, write_report
    from ..eval.suite import suite_parts, write_suite_report

    if args.results:
        _refuse_suite_flags(args)
        for path in args.results:  # every one before the first report is written
            check_report_directory(path, Path(path).parent)
        for path in args.results:
            print(f"report: {write_report(path, Path(path).parent)}")
        return 0
    parts = suite_parts(args.main_n, args.sweep_n, args.ablation_n, args.ratio, args.compress_n, args.large_n)
    print(f"wrote {write_suite_report(args.out, parts, args.ratio)}")
    return 0


def _refuse_suite_flags(args: argparse.Namespace) -> None:
    """A flag of the suite's report set beside results files would be ignored: refused, named."""
    if given := [flag for flag, (dest, unset) in args.suite_flags.items() if getattr(args, dest) != unset]:
        raise ValueError(
            f"{', '.join(given)} set the suite's report, not a results file's (written beside the file): "
            "drop them, or the results files to rewrite the suite's"
        )

"""``infoflow-rag``: a thin command line over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .engine.compression import POLICIES, validate_keep
from .engine.selection import SELECTORS
from .errors import InfoFlowError
from .eval.methods import parse_keep
from .models import DEFAULT_MODEL, REGISTRY


def _engine(name: str):
    from .engine import Engine

    return Engine(name)


def cmd_bench_store(args: argparse.Namespace) -> int:
    import tempfile

    from .bench import bench_store

    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        rows = bench_store(_engine(args.model), directory, n_passages=args.passages)
    if args.json:
        print(json.dumps({"model": args.model, "rows": [r.to_dict() for r in rows]}, indent=2))
        return 0
    print("| storage dtype | bytes/token | warm load GB/s | ms/passage | max first-token logit diff | same answer |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r.dtype} | {r.bytes_per_token:.0f} | {r.load_gb_s:.2f} | {r.load_ms_per_passage:.2f} | "
            f"{r.max_logit_diff:.2e} | {'yes' if r.same_answer else 'no'} |"
        )
    return 0


def cmd_bench_prefill(args: argparse.Namespace) -> int:
    from .bench import bench_prefill

    if args.tokens < 64:
        raise ValueError(f"--tokens must be >= 64, got {args.tokens}")
    row = bench_prefill(_engine(args.model), n_tokens=args.tokens, repeats=args.repeats)
    if args.json:
        print(json.dumps({"model": args.model, **row.to_dict()}, indent=2))
        return 0
    print(
        f"{row.passages} passages, {row.tokens} tokens: prefill {row.plain_s:.2f} s without signals, "
        f"{row.signals_s:.2f} s recording entropy + layer evolution (+{100 * row.overhead:.0f} %), "
        f"median of {row.runs}"
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .engine.check import run_check

    report = run_check(_engine(args.model), thorough=True)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(
            f"{report.model}: key re-rotation error {report.key_rotation_error:.2e} (shift {report.rotation_delta}), "
            f"100 % recompute logit diff {report.logit_diff:.2e} -> {'ok' if report.ok else 'FAILED'}"
        )
    return 0 if report.ok else 1


def cmd_bench_ttft(args: argparse.Namespace) -> int:
    from .bench import bench_ttft, format_table

    contexts = _token_counts(args.context, "--context", minimum=64)
    methods = tuple(args.methods.split(","))
    rows = bench_ttft(_engine(args.model), contexts, ratio=args.ratio, methods=methods, repeats=args.repeats)
    if args.json:
        print(json.dumps({"model": args.model, "ratio": args.ratio, "rows": [r.to_dict() for r in rows]}, indent=2))
    else:
        print(format_table(rows))
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
    from .eval.datasets import load_hotpotqa, load_niah, load_squad, tokenizer_codec
    from .eval.methods import parse_method
    from .eval.report import write_report
    from .eval.runner import run_eval

    methods = [parse_method(m) for m in args.methods.split(",")]
    if args.dataset == "niah":  # parsed before the model loads, so a typo fails at once
        lengths, depths = _token_counts(args.lengths, "--lengths"), _depths(args.depths)
    engine = _engine(args.model)
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
        examples = load_niah(lengths, depths, passage_tokens=args.chunk_tokens, **tokenizer_codec(engine.tokenizer))
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
    from .eval.suite import run_suite, suite_parts

    every = suite_parts(args.main_n, args.sweep_n, args.ablation_n, args.ratio, args.compress_n, args.large_n)
    by_name = {p.name: p for p in every}
    if unknown := [n for n in args.parts.split(",") if n not in by_name]:
        raise ValueError(f"unknown suite parts {unknown}; choose from {', '.join(by_name)}")
    parts = [by_name[n] for n in args.parts.split(",")]  # run in the order given
    # The report keeps the sections of parts already on file, so running one part alone drops none.
    path = run_suite(_engine(args.model), args.out, parts, start=args.start, ratio=args.ratio, report_parts=every)
    print(f"wrote {path}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from .ingest import ingest
    from .pipeline import Pipeline

    params = {}
    for item in args.index_param:
        key, _, value = item.partition("=")
        if not value.isdigit():
            raise ValueError(f"--index-param takes KEY=INTEGER (e.g. M=32, nlist=256), got {item!r}")
        params[key] = int(value)
    with Pipeline.open(
        args.index,
        model=args.model,
        store=args.store,
        create=True,
        kv_dtype=args.kv_dtype,
        kind=args.index_kind,
        **params,
    ) as pipeline:
        summary = ingest(
            pipeline,
            args.source,
            split=args.split,
            window=args.window,
            batch_size=args.batch_size,
            progress=not args.json,
            strict_utf8=args.strict_utf8,
            follow_symlinks=args.follow_symlinks,
        )
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(
            f"{summary.passages} passages from {summary.documents} documents: {summary.new_passages} new, "
            f"{summary.kv_computed} prefilled ({summary.tokens} tokens, {summary.kv_bytes / 2**20:.1f} MiB KV) "
            f"in {summary.seconds:.1f} s = {summary.passages_per_s:.1f} passages/s, "
            f"{summary.tokens_per_s:.0f} tokens/s"
        )
    return 0


def cmd_index_repair(args: argparse.Namespace) -> int:
    from .index.passage_index import PassageIndex

    with PassageIndex.repair(args.index, kind=args.index_kind, show_progress=not args.json) as index:
        n = len(index)
    if args.json:
        print(json.dumps({"index": args.index, "passages": n}))
    else:
        print(f"{args.index}: rebuilt the vectors of {n} passages from their records")
    return 0


def _positive_int(text: str) -> int:
    """A count that must be at least 1 (``--top-k``, ``--batch-size``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _keep(text: str) -> float | int:
    """``--keep``: a share of context tokens such as 0.5, or a token count such as 256."""
    try:
        return validate_keep(parse_keep(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _compression(compress: str, keep: float | int | None) -> dict:
    """The answer options of ``--compress`` and ``--keep``; none without compression, so answers stay as before."""
    if compress == "none":
        if keep is not None:
            raise ValueError(f"--keep {keep} needs a compression policy, e.g. --compress snapkv")
        return {}
    if keep is None:
        raise ValueError(f"--compress {compress} needs --keep: a share such as 0.5 or a token count such as 256")
    return {"compress": compress, "keep": keep}


def cmd_ask(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline

    compression = _compression(args.compress, args.keep)  # before the model loads
    with Pipeline.open(args.index, model=args.model, store=args.store) as pipeline:
        options = dict(
            top_k=args.top_k,
            selector=args.selector,
            ratio=args.ratio,
            reorder=args.reorder,
            max_new_tokens=args.max_new_tokens,
            **compression,
        )
        if args.json:
            print(json.dumps(pipeline.ask(args.question, **options).to_dict(), indent=2))
            return 0
        stream = pipeline.stream(args.question, **options)
        for delta in stream:
            print(delta, end="", flush=True)
        answer = stream.answer
        t = answer.result.timings
        print(
            f"\n\nTTFT {t.ttft:.3f} s (retrieve {t.retrieve * 1000:.0f} ms, KV load {t.load_kv * 1000:.0f} ms, "
            f"place {t.place * 1000:.0f} ms, score {t.score * 1000:.0f} ms, recompute {t.recompute:.3f} s); "
            f"recomputed {100 * answer.result.recompute_fraction:.1f} % of {answer.result.context_tokens} tokens"
        )
        if compression:
            r = answer.result
            print(
                f"KV compression {r.compress} (keep {r.keep}, {t.compress * 1000:.0f} ms): decoded from "
                f"{r.kv_tokens} cache entries, peak {r.kv_bytes / 2**20:.2f} MiB"
            )
        for i, hit in enumerate(answer.sources):
            print(f"[{i}] {hit.score:.3f} {hit.source or ''} {hit.text[:90]}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline
    from .serve import ServerSettings, serve

    compression = _compression(args.compress, args.keep)  # before the model loads
    with Pipeline.open(args.index, model=args.model, store=args.store) as pipeline:
        settings = ServerSettings(
            model_name=args.served_model_name or pipeline.engine.loaded.name,
            selector=args.selector,
            ratio=args.ratio,
            reorder=args.reorder,
            max_tokens=args.max_tokens,
            max_queue=args.max_queue,
            timeout=args.timeout,
            **compression,
        )
        print(f"serving {settings.model_name} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
        serve(pipeline, settings, host=args.host, port=args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.items < 1 or not 1 <= args.questions <= args.items:
        raise ValueError(f"need --items >= 1 and 1 <= --questions <= --items, got {args.items} and {args.questions}")
    run_demo(
        args.out,
        model=args.model,
        n_items=args.items,
        n_questions=args.questions,
        color=sys.stdout.isatty() and not args.no_color,
    )
    return 0


def cmd_eval_report(args: argparse.Namespace) -> int:
    from .eval.suite import suite_parts, write_suite_report

    parts = suite_parts(args.main_n, args.sweep_n, args.ablation_n, args.ratio, args.compress_n, args.large_n)
    print(f"wrote {write_suite_report(args.out, parts, args.ratio)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infoflow-rag", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    models = ", ".join(sorted(REGISTRY))

    p = sub.add_parser("check", help="correctness gate: key re-rotation and 100 %% recompute vs full prefill")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registered name ({models}), HF dir or .gguf file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("ttft", help="time-to-first-token of every method vs full prefill, side by side")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--context", default="1024,2048,4096", help="comma-separated context sizes in tokens")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--methods", default="full,infoflow,infoflow+reorder,cacheblend,epic,random,none")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_ttft)
    p = bench.add_parser("prefill", help="passage prefill time with and without InfoKV's per-token signals")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=4096, help="passage tokens prefilled per run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs each (median reported)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_prefill)
    p = bench.add_parser("store", help="disk KV store per storage dtype: bytes/token, warm load speed, answer effect")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--passages", type=int, default=40)
    p.add_argument("--dir", default=None, help="where to write the temporary stores (default: system temp)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_store)

    p = sub.add_parser("ingest", help="index a folder of .txt/.md files or a .jsonl file, prefill and store KV")
    p.add_argument("source")
    p.add_argument("--index", required=True, help="index directory (created if missing)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--store",
        default=None,
        help="KV store: disk:DIR, memory[:SIZE] or redis://... (default: disk store inside the index directory)",
    )
    p.add_argument("--split", choices=["paragraph", "tokens"], default="paragraph")
    p.add_argument("--window", type=int, default=256, help="tokens per passage for --split tokens")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="passages committed together")
    p.add_argument("--strict-utf8", action="store_true", help="stop at a file that is not UTF-8 (default: skip it)")
    p.add_argument("--follow-symlinks", action="store_true", help="read files linked from outside the source folder")
    p.add_argument(
        "--kv-dtype",
        choices=["float32", "float16", "bfloat16", "int8"],
        default="float32",
        help="how new KV is stored (size and answer effect per dtype: README, `infoflow-rag bench store`)",
    )
    p.add_argument(
        "--index-kind",
        choices=["flat", "hnsw", "ivf"],
        default="flat",
        help="FAISS index for a new index directory: exact inner product, or approximate for large corpora",
    )
    p.add_argument(
        "--index-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hnsw: M, ef_construction, ef_search; ivf: nlist, nprobe (repeatable)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("ask", help="retrieve, reuse KV, selectively recompute, answer")
    p.add_argument("question")
    p.add_argument("--index", required=True)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--store", default=None)
    p.add_argument("--top-k", type=_positive_int, default=5, help="passages retrieved (at most the index size)")
    p.add_argument("--selector", default="infoflow", help="one of " + ", ".join(SELECTORS))
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--reorder", action="store_true", help="densest passage last (for independent passages)")
    p.add_argument("--compress", choices=list(POLICIES), default="none", help="KV compression before decoding")
    p.add_argument(
        "--keep", type=_keep, default=None, help="with --compress: share of context tokens kept (0.5) or count (256)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat and text completions) with passage KV reuse")
    p.add_argument("--index", required=True, help="index directory built by `infoflow-rag ingest` (read only)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--store", default=None, help="KV store as for ingest, e.g. redis://host:6379/0 to share it")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model name)")
    p.add_argument("--selector", default="infoflow", help="default selector; requests may send their own")
    p.add_argument("--ratio", type=float, default=0.15, help="default recompute ratio")
    p.add_argument("--reorder", action="store_true", help="reorder passages by default")
    p.add_argument("--compress", choices=list(POLICIES), default="none", help="default KV compression")
    p.add_argument("--keep", type=_keep, default=None, help="with --compress: default share or count kept")
    p.add_argument("--max-tokens", type=int, default=256, help="answer length when a request sets none")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting for the model; more get 429")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take, queueing included")
    p.set_defaults(func=cmd_serve)

    maintain = sub.add_parser("index", help="maintain an index directory").add_subparsers(
        dest="index_command", required=True
    )
    p = maintain.add_parser(
        "repair", help="rebuild vectors.faiss and index.json from passages.sqlite (lost, corrupt or foreign files)"
    )
    p.add_argument("index", help="index directory")
    p.add_argument(
        "--index-kind", choices=["flat", "hnsw", "ivf"], default=None, help="default: as in index.json, else flat"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_index_repair)

    p = sub.add_parser("demo", help="end-to-end demo on HotpotQA paragraphs with the embedded model")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--items", type=int, default=20, help="HotpotQA questions whose paragraphs form the corpus")
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--no-color", action="store_true")
    p.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="quality (F1/EM) and TTFT of every method").add_subparsers(
        dest="eval", required=True
    )
    p = ev.add_parser("run", help="one dataset slice x a list of methods, resumable, with a report")
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--dataset", choices=["hotpotqa", "hotpotqa-fixed", "squad", "niah"], default="hotpotqa")
    p.add_argument(
        "--chunk-tokens", type=int, default=128, help="passage size in tokens of the hotpotqa-fixed and niah sets"
    )
    p.add_argument("--start", type=int, default=0, help="first question (hotpotqa, squad)")
    p.add_argument("--limit", type=int, default=20, help="number of questions (hotpotqa, squad)")
    p.add_argument("--lengths", default="1000,2000,4000", help="niah: haystack sizes in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="niah: needle depths (0 = start, 1 = end)")
    p.add_argument(
        "--methods",
        default="full,none,infoflow@0.15,cacheblend@0.15,epic@0.15",
        help="comma-separated SELECTOR[+reorder][[GEOMETRY]][@RATIO][+POLICY:KEEP], e.g. infoflow@0.15+infokv:0.5",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--min-context-tokens",
        type=int,
        default=0,
        help="keep only the questions (of --start/--limit) whose passages hold more tokens than this",
    )
    p.add_argument("--out", default="runs/eval/results.jsonl", help="results file (resumed if it exists)")
    p.set_defaults(func=cmd_eval_run)
    p = ev.add_parser(
        "suite",
        help="main table + ratio sweep + RoPE ablation + KV compression on held-out HotpotQA, NIAH -> RESULTS.md",
    )
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--out", default="docs", help="directory for the results files, plots and RESULTS.md")
    p.add_argument("--parts", default="main,ablation,sweep,compress,niah")
    p.add_argument("--start", type=int, default=1000, help="first question (0-999 is the development slice)")
    p.add_argument("--main-n", type=int, default=100)
    p.add_argument("--sweep-n", type=int, default=30)
    p.add_argument("--ablation-n", type=int, default=30)
    p.add_argument("--compress-n", type=int, default=30)
    p.add_argument("--large-n", type=int, default=60, help="questions of the 'large' part (qwen2.5-1.5b only)")
    p.add_argument("--ratio", type=float, default=0.15)
    p.set_defaults(func=cmd_eval_suite)
    p = ev.add_parser("report", help="rewrite RESULTS.md from the suite's results files (complete or not)")
    p.add_argument("--out", default="docs")
    p.add_argument("--main-n", type=int, default=100)
    p.add_argument("--sweep-n", type=int, default=30)
    p.add_argument("--ablation-n", type=int, default=30)
    p.add_argument("--compress-n", type=int, default=30)
    p.add_argument("--large-n", type=int, default=60, help="questions of the 'large' part (qwen2.5-1.5b only)")
    p.add_argument("--ratio", type=float, default=0.15)
    p.set_defaults(func=cmd_eval_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (InfoFlowError, ValueError, ModuleNotFoundError, FileNotFoundError) as err:
        print(f"infoflow-rag: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

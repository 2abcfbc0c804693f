"""Commands that build and serve an index: ingest, index repair, ask, serve, demo, check."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import engine_settings, load_engine, query_options


def cmd_check(args: argparse.Namespace) -> int:
    from ..engine.check import run_check

    report = run_check(load_engine(args), thorough=True)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(
            f"{report.model}: key re-rotation error {report.key_rotation_error:.2e} (shift {report.rotation_delta}), "
            f"100 % recompute logit diff {report.logit_diff:.2e} -> {'ok' if report.ok else 'FAILED'}"
        )
    return 0 if report.ok else 1


def cmd_ingest(args: argparse.Namespace) -> int:
    from ..index.splitting import load_source
    from ..ingest import check_has_text, ingest
    from ..pipeline import Pipeline

    # Only what was asked for: a new index takes it, an existing one must already have it (Pipeline.open).
    index_options = {**({"kind": args.index_kind} if args.index_kind else {}), **dict(args.index_param)}
    documents = load_source(args.source, strict_utf8=args.strict_utf8, follow_symlinks=args.follow_symlinks)
    if not Path(args.index).exists():  # refused before the model loads or the index is created
        check_has_text(documents, args.source, args.follow_symlinks)
    with Pipeline.open(
        args.index,
        model=args.model,
        engine_settings=engine_settings(args),
        store=args.store,
        create=True,
        kv_dtype=args.kv_dtype,
        **index_options,
    ) as pipeline:
        summary = ingest(
            pipeline,
            args.source,
            split=args.split,
            window=args.window,
            batch_size=args.batch_size,
            progress=not args.json,
            documents=documents,
        )
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        gone = f" ({counted(summary.removed_documents, 'document')} gone)" if summary.removed_documents else ""
        print(
            f"{counted(summary.passages, 'passage')} from {counted(summary.documents, 'document')}: "
            f"{summary.new_passages} new, {summary.removed_passages} removed{gone}, "
            f"{summary.kv_computed} prefilled ({summary.tokens} tokens, {summary.kv_bytes / 2**20:.1f} MiB KV) "
            f"in {summary.seconds:.1f} s = {summary.passages_per_s:.1f} passages/s, "
            f"{summary.tokens_per_s:.0f} tokens/s"
        )
    return 0


def cmd_index_repair(args: argparse.Namespace) -> int:
    from ..index.passage_index import PassageIndex

    params = dict(args.index_param)
    with PassageIndex.repair(args.index, kind=args.index_kind, show_progress=not args.json, **params) as index:
        n = len(index)
    if args.json:
        print(json.dumps({"index": args.index, "passages": n}))
    else:
        print(f"{args.index}: rebuilt the vectors of {counted(n, 'passage')} from their records")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from ..pipeline import Pipeline

    options = query_options(args)  # before the model loads
    if not args.question.strip():
        raise ValueError("the question is empty; pass its text, e.g. infoflow-rag ask 'Who wrote Hamlet?' --index DIR")
    with Pipeline.open(args.index, args.model, args.store, engine_settings=engine_settings(args)) as pipeline:
        if args.json:
            answer = pipeline.ask(args.question, args.top_k, options, max_new_tokens=args.max_new_tokens)
            print(json.dumps(answer.to_dict() if args.token_ids else without_token_ids(answer.to_dict()), indent=2))
            return 0
        stream = pipeline.stream(args.question, args.top_k, options, max_new_tokens=args.max_new_tokens)
        for delta in stream:
            print(delta, end="", flush=True)
        answer = stream.answer
        t = answer.result.timings
        print(
            f"\n\nTTFT {t.ttft:.3f} s (retrieve {t.retrieve * 1000:.0f} ms, KV load {t.load_kv * 1000:.0f} ms, "
            f"place {t.place * 1000:.0f} ms, score {t.score * 1000:.0f} ms, recompute {t.recompute:.3f} s); "
            f"recomputed {100 * answer.result.recompute_fraction:.1f} % of {answer.result.context_tokens} tokens"
        )
        print(reuse_line(answer))
        if options.compress != "none":
            r = answer.result
            print(
                f"KV compression {options.compress} (keep {options.keep}, {t.compress * 1000:.0f} ms): decoded from "
                f"{r.kv_tokens} cache entries, peak {r.kv_bytes / 2**20:.2f} MiB"
            )
        for i, hit in enumerate(answer.sources):
            print(f"[{i}] {hit.score:.3f} {hit.source or ''} {hit.text[:90]}")
    return 0


def reuse_line(answer) -> str:
    """Where the passages' KV came from: the store, or computed by this call (and stored for next time)."""
    reuse, result = answer.reuse, answer.result
    recomputed = sum(len(offsets) for offsets in result.selected.values())
    return (
        f"reuse: {counted(reuse.passages_hit, 'passage')} from the store ({reuse.stored_tokens} tokens), "
        f"{reuse.passages_computed} computed now ({reuse.prefilled_tokens} tokens prefilled and stored); "
        f"{recomputed} tokens recomputed"
    )


TOKEN_ID_FIELDS = ("selected", "passage_tokens", "answer_ids")  # AnswerResult's per-token lists


def without_token_ids(answer: dict) -> dict:
    """``PipelineAnswer.to_dict()`` without the raw token-id lists (``--token-ids`` keeps them)."""
    result = {k: v for k, v in answer["result"].items() if k not in TOKEN_ID_FIELDS}
    result["recomputed_tokens"] = sum(len(v) for v in answer["result"]["selected"].values())
    return {**answer, "result": result}


def cmd_serve(args: argparse.Namespace) -> int:
    from ..pipeline import Pipeline
    from ..serve import ServerSettings, serve

    options = query_options(args)  # before the model loads
    with Pipeline.open(args.index, args.model, args.store, engine_settings=engine_settings(args)) as pipeline:
        settings = ServerSettings(
            model_name=args.served_model_name or pipeline.model_name,
            options=options,
            max_tokens=args.max_tokens,
            max_queue=args.max_queue,
            timeout=args.timeout,
        )

        def listening() -> None:  # said once the port is bound, so a store or port problem is all the user sees
            print(f"serving {settings.model_name} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)

        serve(pipeline, settings, host=args.host, port=args.port, on_listening=listening)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    if args.items < 1 or not 1 <= args.questions <= args.items:
        raise ValueError(f"need --items >= 1 and 1 <= --questions <= --items, got {args.items} and {args.questions}")
    run_demo(
        args.out,
        model=args.model,
        engine_settings=engine_settings(args),
        n_items=args.items,
        n_questions=args.questions,
        color=sys.stdout.isatty() and not args.no_color,
    )
    return 0


def counted(n: int, noun: str) -> str:
    """'1 passage', '3 passages'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

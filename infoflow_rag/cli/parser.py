"""The argument parser: every subcommand, its flags, and the function that runs it."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

from ..bench import BENCH_METHODS
from ..engine.selection import DEFAULT_RATIO
from ..eval.datasets import HAYSTACKS
from ..eval.methods import GRAMMAR
from ..index.faiss_index import DEFAULT_PARAMS
from ..index.splitting import MIN_WINDOW
from ..models import DEFAULT_MODEL, REGISTRY
from ..store import STORAGE_DTYPES
from .evaluation import (
    cmd_bench_prefill,
    cmd_bench_store,
    cmd_bench_ttft,
    cmd_eval_report,
    cmd_eval_run,
    cmd_eval_suite,
)
from .options import DEFAULT_LEAD_IN_NAME, LEAD_INS, add_option_flags
from .serving import cmd_ask, cmd_check, cmd_demo, cmd_index_repair, cmd_ingest, cmd_serve
from .values import at_least, index_param, non_negative_int, port, positive_float, positive_int, ratio, store_spec

DESCRIPTION = "infoflow-rag: passage KV reuse with InfoFlow selective recompute for fast RAG."
MODELS = ", ".join(sorted(REGISTRY))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default shown, unless its help already says it or there is none (unset, a flag's off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity for None and False: a default of 0 equals False and is shown
        unset = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if "default" in text or unset:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The command's parsers, subcommands' included (they are built by the class of their parent)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def package_version() -> str:
    try:
        return version("infoflow-rag")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="infoflow-rag", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="correctness gate: key re-rotation and 100 %% recompute vs full prefill")
    _model(p)
    _json(p)
    p.set_defaults(func=cmd_check)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("ttft", help="time-to-first-token of every method vs full prefill, side by side")
    _model(p, lead_in_flag=False)
    p.add_argument("--context", default="1024,2048,4096", help="comma-separated context sizes in tokens")
    p.add_argument("--ratio", type=ratio, default=DEFAULT_RATIO, help="share of context tokens recomputed")
    p.add_argument(
        "--methods",
        default=",".join(BENCH_METHODS),
        help="comma-separated methods in the eval grammar (infoflow+reorder, sinkflow+leadin, ...; +leadin over "
        "lead-in caches, the others over plain ones); --ratio unless @",
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per method (median and range reported)")
    _json(p)
    p.set_defaults(func=cmd_bench_ttft)
    p = bench.add_parser("prefill", help="passage prefill time with and without InfoKV's per-token signals")
    _model(p)
    p.add_argument("--tokens", type=int, default=4096, help="passage tokens prefilled per run")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs each (median reported)")
    _json(p)
    p.set_defaults(func=cmd_bench_prefill)
    p = bench.add_parser("store", help="disk KV store per storage dtype: bytes/token, warm load speed, answer effect")
    _model(p)
    p.add_argument("--passages", type=positive_int, default=40, help="passages written to and read from each store")
    p.add_argument("--dir", default=None, help="where to write the temporary stores (default: system temp)")
    _json(p)
    p.set_defaults(func=cmd_bench_store)

    p = sub.add_parser(
        "ingest",
        help="index a folder of .txt/.md files or a .jsonl file, prefill and store KV; "
        "run again, it replaces what the source held (edited and deleted documents)",
    )
    p.add_argument("source", help="folder of .txt/.md files (read recursively), one such file, or a .jsonl file")
    p.add_argument("--index", required=True, help="index directory (created if missing)")
    _model(p)
    p.add_argument(
        "--store",
        type=store_spec,
        default=None,
        help="KV store: disk:DIR, memory[:SIZE] or redis://... (default: disk store inside the index directory)",
    )
    p.add_argument(
        "--split", choices=["paragraph", "tokens"], default="paragraph", help="passages: paragraphs or token windows"
    )
    p.add_argument(
        "--window",
        type=at_least(MIN_WINDOW),
        default=256,
        help="passage size in tokens: each window's for --split tokens; for --split paragraph, a paragraph "
        "longer than ~this many tokens (4 characters each) is cut at sentence ends",
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="passages committed together")
    p.add_argument("--strict-utf8", action="store_true", help="stop at a file that is not UTF-8 (default: skip it)")
    p.add_argument(
        "--follow-symlinks", action="store_true", help="read files and folders linked from outside the source folder"
    )
    p.add_argument(
        "--kv-dtype",
        choices=list(STORAGE_DTYPES),
        default="float32",
        help="how new KV is stored (size and answer effect per dtype: README, `infoflow-rag bench store`)",
    )
    p.add_argument(
        "--index-kind",
        choices=list(DEFAULT_PARAMS),
        default=None,
        help="FAISS index for a new index directory: exact inner product (flat, the default), or approximate for "
        "large corpora; an existing index keeps its own, and another kind is refused (change it with `index repair`)",
    )
    _index_param(p)
    _json(p)
    p.set_defaults(func=cmd_ingest, resumable=True)  # a re-run skips what is indexed and stored

    p = sub.add_parser("ask", help="retrieve, reuse KV, selectively recompute, answer")
    p.add_argument("question", help="the question to answer from the index")
    p.add_argument("--index", required=True, help="index directory built by `infoflow-rag ingest`")
    _model(p)
    p.add_argument(
        "--store", type=store_spec, default=None, help="KV store as for ingest (default: disk store inside the index)"
    )
    p.add_argument("--top-k", type=positive_int, default=5, help="passages retrieved (at most the index size)")
    add_option_flags(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="answer length in tokens at most")
    _json(p)
    p.add_argument("--token-ids", action="store_true", help="with --json: include the token-id lists")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat and text completions) with passage KV reuse")
    p.add_argument("--index", required=True, help="index directory built by `infoflow-rag ingest` (read only)")
    _model(p)
    p.add_argument(
        "--store",
        type=store_spec,
        default=None,
        help="KV store as for ingest, e.g. redis://host:6379/0 to share it (default: disk store inside the index)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (loopback by default)")
    p.add_argument("--port", type=port, default=8000, help="TCP port to listen on")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model name)")
    add_option_flags(p, what="Default (requests may send their own). ")
    p.add_argument("--max-tokens", type=positive_int, default=256, help="answer length when a request sets none")
    p.add_argument("--max-queue", type=positive_int, default=32, help="requests waiting for the model; more get 429")
    p.add_argument(
        "--timeout", type=positive_float, default=300.0, help="seconds a request may take, queueing included"
    )
    p.set_defaults(func=cmd_serve, handles_sigterm=True)

    maintain = sub.add_parser("index", help="maintain an index directory").add_subparsers(
        dest="index_command", required=True
    )
    p = maintain.add_parser(
        "repair", help="rebuild vectors.faiss and index.json from passages.sqlite (lost, corrupt or foreign files)"
    )
    p.add_argument("index", help="index directory")
    p.add_argument(
        "--index-kind",
        choices=list(DEFAULT_PARAMS),
        default=None,
        help="FAISS index kind (default: as in index.json, else flat)",
    )
    _index_param(p)
    _json(p)
    p.set_defaults(func=cmd_index_repair)

    p = sub.add_parser("demo", help="end-to-end demo on HotpotQA paragraphs with the embedded model")
    p.add_argument("--out", default="runs/demo", help="directory for the demo's index and KV store")
    _model(p)
    p.add_argument("--items", type=int, default=20, help="HotpotQA questions whose paragraphs form the corpus")
    p.add_argument("--questions", type=int, default=3, help="of those, the questions asked")
    p.add_argument("--no-color", action="store_true", help="plain output even on a terminal")
    p.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="quality (F1/EM) and TTFT of every method").add_subparsers(
        dest="eval", required=True
    )
    p = ev.add_parser("run", help="one dataset slice x a list of methods, resumable, with a report")
    _model(p, "qwen2.5-0.5b", lead_in_flag=False)
    p.add_argument(
        "--dataset",
        choices=["hotpotqa", "hotpotqa-fixed", "squad", "niah"],
        default="hotpotqa",
        help="questions: HotpotQA paragraphs or fixed-size windows, SQuAD, or needle-in-a-haystack",
    )
    p.add_argument(
        "--chunk-tokens",
        type=positive_int,
        default=128,
        help="passage size in tokens of the hotpotqa-fixed and niah sets",
    )
    p.add_argument("--start", type=non_negative_int, default=0, help="first question (hotpotqa, hotpotqa-fixed, squad)")
    p.add_argument(
        "--limit", type=positive_int, default=20, help="number of questions (hotpotqa, hotpotqa-fixed, squad)"
    )
    p.add_argument("--lengths", default="1000,2000,4000", help="niah: haystack sizes in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="niah: needle depths (0 = start, 1 = end)")
    p.add_argument(
        "--haystack",
        choices=HAYSTACKS,
        default="first",
        help="niah: which half of the essays makes the haystack: first (development) or second (held out, the suite's)",
    )
    p.add_argument(
        "--methods",
        default="full,none,infoflow@0.15,cacheblend@0.15,epic@0.15,sinkflow+leadin@0.15",
        help=f"comma-separated {GRAMMAR}, e.g. infoflow@0.15+infokv:0.5 (see infoflow_rag/eval/methods.py)",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer length in tokens at most")
    p.add_argument(
        "--min-context-tokens",
        type=non_negative_int,
        default=0,
        help="keep only the questions (of --start/--limit) whose passages hold more tokens than this",
    )
    p.add_argument(
        "--out",
        default="runs/eval/results.jsonl",
        help="results file, .jsonl, in a directory of its own (resumed if it exists; its report, results.md and plots, "
        "is written beside it)",
    )
    p.set_defaults(func=cmd_eval_run, resumable=True)  # a re-run resumes the results file
    p = ev.add_parser(
        "suite",
        help="main table + ratio sweep + RoPE ablation + KV compression on held-out HotpotQA, NIAH -> RESULTS.md",
    )
    _model(p, "qwen2.5-0.5b", lead_in_flag=False)
    p.add_argument("--out", default="docs", help="directory for the results files, plots and RESULTS.md")
    p.add_argument("--parts", default="main,ablation,sweep,compress,niah", help="comma-separated parts, run in order")
    p.add_argument(
        "--start", type=non_negative_int, default=1000, help="first question (0-999 is the development slice)"
    )
    _suite_sizes(p)
    p.set_defaults(func=cmd_eval_suite, resumable=True)
    p = ev.add_parser(
        "report",
        help="rewrite RESULTS.md from the suite's results files (complete or not), or the reports of `eval run`'s",
    )
    p.add_argument(
        "results",
        nargs="*",
        help="results files of `eval run`: rewrite each one's report (results.md and its plots beside it; no model "
        "loads) instead of the suite's",
    )
    suite_flags = [p.add_argument("--out", default="docs", help="directory of the suite's results files")]
    suite_flags += _suite_sizes(p)
    # What the suite's flags are unset: set beside results files they would be ignored, so they are refused.
    p.set_defaults(func=cmd_eval_report, suite_flags={a.option_strings[0]: (a.dest, a.default) for a in suite_flags})
    return parser


def _suite_sizes(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The flags that size the suite's parts (``eval suite`` runs them, ``eval report`` reads them)."""
    return [
        p.add_argument("--main-n", type=positive_int, default=100, help="questions of the main table"),
        p.add_argument("--sweep-n", type=positive_int, default=30, help="questions of the ratio sweep"),
        p.add_argument("--ablation-n", type=positive_int, default=30, help="questions of the RoPE ablation"),
        p.add_argument("--compress-n", type=positive_int, default=30, help="questions of the KV compression part"),
        p.add_argument(
            "--large-n", type=positive_int, default=60, help="questions of the 'large' part (qwen2.5-1.5b only)"
        ),
        p.add_argument("--ratio", type=ratio, default=DEFAULT_RATIO, help="share of context tokens recomputed"),
    ]


def _model(p: argparse.ArgumentParser, default: str = DEFAULT_MODEL, lead_in_flag: bool = True) -> None:
    """``--model``, and ``--lead-in`` unless ``lead_in_flag`` is False: the commands that compare methods
    (``bench ttft``, ``eval``) take the kind of cache from each method's own spelling (``+leadin``), not a flag."""
    p.add_argument("--model", default=default, help=f"registered name ({MODELS}), HF dir or .gguf file")
    if not lead_in_flag:
        return
    p.add_argument(
        "--lead-in",
        choices=list(LEAD_INS),
        default=DEFAULT_LEAD_IN_NAME,
        help="what every passage is prefilled behind: 'neutral' (a few unrelated paragraphs) makes the stale caches "
        "closer to full prefill's (docs/selector-study.md, held-out check 2); 'none' right behind the prompt head, as "
        f"the published methods do. Each kind has its own KV store keys (default: {DEFAULT_LEAD_IN_NAME})",
    )


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _index_param(p: argparse.ArgumentParser) -> None:
    accepted = "; ".join(f"{kind}: {', '.join(params)}" for kind, params in DEFAULT_PARAMS.items() if params)
    p.add_argument(
        "--index-param",
        type=index_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{accepted} (repeatable)",
    )

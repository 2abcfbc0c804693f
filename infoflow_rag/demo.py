"""The end-to-end demo: index real HotpotQA paragraphs, ask questions, show answers, sources, TTFT next to
full prefill, and which tokens were recomputed (terminal highlight + a self-contained HTML page)."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from .corpus import hotpotqa, paragraph_text
from .files import atomic_write
from .ingest import ingest
from .pipeline import Pipeline
from .pipeline_answer import PipelineAnswer

BOLD_YELLOW, DIM, RESET = "\033[1;33m", "\033[2m", "\033[0m"


@dataclass
class DemoQuestion:
    question: str
    gold: str
    cached: PipelineAnswer  # the default selector and ratio over the stored KV
    full: PipelineAnswer  # plain full prefill of the same passages


def write_corpus(path: Path, n_items: int) -> list[dict]:
    """The paragraphs of the first ``n_items`` HotpotQA dev questions as a JSONL corpus; returns the items."""
    items = hotpotqa()[:n_items]
    path.parent.mkdir(parents=True, exist_ok=True)
    seen, lines = set(), []
    for item in items:
        for title, sentences in item["context"]:
            text = paragraph_text(title, sentences)
            if text not in seen:
                seen.add(text)
                lines.append(json.dumps({"id": title, "title": title, "text": text}) + "\n")
    atomic_write(path, "".join(lines).encode("utf-8"))
    return items


def token_spans(pipeline: Pipeline, result, passage: int) -> list[tuple[str, bool]]:
    """(text, recomputed) per token of one passage, as placed in the prompt."""
    chosen = set(result.selected.get(passage, []))
    tok = pipeline.engine.tokenizer
    return [(tok.decode([t]), i in chosen) for i, t in enumerate(result.passage_tokens[passage])]


def highlight_terminal(spans: list[tuple[str, bool]], color: bool) -> str:
    if not color:
        return "".join(f"[{t}]" if hit else t for t, hit in spans)
    return "".join(f"{BOLD_YELLOW}{t}{RESET}" if hit else f"{DIM}{t}{RESET}" for t, hit in spans)


def run_demo(
    out_dir: str | Path = "runs/demo",
    model: str = "smollm2-135m",
    engine_settings: dict | None = None,
    n_items: int = 20,
    n_questions: int = 3,
    top_k: int = 4,
    color: bool = True,
) -> Path:
    out = Path(out_dir)
    items = write_corpus(out / "corpus.jsonl", n_items)
    pipeline = Pipeline.open(out / "index", model=model, create=True, engine_settings=engine_settings)
    with pipeline:
        summary = ingest(pipeline, out / "corpus.jsonl", split="paragraph")
        print(
            f"\nindexed {summary.passages} passages ({summary.new_passages} new, {summary.kv_computed} prefilled, "
            f"{summary.tokens} tokens, {summary.kv_bytes / 2**20:.1f} MiB KV) in {summary.seconds:.1f} s\n"
        )
        asked = []
        for item in items[:n_questions]:
            q = item["question"]
            cached = pipeline.ask(q, top_k=top_k, max_new_tokens=24)
            full = pipeline.ask(q, top_k=top_k, selector="full", max_new_tokens=24)
            asked.append(DemoQuestion(q, item["answer"], cached, full))
            print_question(pipeline, asked[-1], color)
        page = write_html(pipeline, asked, out / "demo.html")
    print(f"HTML page with the recomputed tokens: {page}")
    return page


def print_question(pipeline: Pipeline, d: DemoQuestion, color: bool) -> None:
    r, f = d.cached.result, d.full.result
    print(f"Q: {d.question}\n   gold: {d.gold}")
    print(
        f"   {method_label(r)}: {d.cached.answer!r}   TTFT {r.timings.ttft:.2f} s "
        f"(KV load {r.timings.load_kv * 1000:.0f} ms, score {r.timings.score * 1000:.0f} ms, "
        f"recompute {r.timings.recompute:.2f} s)"
    )
    print(
        f"   {'full prefill':<{len(method_label(r))}}: {d.full.answer!r}   TTFT {f.timings.ttft:.2f} s  "
        f"-> {f.timings.ttft / r.timings.ttft:.1f}x faster first token"
    )
    for i, hit in enumerate(d.cached.sources):
        print(f"   [{i}] score {hit.score:.3f}  {hit.text[:70]}...")
    for i in r.passage_order:
        print(f"   recomputed in [{i}]: {highlight_terminal(token_spans(pipeline, r, i), color)}")
    print()


def method_label(result) -> str:
    """The cached answer's method as the demo names it, e.g. ``sinkflow (15 %)``."""
    return f"{result.options.selector} ({100 * result.options.ratio:g} %)"


def write_html(pipeline: Pipeline, asked: list[DemoQuestion], path: Path) -> Path:
    blocks = []
    for d in asked:
        r, f = d.cached.result, d.full.result
        passages = []
        for i in r.passage_order:
            spans = "".join(
                f"<mark>{html.escape(t)}</mark>" if hit else html.escape(t) for t, hit in token_spans(pipeline, r, i)
            )
            passages.append(f"<li><span class=score>{d.cached.sources[i].score:.3f}</span> {spans}</li>")
        blocks.append(
            f"<section><h2>{html.escape(d.question)}</h2>"
            f"<p><b>Gold:</b> {html.escape(d.gold)}</p>"
            f"<table><tr><th></th><th>answer</th><th>TTFT</th></tr>"
            f"<tr><td>{method_label(r)}</td><td>{html.escape(d.cached.answer)}</td><td>{r.timings.ttft:.2f} s</td></tr>"
            f"<tr><td>full prefill</td><td>{html.escape(d.full.answer)}</td><td>{f.timings.ttft:.2f} s</td></tr>"
            f"</table><p>Passages in prompt order; <mark>highlighted</mark> tokens were recomputed "
            f"({100 * r.recompute_fraction:.1f} % of context tokens).</p><ol start=0>{''.join(passages)}</ol>"
            f"</section>"
        )
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:auto}mark{background:#fd4}"
        "li{margin:.5em 0;line-height:1.5}.score{color:#888;font-size:.8em}td,th{padding:.2em .8em}"
    )
    page = (
        f"<!doctype html><meta charset=utf-8><title>infoflow-rag demo</title><style>{style}</style>"
        f"<h1>infoflow-rag demo</h1>{''.join(blocks)}\n"
    )
    atomic_write(path, page.encode("utf-8"))
    return path

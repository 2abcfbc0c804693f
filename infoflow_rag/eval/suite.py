"""The published comparison as one resumable command: main table, ratio sweep, RoPE geometry ablation,
KV compression, needle in a haystack.

Questions 0-999 of HotpotQA dev are the development slice; the reported runs use questions from 1000 on,
which no setting here was tuned on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .datasets import EvalExample, load_hotpotqa, load_niah, tokenizer_codec
from .methods import DEFAULT_RATIO, GEOMETRIES, MethodSpec, parse_method
from .report import (
    Section,
    agreement_scores,
    agreement_table,
    compression_table,
    paired_table,
    plot_agreement,
    plot_niah_heatmap,
    plot_tradeoff,
    summary_table,
    write_results_md,
)
from .results import ResultsRun, read_results
from .runner import run_eval
from .stats import paired_diff, win_tie_loss

HELD_OUT_START = 1000
MAIN_METHODS = ("full", "none", "infoflow", "infoflow+reorder", "cacheblend", "epic", "random")
SWEEP_RATIOS = (0.05, 0.1, 0.15, 0.25, 0.5)
SWEEP_SELECTORS = ("infoflow", "cacheblend", "epic")
COMPRESSIONS = ("snapkv:0.25", "snapkv:0.5", "infokv:0.25", "infokv:0.5")
NIAH_LENGTHS = (1000, 2000, 4000)
NIAH_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NIAH_PASSAGE_TOKENS = 256
NIAH_METHODS = ("full", "none", "infoflow", "cacheblend", "epic")


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    limit: int  # questions (for niah: grid cells)
    methods: tuple[str, ...]
    dataset: str = "hotpotqa"  # "hotpotqa" (passage split, from --start) or "niah" (the fixed grid above)

    def examples(self, engine, start: int) -> list[EvalExample]:
        if self.dataset == "niah":  # the haystack is cut with the model's own tokens
            codec = tokenizer_codec(engine.tokenizer)
            return load_niah(NIAH_LENGTHS, NIAH_DEPTHS, passage_tokens=NIAH_PASSAGE_TOKENS, **codec)
        return load_hotpotqa("passage", start=start, limit=self.limit)


def suite_parts(
    main_n: int = 100, sweep_n: int = 30, ablation_n: int = 30, ratio: float = 0.15, compress_n: int = 30
) -> list[Part]:
    main = tuple(m if m in ("full", "none") else f"{m}@{ratio:g}" for m in MAIN_METHODS)
    sweep = ("full", *(f"{s}@{r:g}" for s in SWEEP_SELECTORS for r in SWEEP_RATIOS))
    # Quality only: the geometry changes which tokens are picked, not the recompute cost, so no TTFT reference.
    ablation = tuple(f"infoflow[{g}]@{ratio:g}" for g in GEOMETRIES)
    # Its own uncompressed run, on the same questions, is the baseline every compression is paired with.
    compress = (f"infoflow@{ratio:g}", *(f"infoflow@{ratio:g}+{c}" for c in COMPRESSIONS))
    niah = tuple(m if m in ("full", "none") else f"{m}@{ratio:g}" for m in NIAH_METHODS)
    grid = len(NIAH_LENGTHS) * len(NIAH_DEPTHS)
    return [
        Part("main", f"HotpotQA passage split, {main_n} held-out questions, ratio {ratio:g}", main_n, main),
        Part("sweep", f"Speed-accuracy sweep, {sweep_n} held-out questions", sweep_n, sweep),
        Part(
            "ablation",
            f"RoPE geometry ablation (InfoFlow scoring), {ablation_n} held-out questions",
            ablation_n,
            ablation,
        ),
        Part(
            "compress",
            f"KV compression stacked on InfoFlow {ratio * 100:g} % recompute, {compress_n} held-out questions, "
            "HotpotQA passage split",
            compress_n,
            compress,
        ),
        Part(
            "niah",
            f"Needle in a haystack (Paul Graham essays, {NIAH_PASSAGE_TOKENS}-token passages), ratio {ratio:g}",
            grid,
            niah,
            dataset="niah",
        ),
    ]


def run_suite(
    engine,
    out_dir: str | Path,
    parts: list[Part],
    start: int = HELD_OUT_START,
    max_new_tokens: int = 32,
    progress: bool = True,
    ratio: float = DEFAULT_RATIO,
    report_parts: list[Part] | None = None,
) -> Path:
    """Run (or resume) every part into ``out_dir/<part>.jsonl``, then write ``out_dir/RESULTS.md``.

    The report shows the results on file of ``report_parts`` (default ``parts``): pass every part so that
    running one part does not drop the others' sections.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        methods: list[MethodSpec] = [parse_method(m) for m in part.methods]
        run_eval(
            engine,
            part.examples(engine, start),
            methods,
            out / f"{part.name}.jsonl",
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
    return write_suite_report(out, parts if report_parts is None else report_parts, ratio)


def verdict(results: list, method: str = f"infoflow@{DEFAULT_RATIO:g}", target_gap: float = 0.02) -> str:
    """The goal stated plainly from the numbers: ``method`` within ``target_gap`` (relative) of full-prefill F1,
    and ahead of CacheBlend and EPIC at the same budget, on the questions every method answered."""
    by_method: dict[str, dict[str, float]] = {}
    for r in results:
        by_method.setdefault(r.method, {})[r.id] = r.f1
    if method not in by_method or "full" not in by_method:
        return f"No verdict: `{method}` and `full` must both have been run."
    ratio = method.rpartition("@")[2]
    lines = []
    for other in ("full", f"cacheblend@{ratio}", f"epic@{ratio}"):
        if other not in by_method:
            continue
        ids = sorted(by_method[method].keys() & by_method[other].keys())
        ours, theirs = [by_method[method][i] for i in ids], [by_method[other][i] for i in ids]
        diff, wtl = paired_diff(ours, theirs), win_tie_loss(ours, theirs)
        mean_ours, mean_theirs = sum(ours) / len(ids), sum(theirs) / len(ids)
        line = (
            f"- `{method}` vs `{other}` on {len(ids)} questions: F1 {100 * mean_ours:.1f} vs "
            f"{100 * mean_theirs:.1f}, paired difference {100 * diff.mean:+.1f} "
            f"[{100 * diff.low:+.1f}, {100 * diff.high:+.1f}], W/T/L {wtl.wins}/{wtl.ties}/{wtl.losses}"
        )
        if other == "full":
            gap = (mean_theirs - mean_ours) / mean_theirs if mean_theirs else 0.0
            line += (
                f"; relative gap {100 * gap:.1f} % — {'within' if gap <= target_gap else 'NOT within'} "
                f"the {100 * target_gap:.0f} % goal"
            )
        else:
            line += f" — {'ahead' if diff.mean > 0 else 'tied' if diff.mean == 0 else 'behind'}"
            line += " (the interval excludes 0)" if diff.low > 0 or diff.high < 0 else " (the interval includes 0)"
        lines.append(line)
    scores = agreement_scores(results, "full")
    agree: dict[str, dict[str, float]] = {}
    for r in results:
        if r.pair_key in scores:
            agree.setdefault(r.method, {})[r.id] = scores[r.pair_key]
    for other in ("none", f"cacheblend@{ratio}", f"epic@{ratio}"):
        if other not in agree or method not in agree:
            continue
        ids = sorted(agree[method].keys() & agree[other].keys())
        ours, theirs = [agree[method][i] for i in ids], [agree[other][i] for i in ids]
        diff = paired_diff(ours, theirs)
        lines.append(
            f"- agreement with the full-prefill answer (F1 of each answer against full's), `{method}` vs `{other}`: "
            f"{100 * sum(ours) / len(ids):.1f} vs {100 * sum(theirs) / len(ids):.1f}, paired difference "
            f"{100 * diff.mean:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"
            + (" (the interval excludes 0)" if diff.low > 0 or diff.high < 0 else " (the interval includes 0)")
        )
    if "none" in by_method:
        ids = sorted(by_method["none"].keys() & by_method["full"].keys())
        none_f1 = sum(by_method["none"][i] for i in ids) / len(ids)
        full_f1 = sum(by_method["full"][i] for i in ids) / len(ids)
        lines.append(
            f"- headroom: `none` (cached passages, nothing recomputed) scores F1 {100 * none_f1:.1f} vs full "
            f"{100 * full_f1:.1f} on {len(ids)} questions. Where that gap is inside the intervals above, this "
            "model and slice cannot tell the selectors apart, whatever the verdicts say."
        )
    return "\n".join(lines)


def write_suite_report(out_dir: str | Path, parts: list[Part], ratio: float = DEFAULT_RATIO) -> Path:
    out = Path(out_dir)
    sections = []
    first = None
    for part in parts:
        path = out / f"{part.name}.jsonl"
        if not path.exists():
            continue
        run = read_results(path)
        first = first or run
        answered = len({r.id for r in run.results})
        title = part.title if answered >= part.limit else f"{part.title} (partial: {answered} answered so far)"
        sections.append(Section(title, "\n\n".join(_part_body(part, run, out, ratio))))
    if first is None:
        raise FileNotFoundError(f"no results in {out}: run the suite first")
    return write_results_md(out / "RESULTS.md", first, *sections, title="infoflow-rag evaluation")


def _part_body(part: Part, run: ResultsRun, out: Path, ratio: float) -> list[str]:
    """The Markdown blocks of one part's section."""
    methods = {r.method for r in run.results}
    baseline = f"infoflow@{ratio:g}" if f"infoflow@{ratio:g}" in methods else None
    if part.name == "compress":
        note = "Each compressed method against its uncompressed baseline on the same questions:"
        body = [f"{note}\n\n{compression_table(run.results)}"]
        if baseline:
            note = f"How often decoding from the compressed cache still gives the answer `{baseline}` gives:"
            body.append(f"{note}\n\n{agreement_table(run.results, baseline)}")
            body.insert(
                0, "Does entropy help? Computed from the tables below:\n\n" + entropy_verdict(run.results, baseline)
            )
        return body
    body = [summary_table(run.results)]
    if baseline:
        body.append(f"Paired against `{baseline}` on the same questions:\n\n" + paired_table(run.results, baseline))
    if "full" in methods:
        note = "Agreement with the full-prefill answer (what reuse is meant to reproduce), paired against the baseline:"
        body.append(f"{note}\n\n{agreement_table(run.results, 'full', baseline)}")
    if part.name == "main":
        body.insert(0, "Verdict, computed from the table below:\n\n" + verdict(run.results, f"infoflow@{ratio:g}"))
        if "full" in methods:
            body.append(_agreement_by_subset(run.results, baseline))
    if part.dataset == "niah":
        plot = plot_niah_heatmap(run.results, out / "niah_heatmap.png")
        body.append(f"Gold F1 by needle depth and haystack length:\n\n![NIAH heatmap]({plot.name})")
    if part.name == "sweep":
        plot = plot_tradeoff(run.results, out / "tradeoff.png")
        body.append(f"![F1 vs TTFT]({plot.name})")
        plot = plot_agreement(run.results, out / "agreement.png")
        body.append(f"![F1 against the full-prefill answer, by ratio]({plot.name})")
        body.append(_agreement_by_ratio(run.results))
    return body


def _agreement_by_subset(results: list, baseline: str | None) -> str:
    """Agreement with full split by context length (at the median) and by HotpotQA question type.

    Exploratory: these subsets were chosen after seeing the overall table, so they suggest, not prove.
    """
    lengths = sorted(r.context_tokens for r in results if r.method == "full")
    median = lengths[(len(lengths) - 1) // 2]
    subsets = {
        f"context <= {median} tokens": lambda r: r.context_tokens <= median,
        f"context > {median} tokens": lambda r: r.context_tokens > median,
        **{
            f"{kind} questions": (lambda r, kind=kind: r.meta.get("type") == kind)
            for kind in sorted({r.meta.get("type") for r in results if r.meta.get("type")})
        },
    }
    blocks = ["Agreement with the full-prefill answer by subset (exploratory: subsets chosen after the overall table):"]
    for name, keep in subsets.items():
        ids = {r.id for r in results if r.method == "full" and keep(r)}
        subset = [r for r in results if r.id in ids]
        blocks.append(f"*{name}* ({len(ids)} questions)\n\n{agreement_table(subset, 'full', baseline)}")
    return "\n\n".join(blocks)


def _agreement_by_ratio(results: list) -> str:
    """Agreement with full at each swept ratio, every selector paired against InfoFlow at that same ratio."""
    ratios = sorted({r.ratio for r in results if r.selector == "infoflow"})
    blocks = ["Agreement with the full-prefill answer at each ratio, paired against InfoFlow at the same ratio:"]
    for ratio in ratios:
        subset = [r for r in results if r.selector == "full" or r.ratio == ratio]
        blocks.append(f"*ratio {ratio:g}*\n\n{agreement_table(subset, 'full', f'infoflow@{ratio:g}')}")
    return "\n\n".join(blocks)


def entropy_verdict(results: list, baseline: str) -> str:
    """InfoKV against SnapKV (the same attention signal without entropy and layer evolution) at each keep:
    paired differences in gold F1 and in agreement with the uncompressed ``baseline`` answer."""
    agree = agreement_scores(results, baseline)
    by_key = {r.pair_key: r for r in results}
    lines = []
    for keep in sorted({r.keep for r in results if r.compress == "infokv"}):
        info, snap = f"{baseline}+infokv:{keep}", f"{baseline}+snapkv:{keep}"
        pairs = [(r, by_key.get((r.dataset, r.id, snap))) for r in results if r.method == info]
        pairs = [(a, b) for a, b in pairs if b is not None]
        if not pairs:
            continue
        f1 = paired_diff([a.f1 for a, _ in pairs], [b.f1 for _, b in pairs])
        ag = paired_diff([agree[a.pair_key] for a, _ in pairs], [agree[b.pair_key] for _, b in pairs])
        helps = f1.low > 0 or ag.low > 0
        hurts = f1.high < 0 or ag.high < 0
        word = {(True, False): "helps", (False, True): "hurts", (True, True): "mixed"}.get(
            (helps, hurts), "no significant difference"
        )
        lines.append(
            f"- keep {keep}: InfoKV − SnapKV on {len(pairs)} questions: gold F1 {100 * f1.mean:+.1f} "
            f"[{100 * f1.low:+.1f}, {100 * f1.high:+.1f}], agreement with `{baseline}` {100 * ag.mean:+.1f} "
            f"[{100 * ag.low:+.1f}, {100 * ag.high:+.1f}] — {word}"
        )
    return "\n".join(lines) or "No verdict: InfoKV and SnapKV were not both run at the same keep."

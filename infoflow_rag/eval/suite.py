"""The published comparison as one resumable command: main table, ratio sweep, RoPE geometry ablation,
KV compression, needle in a haystack.

Questions 0-999 of HotpotQA dev are the development slice; the reported runs use questions from 1000 on,
which no setting here was tuned on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine.placement import GEOMETRIES
from ..engine.selection import DEFAULT_RATIO
from .datasets import EvalExample, load_hotpotqa, load_niah, tokenizer_codec
from .kl_mass import kl_mass_table, positions_by_method
from .methods import MethodSpec, parse_method
from .plots import plot_agreement, plot_frontier, plot_niah_heatmap, plot_tradeoff
from .report import Section, write_results_md
from .results import ResultsRun, read_results
from .runner import run_eval
from .tables import (
    agreement_table,
    compression_table,
    fidelity_paired_table,
    fidelity_table,
    paired_table,
    resolution_table,
    summary_table,
    with_fidelity,
)
from .verdicts import entropy_verdict, trial_verdict, verdict

HELD_OUT_START = 1000
MAIN_METHODS = ("full", "none", "infoflow", "sinkflow", "cacheblend", "epic", "random", "sinkflow+leadin")
# The selectors put on trial, newest first: the suite runs the first (sinkflow over passages prefilled behind the
# neutral lead-in, study round 15); a report pairs the newest one its run has against each rival at the same ratio,
# so the reports of earlier runs keep their own trial.
TRIALS = ("sinkflow+leadin", "sinkflow")
TRIAL_RIVALS = ("infoflow", "cacheblend", "epic")
# The selector on trial also runs at this smaller budget in the main, needle and large parts: does it match the others
# for less?
SMALL_RATIO = 0.1
SWEEP_RATIOS = (0.05, 0.1, 0.15, 0.25, 0.5)
SWEEP_SELECTORS = ("infoflow", "sinkflow", "cacheblend", "epic", "sinkflow+leadin")
COMPRESSIONS = ("snapkv:0.25", "snapkv:0.5", "infokv:0.25", "infokv:0.5")
NIAH_LENGTHS = (1000, 2000, 4000)
NIAH_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NIAH_PASSAGE_TOKENS = 256
NIAH_METHODS = ("full", "none", "infoflow", "sinkflow", "cacheblend", "epic", "sinkflow+leadin")
LARGE_MODEL = "qwen2.5-1.5b"  # the model with headroom: its part runs only on it
LARGE_METHODS = ("full", "none", "infoflow", "sinkflow", "cacheblend", "epic", "sinkflow+leadin")


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    limit: int  # questions (for niah: grid cells)
    methods: tuple[str, ...]
    dataset: str = "hotpotqa"  # "hotpotqa" (passage split, from --start) or "niah" (the fixed grid above)
    model: str | None = None  # the registered model this part must run on; None: the suite's model

    def examples(self, engine, start: int) -> list[EvalExample]:
        if self.dataset == "niah":  # the haystack is cut with the model's own tokens
            codec = tokenizer_codec(engine.tokenizer)
            # The second half of the essays: the first is the development haystack.
            return load_niah(NIAH_LENGTHS, NIAH_DEPTHS, passage_tokens=NIAH_PASSAGE_TOKENS, haystack="second", **codec)
        return load_hotpotqa("passage", start=start, limit=self.limit)


def suite_parts(
    main_n: int = 100,
    sweep_n: int = 30,
    ablation_n: int = 30,
    ratio: float = DEFAULT_RATIO,
    compress_n: int = 30,
    large_n: int = 60,
) -> list[Part]:
    def at_ratio(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m if m in ("full", "none") else f"{m}@{ratio:g}" for m in names)

    # Every part runs `full`: the reference of the fidelity measures (and of TTFT ratios).
    small = (f"{TRIALS[0]}@{SMALL_RATIO:g}",) if SMALL_RATIO != ratio else ()
    main = at_ratio(MAIN_METHODS) + small
    sweep = ("full", *(f"{s}@{r:g}" for s in SWEEP_SELECTORS for r in SWEEP_RATIOS))
    ablation = ("full", *(f"infoflow[{g}]@{ratio:g}" for g in GEOMETRIES))
    # Its own uncompressed run, on the same questions, is the baseline every compression is paired with.
    compress = ("full", f"infoflow@{ratio:g}", *(f"infoflow@{ratio:g}+{c}" for c in COMPRESSIONS))
    niah = at_ratio(NIAH_METHODS) + small
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
            f"Needle in a haystack (second half of the Paul Graham essays, {NIAH_PASSAGE_TOKENS}-token passages), "
            f"ratio {ratio:g}",
            grid,
            niah,
            dataset="niah",
        ),
        Part(
            "large",
            f"HotpotQA passage split, {large_n} held-out questions on {LARGE_MODEL}, ratio {ratio:g}",
            large_n,
            at_ratio(LARGE_METHODS) + small,
            model=LARGE_MODEL,
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
    model = engine.model_info["name"]
    if wrong := [p for p in parts if p.model not in (None, model)]:
        raise ValueError(
            "; ".join(f"part {p.name!r} runs on {p.model}, not {model}: run it with --model {p.model}" for p in wrong)
        )
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


def write_suite_report(out_dir: str | Path, parts: list[Part], ratio: float = DEFAULT_RATIO) -> Path:
    out = Path(out_dir)
    sections = []
    first = None
    for part in parts:
        path = out / f"{part.name}.jsonl"
        if not path.exists():
            continue
        run = read_results(path)
        body = _part_body(part, run, out, ratio)
        if first is not None and run.commands != first.commands:  # the Run section shows the first part's
            body.insert(0, _produced_by(run))
        first = first or run
        answered = len({r.id for r in run.results})
        title = part.title if answered >= part.limit else f"{part.title} (partial: {answered} answered so far)"
        sections.append(Section(title, "\n\n".join(body)))
    if first is None:
        raise FileNotFoundError(f"no results in {out}: run the suite first")
    return write_results_md(out / "RESULTS.md", first, *sections, title="infoflow-rag evaluation")


def _produced_by(run: ResultsRun) -> str:
    """How a part other than the first was run: its commands, model and start (the Run section has the first's)."""
    return (
        f"Produced by (first run, then each resume), on `{run.header.model_info.get('name', '?')}`, started "
        f"{run.header.started}:\n\n```sh\n" + "\n".join(run.commands) + "\n```"
    )


def _part_body(part: Part, run: ResultsRun, out: Path, ratio: float) -> list[str]:
    """The Markdown blocks of one part's section."""
    methods = {r.method for r in run.results}
    baseline = f"infoflow@{ratio:g}" if f"infoflow@{ratio:g}" in methods else None
    if part.name == "compress":
        note = "Each compressed method against its uncompressed baseline on the same questions:"
        body = [f"{note}\n\n{compression_table(run.results)}", *_fidelity_blocks(run.results, baseline)]
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
    body += _fidelity_blocks(run.results, baseline)
    if "full" in methods:
        note = "Agreement with the full-prefill answer (what reuse is meant to reproduce), paired against the baseline:"
        body.append(f"{note}\n\n{agreement_table(run.results, 'full', baseline)}")
    candidate = next((f"{t}@{ratio:g}" for t in TRIALS if f"{t}@{ratio:g}" in methods), None)
    if candidate and with_fidelity(run.results):
        rivals = [f"{rival}@{ratio:g}" for rival in TRIAL_RIVALS]
        # The frontier claim: the trial selector at this budget against InfoFlow at the next swept one.
        frontier = [f"infoflow@{r:g}" for r in SWEEP_RATIOS if r > ratio][:1] if part.name == "sweep" else []
        text = trial_verdict(run.results, candidate, rivals, frontier)
        paired = fidelity_paired_table(run.results, candidate)
        body.insert(0, f"The selector on trial, `{candidate}`, computed from the fidelity tables below:\n\n{text}")
        body.append(f"Fidelity paired against `{candidate}` on the same questions:\n\n{paired}")
    if part.name == "main":
        body.insert(0, "Verdict, computed from the table below:\n\n" + verdict(run.results, f"infoflow@{ratio:g}"))
        if "full" in methods:
            body.append(_agreement_by_subset(run.results, baseline))
    if part.dataset == "niah":
        plot = plot_niah_heatmap(run.results, out / "niah_heatmap.png")
        body.append(f"Gold F1 by needle depth and haystack length:\n\n![NIAH heatmap]({plot.name})")
    if part.name == "sweep":
        if with_fidelity(run.results):
            plot = plot_frontier(run.results, out / "frontier.png")
            body.append(
                f"The speed-fidelity frontier (lower left is better; TTFT ratios from this run):\n\n"
                f"![kl_answer vs TTFT / full]({plot.name})"
            )
        plot = plot_tradeoff(run.results, out / "tradeoff.png")
        body.append(f"![F1 vs TTFT]({plot.name})")
        plot = plot_agreement(run.results, out / "agreement.png")
        body.append(f"![F1 against the full-prefill answer, by ratio]({plot.name})")
        body.append(_agreement_by_ratio(run.results))
    return body


def _fidelity_blocks(results: list, baseline: str | None) -> list[str]:
    """The fidelity table of a part, and its paired table when the baseline ran; none for a run without `full`."""
    if not with_fidelity(results):
        return []
    blocks = [f"Fidelity to full prefill (teacher-forced, see the README):\n\n{fidelity_table(results)}"]
    if baseline:
        paired = fidelity_paired_table(results, baseline)
        blocks.append(f"Fidelity paired against `{baseline}` on the same questions:\n\n{paired}")
        note = (
            "Which measure tells each method from the baseline (|paired difference| / half-width of its 95 % interval)"
        )
        blocks.append(f"{note}:\n\n{resolution_table(results, baseline)}")
    if positions := positions_by_method(results):  # runs from before the positions were stored have none
        note = "Where each method's kl_answer sits along the answer (shares of its total; see eval/kl_mass.py)"
        blocks.append(f"{note}:\n\n{kl_mass_table(positions)}")
    return blocks


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
    ratios = sorted({r.options.ratio for r in results if r.options.selector == "infoflow"})
    blocks = ["Agreement with the full-prefill answer at each ratio, paired against InfoFlow at the same ratio:"]
    for ratio in ratios:
        subset = [r for r in results if r.options.selector == "full" or r.options.effective_ratio == ratio]
        blocks.append(f"*ratio {ratio:g}*\n\n{agreement_table(subset, 'full', f'infoflow@{ratio:g}')}")
    return "\n\n".join(blocks)

"""Tables, plots and the generated Markdown report of a results file."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from infoflow_rag.eval.methods import DEFAULT_RATIO, MethodSpec
from infoflow_rag.eval.metrics import exact_match, token_f1
from infoflow_rag.eval.results import QuestionResult, ResultsRun, current_command, read_results
from infoflow_rag.eval.stats import Estimate, mean_ci, paired_diff, win_tie_loss

DEFAULT_BASELINE = f"infoflow@{DEFAULT_RATIO:g}"


@dataclass(frozen=True)
class Section:
    """A titled block of Markdown in the report."""

    title: str
    body: str


def summary_table(results: Sequence[QuestionResult], n_boot: int = 1000, seed: int = 0) -> str:
    """Markdown table, one row per (dataset, method) in order of first appearance.

    F1 and EM are means x100 with a 95 % bootstrap CI; TTFT and its ratio to ``full`` are medians;
    recompute is the mean recomputed share of context tokens.
    """
    lines = [
        "| Dataset | Method | n | F1 [95% CI] | EM [95% CI] | TTFT ms (median) | TTFT / full (median) | Recompute |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (dataset, method), rows in _by_dataset_method(results).items():
        f1 = mean_ci([r.f1 for r in rows], n_boot=n_boot, seed=seed)
        em = mean_ci([r.em for r in rows], n_boot=n_boot, seed=seed)
        ratios = [r.ttft_ratio for r in rows if r.ttft_ratio is not None]
        ttft_ratio = f"{np.median(ratios):.2f}" if ratios else "n/a"
        ttft_ms = np.median([r.ttft for r in rows]) * 1000
        recompute = np.mean([r.recompute_fraction for r in rows]) * 100
        lines.append(
            f"| {dataset} | {method} | {len(rows)} | {_percent_ci(f1)} | {_percent_ci(em)} | "
            f"{ttft_ms:.1f} | {ttft_ratio} | {recompute:.1f}% |"
        )
    return "\n".join(lines)


def paired_table(
    results: Sequence[QuestionResult], baseline: str = DEFAULT_BASELINE, n_boot: int = 1000, seed: int = 0
) -> str:
    """Markdown table of each method's per-question F1 difference to ``baseline`` (a method key).

    Only questions answered by both enter a row; datasets without the baseline are left out.
    W/T/L counts questions where the method's F1 is above / equal to / below the baseline's.
    """
    groups = _by_dataset_method(results)
    if not any(method == baseline for _, method in groups):
        raise ValueError(f"baseline {baseline!r} is not in the results; choose one of {_methods(results)}")
    lines = [
        f"| Dataset | Method | n | ΔF1 vs {baseline} [95% CI] | W/T/L |",
        "|---|---|---:|---:|---:|",
    ]
    for (dataset, method), rows in groups.items():
        base = {r.id: r.f1 for r in groups.get((dataset, baseline), [])}
        shared = [r for r in rows if r.id in base]
        if method == baseline or not shared:
            continue
        ours, theirs = [r.f1 for r in shared], [base[r.id] for r in shared]
        diff = paired_diff(ours, theirs, n_boot=n_boot, seed=seed)
        lines.append(f"| {dataset} | {method} | {diff.n} | {_signed_ci(diff)} | {win_tie_loss(ours, theirs)} |")
    return "\n".join(lines)


def agreement_table(
    results: Sequence[QuestionResult],
    reference: str = "full",
    baseline: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> str:
    """Markdown table of how closely each method reproduces ``reference``'s answers (a method key).

    Gold F1 can hide differences: a small model's wrong answers score 0 whether or not they changed. What a
    cache-reuse method promises is the answer the reference would give, so each answer is also scored
    (token F1, x100) against the reference's answer on the same question; "same" is the share of identical
    normalised answers. ``baseline`` adds the paired difference of that score to the baseline's.
    """
    groups = _by_dataset_method(results)
    lines = [
        f"| Dataset | Method | n | F1 vs {reference} answer [95% CI] | Same as {reference} |"
        + (f" Δ vs {baseline} [95% CI] | W/T/L |" if baseline else ""),
        "|---|---|---:|---:|---:|" + ("---:|---:|" if baseline else ""),
    ]
    scores = agreement_scores(results, reference)
    answers = {(r.dataset, r.id): r.prediction for r in results if r.method == reference}
    for (dataset, method), rows in groups.items():
        mine = {r.id: scores[r.pair_key] for r in rows if r.pair_key in scores}
        if method == reference or not mine:
            continue
        same = np.mean([exact_match(r.prediction, answers[(r.dataset, r.id)]) for r in rows if r.pair_key in scores])
        same *= 100
        line = f"| {dataset} | {method} | {len(mine)} | {_percent_ci(mean_ci(list(mine.values()), n_boot, seed))} | "
        line += f"{same:.0f}% |"
        if baseline:
            base = {r.id: scores[r.pair_key] for r in groups.get((dataset, baseline), []) if r.pair_key in scores}
            shared = sorted(mine.keys() & base.keys())
            if method == baseline or not shared:
                line += " — | — |"
            else:
                ours, theirs = [mine[i] for i in shared], [base[i] for i in shared]
                diff = paired_diff(ours, theirs, n_boot=n_boot, seed=seed)
                line += f" {_signed_ci(diff)} | {win_tie_loss(ours, theirs)} |"
        lines.append(line)
    return "\n".join(lines)


def agreement_scores(results: Sequence[QuestionResult], reference: str) -> dict[tuple[str, str, str], float]:
    """pair_key -> token F1 of the answer against ``reference``'s answer to the same question (0..1)."""
    answers = {(r.dataset, r.id): r.prediction for r in results if r.method == reference}
    return {
        r.pair_key: token_f1(r.prediction, answers[(r.dataset, r.id)]) for r in results if (r.dataset, r.id) in answers
    }


def plot_agreement(results: Sequence[QuestionResult], path: str | Path, reference: str = "full") -> Path:
    """PNG of mean F1 against the ``reference`` answer by recompute ratio, one curve per method name."""
    scores = agreement_scores(results, reference)
    curves: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.pair_key in scores and r.method != reference:
            curves[_curve_label(r)][r.ratio].append(scores[r.pair_key])
    if not curves:
        raise ValueError(f"no results next to {reference!r} answers to plot")
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, by_ratio in curves.items():
        ratios = sorted(by_ratio)
        ax.plot(ratios, [np.mean(by_ratio[x]) * 100 for x in ratios], marker="o", label=name)
    ax.set(xlabel="recompute ratio", ylabel=f"mean F1 vs {reference} answer (x100)", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def fidelity_table(results: Sequence[QuestionResult], n_boot: int = 1000, seed: int = 0) -> str:
    """Markdown table of fidelity to full prefill (see :mod:`fidelity`), one row per (dataset, method).

    Means with 95 % bootstrap CIs; KL is heavy-tailed, so its median stands beside the mean. Only results
    with the measures (a run that had ``full``) enter.
    """
    lines = [
        "| Dataset | Method | n | kl_answer [95% CI] | kl_answer median | kl_first [95% CI] | top1 % [95% CI] "
        "| gold_nll [95% CI] |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (dataset, method), rows in _by_dataset_method(with_fidelity(results)).items():
        kl = [r.kl_answer for r in rows]
        gold = [r.gold_nll for r in rows if r.gold_nll is not None]
        lines.append(
            f"| {dataset} | {method} | {len(rows)} | {_plain_ci(mean_ci(kl, n_boot, seed))} | {np.median(kl):.3g} | "
            f"{_plain_ci(mean_ci([r.kl_first for r in rows], n_boot, seed))} | "
            f"{_percent_ci(mean_ci([r.top1 for r in rows], n_boot, seed))} | "
            f"{_plain_ci(mean_ci(gold, n_boot, seed)) if gold else 'n/a'} |"
        )
    return "\n".join(lines)


def fidelity_paired_table(
    results: Sequence[QuestionResult], baseline: str = DEFAULT_BASELINE, n_boot: int = 1000, seed: int = 0
) -> str:
    """Markdown table of each method's per-question fidelity minus ``baseline``'s, on the questions both ran.

    Negative Δkl_answer and Δgold_nll and positive Δtop1 mean closer to full prefill than the baseline.
    "closer" counts the questions where the method's kl_answer is below / equal to / above the baseline's.
    """
    groups = _by_dataset_method(with_fidelity(results))
    lines = [
        f"| Dataset | Method | n | Δkl_answer vs {baseline} [95% CI] | closer/tie/further | Δtop1 % [95% CI] "
        "| Δgold_nll [95% CI] |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (dataset, method), rows in groups.items():
        base = {r.id: r for r in groups.get((dataset, baseline), [])}
        pairs = [(r, base[r.id]) for r in rows if r.id in base]
        if method == baseline or not pairs:
            continue
        kl = paired_diff([r.kl_answer for r, _ in pairs], [b.kl_answer for _, b in pairs], n_boot, seed)
        closer = win_tie_loss([-r.kl_answer for r, _ in pairs], [-b.kl_answer for _, b in pairs])
        top1 = paired_diff([r.top1 for r, _ in pairs], [b.top1 for _, b in pairs], n_boot, seed)
        gold = [(r.gold_nll, b.gold_nll) for r, b in pairs if r.gold_nll is not None and b.gold_nll is not None]
        nll = _plain_signed_ci(paired_diff(*zip(*gold, strict=True), n_boot, seed)) if gold else "n/a"
        lines.append(
            f"| {dataset} | {method} | {len(pairs)} | {_plain_signed_ci(kl)} | {closer} | {_signed_ci(top1)} | {nll} |"
        )
    return "\n".join(lines)


def plot_frontier(results: Sequence[QuestionResult], path: str | Path) -> Path:
    """PNG of the speed-fidelity frontier: mean kl_answer (log) against median TTFT / full, one curve per
    method name over its ratios (labelled), ``none`` as a point. Lower left is better."""
    curves: dict[str, dict[float, list[QuestionResult]]] = defaultdict(lambda: defaultdict(list))
    for r in with_fidelity(results):
        if r.ttft_ratio is not None and r.selector != "full":
            curves[_curve_label(r)][r.ratio].append(r)
    if not curves:
        raise ValueError("no results with fidelity measures and a TTFT ratio to plot")
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, by_ratio in curves.items():
        ratios = sorted(by_ratio)
        x = [np.median([r.ttft_ratio for r in by_ratio[q]]) for q in ratios]
        y = [np.mean([r.kl_answer for r in by_ratio[q]]) for q in ratios]
        ax.plot(x, y, marker="o", label=name)
        if len(ratios) > 1:
            for xi, yi, ratio in zip(x, y, ratios, strict=True):
                ax.annotate(f"{ratio:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set(xlabel="TTFT / full prefill (median)", ylabel="mean KL(full ‖ method) over the answer")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def compression_table(results: Sequence[QuestionResult], n_boot: int = 1000, seed: int = 0) -> str:
    """Markdown table of KV compression, one row per (dataset, method) in order of first appearance.

    Each compressed method is measured against its baseline, the same method without compression, on the
    questions both answered (ΔF1 names their number when it is not n): KV saved is ``1 - its total peak KV
    bytes / the baseline's``, ΔF1 the mean per-question F1 difference with a 95 % bootstrap CI. F1 (with CI)
    and EM are means x100, peak KV the mean over questions, TTFT the median.
    """
    groups = _by_dataset_method(results)
    lines = [
        "| Dataset | Method | n | F1 [95% CI] | EM | Peak KV MiB (mean) | KV saved vs baseline | "
        "ΔF1 vs baseline [95% CI] | TTFT s (median) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (dataset, method), rows in groups.items():
        f1 = mean_ci([r.f1 for r in rows], n_boot=n_boot, seed=seed)
        em = np.mean([r.em for r in rows]) * 100
        sizes = [r.kv_bytes for r in rows if r.kv_bytes is not None]
        peak = f"{np.mean(sizes) / 2**20:.2f}" if sizes else "n/a"
        saved, delta = _against_baseline(rows, groups, n_boot, seed)
        ttft = np.median([r.ttft for r in rows])
        lines.append(
            f"| {dataset} | {method} | {len(rows)} | {_percent_ci(f1)} | {em:.1f} | {peak} | {saved} | {delta} | "
            f"{ttft:.3f} |"
        )
    return "\n".join(lines)


def plot_tradeoff(results: Sequence[QuestionResult], path: str | Path) -> Path:
    """PNG of mean F1 against mean TTFT: one panel per dataset, one curve per method name over its ratios."""
    datasets = list(dict.fromkeys(r.dataset for r in results))
    if not datasets:
        raise ValueError("no results to plot")
    fig = Figure(figsize=(5.5 * len(datasets), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    for panel, dataset in enumerate(datasets, start=1):
        ax = fig.add_subplot(1, len(datasets), panel)
        curves: dict[str, dict[float, list[QuestionResult]]] = defaultdict(lambda: defaultdict(list))
        for r in results:
            if r.dataset == dataset:
                curves[_curve_label(r)][r.ratio].append(r)
        for name, by_ratio in curves.items():
            ratios = sorted(by_ratio)
            ttft_ms = [np.mean([r.ttft for r in by_ratio[x]]) * 1000 for x in ratios]
            f1 = [np.mean([r.f1 for r in by_ratio[x]]) * 100 for x in ratios]
            ax.plot(ttft_ms, f1, marker="o", label=name)
            if len(ratios) > 1:
                for x, y, ratio in zip(ttft_ms, f1, ratios, strict=True):
                    ax.annotate(f"{ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(title=dataset, xlabel="mean TTFT (ms)", ylabel="mean F1 (x100)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_niah_heatmap(results: Sequence[QuestionResult], path: str | Path, metric: str = "f1") -> Path:
    """PNG heatmaps of mean ``metric`` (``f1`` or ``em``) by needle depth x context length, one per method."""
    if metric not in ("f1", "em"):
        raise ValueError(f"metric must be 'f1' or 'em', got {metric!r}")
    niah = _niah(results)
    if not niah:
        raise ValueError("no needle-in-a-haystack results (meta with depth and context_tokens) to plot")
    depths = sorted({r.meta["depth"] for r in niah})
    lengths = sorted({r.meta["context_tokens"] for r in niah})
    methods = _methods(niah)
    fig = Figure(figsize=(1.2 + 0.9 * len(lengths) * len(methods), 1.2 + 0.45 * len(depths)), layout="constrained")
    FigureCanvasAgg(fig)
    for panel, method in enumerate(methods, start=1):
        cells: dict[tuple[float, int], list[float]] = defaultdict(list)
        for r in niah:
            if r.method == method:
                cells[(r.meta["depth"], r.meta["context_tokens"])].append(getattr(r, metric))
        grid = np.array([[np.mean(cells[(d, n)]) if cells[(d, n)] else np.nan for n in lengths] for d in depths])
        ax = fig.add_subplot(1, len(methods), panel)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set(title=method, xlabel="context tokens", ylabel="needle depth")
    fig.colorbar(image, ax=fig.axes, label=f"mean {metric}")
    return _save(fig, path)


def write_results_md(
    path: str | Path,
    run: ResultsRun,
    *sections: Section,
    title: str = "Evaluation results",
    command: str | None = None,
) -> Path:
    """Write the Markdown report: commands, model (values as JSON), prompt, then ``sections``.

    ``command``, the command line that generated the report, defaults to this process's.
    """
    model_rows = []
    for key, value in run.header.model_info.items():
        # JSON shows strings' newlines; an unescaped pipe would end the table cell.
        cell = json.dumps(value, ensure_ascii=False).replace("|", "\\|")
        model_rows.append(f"| {key} | {cell} |")
    parts = [
        f"# {title}",
        "<!-- Generated by infoflow_rag.eval.report.write_results_md. Do not edit: regenerate instead. -->",
        "## Run",
        "Report generated by:",
        f"```sh\n{command if command is not None else current_command()}\n```",
        "Results produced by (first run, then each resume):",
        "```sh\n" + "\n".join(run.commands) + "\n```",
        f"Started {run.header.started}; `max_new_tokens` = {run.header.max_new_tokens}.",
        "Model:",
        "| Key | Value |\n|---|---|\n" + "\n".join(model_rows),
        "Prompt template:",
        f"```text\n{run.header.prompt}\n```",
        *(f"## {section.title}\n\n{section.body}" for section in sections),
    ]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return out


def write_report(results_path: str | Path, out_dir: str | Path, baseline: str = DEFAULT_BASELINE) -> Path:
    """The standard report of a results file: ``results.md`` plus its PNGs in ``out_dir``.

    The paired comparison is included when ``baseline`` was run, the compression table when a method
    compressed the KV cache, the NIAH heatmap when NIAH results exist.
    """
    run = read_results(results_path)
    out = Path(out_dir)
    sections = [Section("Accuracy and speed", summary_table(run.results))]
    if any(r.method == baseline for r in run.results):
        sections.append(Section(f"Paired comparison with {baseline}", paired_table(run.results, baseline)))
    if any(r.compress != "none" for r in run.results):
        sections.append(Section("KV compression", compression_table(run.results)))
    if with_fidelity(run.results):
        body = fidelity_table(run.results)
        if any(r.method == baseline for r in with_fidelity(run.results)):
            body += f"\n\nPaired against `{baseline}`:\n\n" + fidelity_paired_table(run.results, baseline)
        sections.append(Section("Fidelity to full prefill (teacher-forced)", body))
    tradeoff = plot_tradeoff(run.results, out / "tradeoff.png")
    sections.append(Section("F1 vs TTFT", f"![F1 vs TTFT]({tradeoff.name})"))
    if _niah(run.results):
        heatmap = plot_niah_heatmap(run.results, out / "niah_heatmap.png")
        sections.append(Section("Needle in a haystack", f"![NIAH heatmap]({heatmap.name})"))
    return write_results_md(out / "results.md", run, *sections)


def _by_dataset_method(results: Sequence[QuestionResult]) -> dict[tuple[str, str], list[QuestionResult]]:
    groups: dict[tuple[str, str], list[QuestionResult]] = {}
    for r in results:
        groups.setdefault((r.dataset, r.method), []).append(r)
    return groups


def _baseline_key(r: QuestionResult) -> str:
    """Key of the uncompressed method a compressed result is compared with."""
    spec = MethodSpec(r.name, r.selector, r.ratio, r.reorder, r.geometry, r.compress, r.keep)
    return spec.uncompressed.key


def _against_baseline(
    rows: list[QuestionResult], groups: dict[tuple[str, str], list[QuestionResult]], n_boot: int, seed: int
) -> tuple[str, str]:
    """The KV-saved and ΔF1 cells of a compression-table row: "—" for a baseline, "n/a" when it was not run."""
    first = rows[0]
    if first.compress == "none":
        return "—", "—"
    by_id = {r.id: r for r in groups.get((first.dataset, _baseline_key(first)), [])}
    shared = [(r, by_id[r.id]) for r in rows if r.id in by_id]
    if not shared:
        return "n/a", "n/a"
    diff = paired_diff([r.f1 for r, _ in shared], [b.f1 for _, b in shared], n_boot=n_boot, seed=seed)
    sized = [(r.kv_bytes, b.kv_bytes) for r, b in shared if r.kv_bytes is not None and b.kv_bytes is not None]
    ours, theirs = sum(a for a, _ in sized), sum(b for _, b in sized)
    # A ratio of totals, so long contexts, which hold most of the memory, weigh most.
    saved = f"{(1 - ours / theirs) * 100:.1f}%" if theirs else "n/a"
    partial = f" on {len(shared)}" if len(shared) < len(rows) else ""  # e.g. the baseline's run was cut short
    return saved, _signed_ci(diff) + partial


def _curve_label(r: QuestionResult) -> str:
    # Compressed runs of one method at several keeps are separate curves over the ratio.
    return r.name if r.compress == "none" else f"{r.name}:{r.keep}"


def _methods(results: Sequence[QuestionResult]) -> list[str]:
    return list(dict.fromkeys(r.method for r in results))


def _niah(results: Sequence[QuestionResult]) -> list[QuestionResult]:
    return [r for r in results if "depth" in r.meta and "context_tokens" in r.meta]


def with_fidelity(results: Sequence[QuestionResult]) -> list[QuestionResult]:
    """The results that carry the fidelity measures (their run had a `full` reference)."""
    return [r for r in results if r.kl_answer is not None]


def _plain_ci(estimate: Estimate) -> str:
    """A small positive quantity (KL, NLL) with its CI, three significant digits."""
    return f"{estimate.mean:.3g} [{estimate.low:.3g}, {estimate.high:.3g}]"


def _plain_signed_ci(estimate: Estimate) -> str:
    return f"{estimate.mean:+.3g} [{estimate.low:+.3g}, {estimate.high:+.3g}]"


def _percent_ci(estimate: Estimate) -> str:
    return f"{estimate.mean * 100:.1f} [{estimate.low * 100:.1f}, {estimate.high * 100:.1f}]"


def _signed_ci(estimate: Estimate) -> str:
    """A difference x100 with its CI, signs always shown."""
    return f"{estimate.mean * 100:+.1f} [{estimate.low * 100:+.1f}, {estimate.high * 100:+.1f}]"


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out

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

from infoflow_rag.eval.methods import DEFAULT_RATIO
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
        lines.append(
            f"| {dataset} | {method} | {diff.n} | {diff.mean * 100:+.1f} [{diff.low * 100:+.1f}, "
            f"{diff.high * 100:+.1f}] | {win_tie_loss(ours, theirs)} |"
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
                curves[r.name][r.ratio].append(r)
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

    The paired comparison is included when ``baseline`` was run, the NIAH heatmap when NIAH results exist.
    """
    run = read_results(results_path)
    out = Path(out_dir)
    sections = [Section("Accuracy and speed", summary_table(run.results))]
    if any(r.method == baseline for r in run.results):
        sections.append(Section(f"Paired comparison with {baseline}", paired_table(run.results, baseline)))
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


def _methods(results: Sequence[QuestionResult]) -> list[str]:
    return list(dict.fromkeys(r.method for r in results))


def _niah(results: Sequence[QuestionResult]) -> list[QuestionResult]:
    return [r for r in results if "depth" in r.meta and "context_tokens" in r.meta]


def _percent_ci(estimate: Estimate) -> str:
    return f"{estimate.mean * 100:.1f} [{estimate.low * 100:.1f}, {estimate.high * 100:.1f}]"


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out

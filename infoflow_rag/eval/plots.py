"""The report's PNG plots: F1 and fidelity against TTFT, agreement by ratio, the NIAH heatmap."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from infoflow_rag.eval.results import QuestionResult
from infoflow_rag.eval.tables import agreement_scores, method_keys, with_fidelity
from infoflow_rag.files import atomic_write


def plot_agreement(results: Sequence[QuestionResult], path: str | Path, reference: str = "full") -> Path:
    """PNG of mean F1 against the ``reference`` answer by recompute ratio, one curve per method name."""
    scores = agreement_scores(results, reference)
    curves: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.pair_key in scores and r.method != reference:
            curves[_curve_label(r)][r.options.effective_ratio].append(scores[r.pair_key])
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


def plot_frontier(results: Sequence[QuestionResult], path: str | Path) -> Path:
    """PNG of the speed-fidelity frontier: mean kl_answer (log) against median TTFT / full, one curve per
    method name over its ratios (labelled), ``none`` as a point. Lower left is better."""
    curves: dict[str, dict[float, list[QuestionResult]]] = defaultdict(lambda: defaultdict(list))
    for r in with_fidelity(results):
        if r.ttft_ratio is not None and r.options.selector != "full":
            curves[_curve_label(r)][r.options.effective_ratio].append(r)
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
                curves[_curve_label(r)][r.options.effective_ratio].append(r)
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
    niah = niah_results(results)
    if not niah:
        raise ValueError("no needle-in-a-haystack results (meta with depth and context_tokens) to plot")
    depths = sorted({r.meta["depth"] for r in niah})
    lengths = sorted({r.meta["context_tokens"] for r in niah})
    methods = method_keys(niah)
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


def _curve_label(r: QuestionResult) -> str:
    # Compressed runs of one method at several keeps are separate curves over the ratio.
    return r.name if r.options.compress == "none" else f"{r.name}:{r.options.keep}"


def niah_results(results: Sequence[QuestionResult]) -> list[QuestionResult]:
    return [r for r in results if "depth" in r.meta and "context_tokens" in r.meta]


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, format=out.suffix.lstrip(".") or "png", dpi=120)  # the format the name asks for, as before
    atomic_write(out, image.getbuffer())  # a kill leaves the old plot, never half of one
    return out

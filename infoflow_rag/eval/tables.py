"""The report's Markdown tables of a results file: accuracy and speed, paired differences, agreement with a
reference answer, fidelity to full prefill, KV compression against its baseline."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from infoflow_rag.engine.selection import DEFAULT_RATIO
from infoflow_rag.eval.metrics import exact_match, token_f1
from infoflow_rag.eval.results import QuestionResult
from infoflow_rag.eval.stats import Estimate, log_kl_diff, mean_ci, paired_diff, shared_ids, win_tie_loss

DEFAULT_BASELINE = f"infoflow@{DEFAULT_RATIO:g}"


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
        raise ValueError(f"baseline {baseline!r} is not in the results; choose one of {method_keys(results)}")
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
            shared = shared_ids(mine, base)
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

    Negative Δkl_answer and Δgold_nll, a kl ratio below 1 and positive Δtop1 mean closer to full prefill than
    the baseline. The kl ratio is the geometric mean of the per-question ratios (robust to KL's heavy tail).
    "closer" counts the questions where the method's kl_answer is below / equal to / above the baseline's.
    """
    groups = _by_dataset_method(with_fidelity(results))
    lines = [
        f"| Dataset | Method | n | Δkl_answer vs {baseline} [95% CI] | kl_answer ratio (geometric) [95% CI] "
        "| closer/tie/further | Δtop1 % [95% CI] | Δgold_nll [95% CI] |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (dataset, method), rows in groups.items():
        base = {r.id: r for r in groups.get((dataset, baseline), [])}
        pairs = [(r, base[r.id]) for r in rows if r.id in base]
        if method == baseline or not pairs:
            continue
        kl = paired_diff([r.kl_answer for r, _ in pairs], [b.kl_answer for _, b in pairs], n_boot, seed)
        log_ratio = log_kl_diff([r.kl_answer for r, _ in pairs], [b.kl_answer for _, b in pairs], n_boot, seed)
        ratio = f"{10**log_ratio.mean:.2f} [{10**log_ratio.low:.2f}, {10**log_ratio.high:.2f}]"
        closer = win_tie_loss([-r.kl_answer for r, _ in pairs], [-b.kl_answer for _, b in pairs])
        top1 = paired_diff([r.top1 for r, _ in pairs], [b.top1 for _, b in pairs], n_boot, seed)
        gold = [(r.gold_nll, b.gold_nll) for r, b in pairs if r.gold_nll is not None and b.gold_nll is not None]
        nll = _plain_signed_ci(paired_diff(*zip(*gold, strict=True), n_boot, seed)) if gold else "n/a"
        lines.append(
            f"| {dataset} | {method} | {len(pairs)} | {_plain_signed_ci(kl)} | {ratio} | {closer} | {_signed_ci(top1)} "
            f"| {nll} |"
        )
    return "\n".join(lines)


def resolution_table(
    results: Sequence[QuestionResult], baseline: str = DEFAULT_BASELINE, n_boot: int = 1000, seed: int = 0
) -> str:
    """Which measure tells each method from ``baseline``: |paired mean difference| / half-width of its 95 %
    interval, per measure, on the questions both ran (above 1: the interval excludes 0). The measures share the
    questions, so a larger number is a measure that resolves the same difference with fewer questions."""
    agree = agreement_scores(results, "full")
    measures = {
        "gold F1": lambda r: r.f1,
        "agreement": lambda r: agree.get(r.pair_key),
        "kl_answer": lambda r: r.kl_answer,
        "log kl_answer": lambda r: r.kl_answer,
        "top1": lambda r: r.top1,
        "gold_nll": lambda r: r.gold_nll,
    }
    groups = _by_dataset_method(with_fidelity(results))
    lines = [
        f"| Dataset | Method vs {baseline} | n | " + " | ".join(measures) + " |",
        "|---|---|---:|" + "---:|" * len(measures),
    ]
    for (dataset, method), rows in groups.items():
        base = {r.id: r for r in groups.get((dataset, baseline), [])}
        pairs = [(r, base[r.id]) for r in rows if r.id in base]
        if method in (baseline, "full") or not pairs:
            continue
        cells = []
        for name, get in measures.items():
            both = [(get(r), get(b)) for r, b in pairs if get(r) is not None and get(b) is not None]
            diff = log_kl_diff if name == "log kl_answer" else paired_diff
            resolution = diff(*zip(*both, strict=True), n_boot, seed).resolution if both else None
            cells.append("n/a" if resolution is None else f"{resolution:.2f}")
        lines.append(f"| {dataset} | {method} | {len(pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def _by_dataset_method(results: Sequence[QuestionResult]) -> dict[tuple[str, str], list[QuestionResult]]:
    groups: dict[tuple[str, str], list[QuestionResult]] = {}
    for r in results:
        groups.setdefault((r.dataset, r.method), []).append(r)
    return groups


def _baseline_key(r: QuestionResult) -> str:
    """Key of the uncompressed method a compressed result is compared with."""
    return r.spec.uncompressed.key


def _against_baseline(
    rows: list[QuestionResult], groups: dict[tuple[str, str], list[QuestionResult]], n_boot: int, seed: int
) -> tuple[str, str]:
    """The KV-saved and ΔF1 cells of a compression-table row: "—" for a baseline, "n/a" when it was not run."""
    first = rows[0]
    if first.options.compress == "none":
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


def method_keys(results: Sequence[QuestionResult]) -> list[str]:
    return list(dict.fromkeys(r.method for r in results))


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

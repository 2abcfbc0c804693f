"""The report's verdicts: each comparison the project is judged on, stated in words from the paired numbers."""

from __future__ import annotations

from collections.abc import Sequence

from ..engine.selection import DEFAULT_RATIO
from .results import QuestionResult
from .stats import Estimate, log_kl_diff, paired_diff, shared_ids, win_tie_loss
from .tables import agreement_scores, with_fidelity


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
        ids = shared_ids(by_method[method], by_method[other])
        if not ids:
            lines.append(f"- `{method}` vs `{other}`: not run on the same questions")
            continue
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
        ids = shared_ids(agree[method], agree[other])
        if not ids:
            continue  # no question to pair on
        ours, theirs = [agree[method][i] for i in ids], [agree[other][i] for i in ids]
        diff = paired_diff(ours, theirs)
        lines.append(
            f"- agreement with the full-prefill answer (F1 of each answer against full's), `{method}` vs `{other}`: "
            f"{100 * sum(ours) / len(ids):.1f} vs {100 * sum(theirs) / len(ids):.1f}, paired difference "
            f"{100 * diff.mean:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"
            + (" (the interval excludes 0)" if diff.low > 0 or diff.high < 0 else " (the interval includes 0)")
        )
    lines += fidelity_verdict(results, method)
    ids = sorted(by_method.get("none", {}).keys() & by_method["full"].keys())
    if ids:
        none_f1 = sum(by_method["none"][i] for i in ids) / len(ids)
        full_f1 = sum(by_method["full"][i] for i in ids) / len(ids)
        lines.append(
            f"- headroom: `none` (cached passages, nothing recomputed) scores F1 {100 * none_f1:.1f} vs full "
            f"{100 * full_f1:.1f} on {len(ids)} questions. Where that gap is inside the intervals above, this "
            "model and slice cannot tell the selectors apart, whatever the verdicts say."
        )
    return "\n".join(lines)


def fidelity_verdict(results: list, method: str) -> list[str]:
    """``method`` against each other method on kl_answer (lower is closer to full prefill), paired per question."""
    kl: dict[str, dict[str, float]] = {}
    for r in results:
        if r.kl_answer is not None and r.options.selector != "full":
            kl.setdefault(r.method, {})[r.id] = r.kl_answer
    lines = []
    for other in sorted(kl.keys() - {method}):
        ids = shared_ids(kl.get(method, {}), kl[other])
        if not ids:
            continue
        ours, theirs = [kl[method][i] for i in ids], [kl[other][i] for i in ids]
        diff, phrase = kl_comparison(ours, theirs)
        closer = sum(a < b for a, b in zip(ours, theirs, strict=True))
        word = "closer to full" if diff.high < 0 else "further from full" if diff.low > 0 else "no clear difference"
        lines.append(
            f"- fidelity, `{method}` vs `{other}` on {len(ids)} questions: {phrase}, closer on {closer} of "
            f"{len(ids)} — {word}"
        )
    return lines


def entropy_verdict(results: list, baseline: str) -> str:
    """InfoKV against SnapKV (the same attention signal without entropy and layer evolution) at each keep:
    paired differences in gold F1 and in agreement with the uncompressed ``baseline`` answer."""
    agree = agreement_scores(results, baseline)
    by_key = {r.pair_key: r for r in results}
    lines = []
    for keep in sorted({r.options.keep for r in results if r.options.compress == "infokv"}):
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


def trial_verdict(results: list, candidate: str, rivals: Sequence[str], frontier: Sequence[str] = ()) -> str:
    """A new selector against the methods it must beat, on fidelity to full prefill, question by question.

    The bar against each of ``rivals`` (same budget): a lower kl_answer with the paired 95 % interval excluding
    0, and a higher top1. Against ``frontier`` (more budget) it need only be at least as close: a mean kl_answer
    difference not above 0.
    """
    by_method: dict[str, dict[str, QuestionResult]] = {}
    for r in with_fidelity(results):
        by_method.setdefault(r.method, {})[r.id] = r
    if candidate not in by_method:
        return f"No verdict: `{candidate}` was not run with `full`."
    lines, missed = [], []
    for rival in (*rivals, *frontier):
        ids = shared_ids(by_method[candidate], by_method.get(rival, {}))
        if not ids:
            missed += [rival] if rival in rivals else []
            lines.append(f"- `{candidate}` vs `{rival}`: not run on the same questions")
            continue
        ours, theirs = [by_method[candidate][i] for i in ids], [by_method[rival][i] for i in ids]
        kl, phrase = kl_comparison([r.kl_answer for r in ours], [r.kl_answer for r in theirs])
        top1 = paired_diff([r.top1 for r in ours], [r.top1 for r in theirs])
        if rival in rivals:
            meets = kl.high < 0 and top1.mean > 0
            missed += [] if meets else [rival]
            word = "meets the bar" if meets else "misses the bar"
        else:
            word = "at least as close" if kl.mean <= 0 else "further from full"
        lines.append(
            f"- `{candidate}` vs `{rival}` on {len(ids)} questions: {phrase}; top1 paired difference "
            f"{100 * top1.mean:+.1f} [{100 * top1.low:+.1f}, {100 * top1.high:+.1f}] points — {word}"
        )
    if rivals:
        outcome = "met" if not missed else "NOT met (missed against " + ", ".join(f"`{m}`" for m in missed) + ")"
        lines.append(
            "- the bar (kl_answer lower than every rival's with the paired interval excluding 0, and top1 higher): "
            + outcome
        )
    return "\n".join(lines)


def kl_comparison(ours: Sequence[float], theirs: Sequence[float]) -> tuple[Estimate, str]:
    """Per-question kl_answer of two methods: the paired mean difference, and the phrase every verdict states it
    in (both means, that difference with its interval, and the geometric-mean ratio with its interval)."""
    diff, log_ratio = paired_diff(ours, theirs), log_kl_diff(ours, theirs)
    return diff, (
        f"kl_answer {sum(ours) / len(ours):.3g} vs {sum(theirs) / len(theirs):.3g}, paired difference "
        f"{diff.mean:+.3g} [{diff.low:+.3g}, {diff.high:+.3g}], geometric ratio {10**log_ratio.mean:.2f} "
        f"[{10**log_ratio.low:.2f}, {10**log_ratio.high:.2f}]"
    )

"""Two methods of one results file side by side, question by question: how far each is from full prefill
(kl_answer, paired difference with its 95 % bootstrap interval, the per-question geometric ratio), how often each
gives full prefill's answer (the normalised answer, as the report's "Same as full"), and top1. The eval report
pairs every method with one baseline; this pairs any two, e.g. an option's two values (the scoring pass in bfloat16
against float32, README):

    .venv/bin/python scripts/paired_methods.py docs/score-dtype/qwen2.5-0.5b/results.jsonl \\
        'sinkflow+leadin@0.15' 'sinkflow+leadin;score_dtype="bfloat16"@0.15'

(method keys as the file spells them: those runs were made while float32 was the default).
"""

from __future__ import annotations

import argparse
import sys

from infoflow_rag.eval.metrics import exact_match
from infoflow_rag.eval.results import QuestionResult, read_results
from infoflow_rag.eval.stats import log_kl_diff, paired_diff, shared_ids, win_tie_loss


def compare(results: list[QuestionResult], first: str, second: str) -> dict:
    """``second`` against ``first`` on the questions both answered and full prefill answered too."""
    by = {}
    for r in results:
        by.setdefault(r.method, {})[(r.dataset, r.id)] = r
    for method in (first, second, "full"):
        if method not in by:
            raise SystemExit(f"no results of {method!r} in the file; it has {', '.join(sorted(by))}")
    ids = [i for i in shared_ids(by[first], by[second]) if i in by["full"]]
    ids = [i for i in ids if by[first][i].kl_answer is not None and by[second][i].kl_answer is not None]
    if not ids:
        raise SystemExit(
            f"no question has fidelity measures for both {first!r} and {second!r}; run them in one `eval run` with full"
        )
    a = [by[first][i].kl_answer for i in ids]
    b = [by[second][i].kl_answer for i in ids]
    ratio = log_kl_diff(b, a)
    return {
        "n": len(ids),
        "kl_answer": (sum(a) / len(ids), sum(b) / len(ids)),
        "difference": paired_diff(b, a),  # second - first; below 0: second closer to full prefill
        "geometric_ratio": tuple(10**x for x in (ratio.mean, ratio.low, ratio.high)),
        "closer_tie_further": win_tie_loss(a, b),  # second closer where its KL is lower
        "full_answer": tuple(
            int(sum(exact_match(m[i].prediction, by["full"][i].prediction) for i in ids))
            for m in (by[first], by[second])
        ),
        "top1": tuple(sum(m[i].top1 for i in ids) / len(ids) for m in (by[first], by[second])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a results file of `infoflow-rag eval run` with full prefill in it")
    parser.add_argument("first", help="a method key of the file, e.g. 'infoflow@0.15'")
    parser.add_argument("second", help="the method compared with it")
    args = parser.parse_args(argv)
    c = compare(read_results(args.results).results, args.first, args.second)
    d, (g, g_low, g_high) = c["difference"], c["geometric_ratio"]
    print(f"{c['n']} questions; kl_answer {c['kl_answer'][0]:.4f} -> {c['kl_answer'][1]:.4f}, difference "
          f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}], per question {g:.3f}x [{g_low:.3f}, {g_high:.3f}], "
          f"closer/tie/further {c['closer_tie_further']}; full prefill's answer on {c['full_answer'][0]} -> "
          f"{c['full_answer'][1]}; top1 {100 * c['top1'][0]:.1f} -> {100 * c['top1'][1]:.1f} %")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

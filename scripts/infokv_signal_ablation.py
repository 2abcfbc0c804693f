"""Which of InfoKV's signals helps? One signal at a time, on development questions only.

HotpotQA dev questions 0-19 (never reported elsewhere), qwen2.5-0.5b, InfoFlow 15 % recompute, then
compression at ``keep`` with SnapKV, InfoKV at its default weights, and InfoKV on one signal alone.
Each answer is scored against the uncompressed answer (agreement, token F1) and the gold answers.

    .venv/bin/python scripts/infokv_signal_ablation.py --keep 0.25 --out runs/infokv/keep0.25.jsonl
"""

import argparse
import json

from infoflow_rag.engine import Engine
from infoflow_rag.eval.datasets import load_hotpotqa
from infoflow_rag.eval.metrics import best_f1, clean_prediction, token_f1
from infoflow_rag.eval.runner import DEFAULT_PROMPT
from infoflow_rag.eval.stats import paired_diff

VARIANTS = {
    "snapkv": ("snapkv", {}),
    "infokv-default": ("infokv", {}),
    "entropy-only": ("infokv", {"attention": 0.0, "entropy": 1.0, "evolution": 0.0}),
    "evolution-only": ("infokv", {"attention": 0.0, "entropy": 0.0, "evolution": 1.0}),
    "attn+entropy-0.1": ("infokv", {"attention": 0.9, "entropy": 0.1, "evolution": 0.0}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--out", required=True, help="JSON lines, one per question")
    args = parser.parse_args()
    engine = Engine.load("qwen2.5-0.5b", lead_in=None)
    rows = []
    with open(args.out, "w", encoding="utf-8") as out:
        for ex in load_hotpotqa("passage", start=0, limit=args.questions):
            kvs = engine.prefill(ex.passages)
            base = clean_prediction(engine.answer(ex.question, kvs, template=DEFAULT_PROMPT).answer)
            row = {"id": ex.id, "base": base, "base_f1": best_f1(base, ex.answers)}
            for name, (policy, weights) in VARIANTS.items():
                answer = engine.answer(
                    ex.question, kvs, template=DEFAULT_PROMPT, compress=policy, keep=args.keep, compress_options=weights
                )
                pred = clean_prediction(answer.answer)
                row[name] = {"agree": token_f1(pred, base), "f1": best_f1(pred, ex.answers)}
            out.write(json.dumps(row) + "\n")
            out.flush()
            rows.append(row)
    print(
        f"{len(rows)} questions, keep {args.keep}; uncompressed gold F1 {100 * _mean(r['base_f1'] for r in rows):.1f}"
    )
    for name in VARIANTS:
        agree = [r[name]["agree"] for r in rows]
        diff = paired_diff(agree, [r["snapkv"]["agree"] for r in rows])
        print(
            f"{name:18s} agreement {100 * _mean(agree):5.1f}  gold F1 {100 * _mean(r[name]['f1'] for r in rows):5.1f}"
            f"  vs snapkv {100 * diff.mean:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"
        )


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


if __name__ == "__main__":
    main()

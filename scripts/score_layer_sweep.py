"""Which layers should score the context? InfoFlow at 15 % with other scoring layers, development questions only.

HotpotQA dev questions 0..N-1 (never reported elsewhere), qwen2.5-0.5b. Each question is answered by full
prefill, then by InfoFlow with each set of scoring layers; every answer is scored against full's answer
(agreement, token F1) and the gold answers, and paired against the default layers.

    .venv/bin/python scripts/score_layer_sweep.py --questions 30 --out runs/layers/dev.jsonl
"""

import argparse
import json

from infoflow_rag.engine import Engine
from infoflow_rag.eval.datasets import load_hotpotqa
from infoflow_rag.eval.metrics import best_f1, clean_prediction, token_f1
from infoflow_rag.eval.runner import DEFAULT_PROMPT
from infoflow_rag.eval.stats import paired_diff


def layer_sets(engine: Engine) -> dict[str, list[int]]:
    n = engine.num_layers
    return {
        "default": engine.score_layers,
        "early": [2, 3, 4, 5],
        "middle": list(range(n // 2 - 2, n // 2 + 2)),
        "last": list(range(n - 4, n)),
        "all": list(range(n)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--out", required=True, help="JSON lines, one per question")
    args = parser.parse_args()
    engine = Engine("qwen2.5-0.5b")
    sets = layer_sets(engine)
    rows = []
    with open(args.out, "w", encoding="utf-8") as out:
        for ex in load_hotpotqa("passage", start=0, limit=args.questions):
            full = clean_prediction(
                engine.answer(ex.question, ex.passages, selector="full", template=DEFAULT_PROMPT).answer
            )
            kvs = engine.prefill(ex.passages)
            row = {"id": ex.id, "full": full, "full_f1": best_f1(full, ex.answers)}
            for name, layers in sets.items():
                answer = engine.answer(
                    ex.question, kvs, ratio=args.ratio, template=DEFAULT_PROMPT, selector_options={"layers": layers}
                )
                pred = clean_prediction(answer.answer)
                row[name] = {"agree": token_f1(pred, full), "f1": best_f1(pred, ex.answers)}
            out.write(json.dumps(row) + "\n")
            out.flush()
            rows.append(row)
    print(
        f"{len(rows)} questions, ratio {args.ratio}; full prefill gold F1 {100 * _mean(r['full_f1'] for r in rows):.1f}"
    )
    for name, layers in sets.items():
        agree = [r[name]["agree"] for r in rows]
        diff = paired_diff(agree, [r["default"]["agree"] for r in rows])
        print(
            f"{name:8s} layers {layers[0]}-{layers[-1]}: agreement with full {100 * _mean(agree):5.1f}  "
            f"gold F1 {100 * _mean(r[name]['f1'] for r in rows):5.1f}  "
            f"vs default {100 * diff.mean:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"
        )


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


if __name__ == "__main__":
    main()

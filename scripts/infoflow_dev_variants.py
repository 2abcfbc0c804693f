"""InfoFlow variants on the development slice: which layers score the context, which prompt rows score it.

HotpotQA dev questions 0..N-1 (never reported elsewhere), qwen2.5-0.5b, ratio 0.15. Each question is answered
by full prefill, then by InfoFlow in each variant; every answer is scored against full's answer (agreement,
token F1) and against the gold answers, then paired against the default variant. One JSON line per
(question, variant); a rerun skips what is on file, so variants can be added to a finished run.

    .venv/bin/python scripts/infoflow_dev_variants.py --questions 60 --variants default,last,block \\
        --out runs/dev/variants.jsonl
"""

import argparse
import json
from pathlib import Path

from infoflow_rag.engine import Engine
from infoflow_rag.eval.datasets import load_hotpotqa
from infoflow_rag.eval.metrics import best_f1, clean_prediction, token_f1
from infoflow_rag.eval.runner import DEFAULT_PROMPT
from infoflow_rag.eval.stats import paired_diff


def variants(engine: Engine) -> dict[str, dict]:
    """Name -> extra ``engine.answer`` options; "default" is the published setting every other is paired with."""
    n = engine.num_layers
    layers = {
        "early": [2, 3, 4, 5],
        "middle": list(range(n // 2 - 2, n // 2 + 2)),
        "last": list(range(n - 4, n)),
        "all": list(range(n)),
    }
    return {
        "default": {},
        **{name: {"selector_options": {"layers": chosen}} for name, chosen in layers.items()},
        "block": {"score_rows": "block"},  # the whole question block scores, not only the raw question
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--variants", default="default,early,middle,last,all,block")
    parser.add_argument("--out", required=True, help="JSON lines, one per (question, variant); resumed")
    args = parser.parse_args()
    engine = Engine.load("qwen2.5-0.5b", lead_in=None)
    every = variants(engine)
    chosen = args.variants.split(",")
    if unknown := [v for v in chosen if v not in every]:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(every)}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _read(out_path)
    examples = load_hotpotqa("passage", start=0, limit=args.questions)
    with out_path.open("a", encoding="utf-8") as out:

        def record(ex, variant: str, pred: str, full: str) -> None:
            row = {"id": ex.id, "variant": variant, "prediction": pred, "f1": best_f1(pred, ex.answers)}
            row["agree"] = token_f1(pred, full)
            out.write(json.dumps(row) + "\n")
            out.flush()
            done[(ex.id, variant)] = row

        for ex in examples:
            todo = [v for v in chosen if (ex.id, v) not in done]
            if not todo:
                continue
            if (ex.id, "full") not in done:
                answer = engine.answer(ex.question, ex.passages, selector="full", template=DEFAULT_PROMPT).answer
                pred = clean_prediction(answer)
                record(ex, "full", pred, pred)
            full = done[(ex.id, "full")]["prediction"]
            kvs = engine.prefill(ex.passages)
            for variant in todo:
                options = {"ratio": args.ratio, "template": DEFAULT_PROMPT, **every[variant]}
                record(ex, variant, clean_prediction(engine.answer(ex.question, kvs, **options).answer), full)
    _summary([ex.id for ex in examples], chosen, done, args.ratio)


def _read(path: Path) -> dict[tuple[str, str], dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {(r["id"], r["variant"]): r for r in rows}


def _summary(ids: list[str], chosen: list[str], done: dict, ratio: float) -> None:
    full_f1 = [done[(i, "full")]["f1"] for i in ids]
    print(f"{len(ids)} questions, ratio {ratio}; full prefill gold F1 {100 * sum(full_f1) / len(ids):.1f}")
    for variant in chosen:
        agree = [done[(i, variant)]["agree"] for i in ids]
        gold = [done[(i, variant)]["f1"] for i in ids]
        vs_agree = paired_diff(agree, [done[(i, "default")]["agree"] for i in ids])
        vs_gold = paired_diff(gold, [done[(i, "default")]["f1"] for i in ids])
        print(
            f"{variant:8s} agreement with full {100 * sum(agree) / len(ids):5.1f} "
            f"(vs default {_ci(vs_agree)})  gold F1 {100 * sum(gold) / len(ids):5.1f} (vs default {_ci(vs_gold)})"
        )


def _ci(d) -> str:
    return f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"


if __name__ == "__main__":
    main()

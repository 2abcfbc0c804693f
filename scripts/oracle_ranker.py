"""Selector study, round 9: how well cheap per-token features predict the round-8 effect oracle's picks, and the
linear ranker fitted to them (the ``ranker`` candidate of selector_study.py). Development questions 0-44 only.

    .venv/bin/python scripts/oracle_ranker.py --features /tmp/oracle-features.json   # one prepare per question
    .venv/bin/python scripts/oracle_ranker.py --features /tmp/oracle-features.json --fit

Labels: the iterated effect oracle's picks (``patch:effect×5`` in docs/stale-gap.jsonl). Features per stale
passage token: log InfoFlow score, log CacheBlend layer-1 deviation, among the passage's first 8 tokens, log(1 +
offset), relative offset, log of the passage's mean score, the passage's distance from the question, and the
prefill signals (entropy, evolution; stored with the KV, not reachable by a selector, so not in the ranker).
``--fit`` prints each feature's AUC, a logistic regression fitted on questions 0-29 with its AUC on 30-44 and
its top-budget overlap with the oracle against sinkflow's, and the weights fitted on all 45 in the units the
``study-ranker`` selector takes (standardisation folded in).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

STALE_GAP = Path(__file__).parent.parent / "docs" / "stale-gap.jsonl"
NAMES = ("log score", "log dev1", "head8", "log1p off", "reloff", "log passage rel", "from_q", "entropy", "evolution")
RANKER = NAMES[:7]  # what a selector can see at query time
TRAIN = 30  # questions 0-29 fit, 30-44 test


def collect(out: Path) -> None:
    """One record per stale passage token of dev questions 0-44: features, oracle label, sinkflow membership."""
    from selector_study import token_features

    from infoflow_rag.engine import Engine, query
    from infoflow_rag.engine.selection import recomputable_passages
    from infoflow_rag.eval.datasets import load_hotpotqa
    from infoflow_rag.eval.runner import DEFAULT_PROMPT

    rows = [json.loads(line) for line in STALE_GAP.read_text(encoding="utf-8").splitlines()]
    oracle = {r["id"]: set(r["picks"]) for r in rows if r["variant"] == "patch:effect×5"}
    sinkflow = {r["id"]: set(r["picks"]) for r in rows if r["variant"] == "sinkflow"}
    engine = Engine.load("qwen2.5-0.5b", lead_in=None)
    records = []
    for number, ex in enumerate(load_hotpotqa("passage", start=0, limit=45)):
        kvs = engine.prefill(ex.passages)
        prep = engine.prepare(ex.question, kvs, selector="none", template=DEFAULT_PROMPT, max_new_tokens=32)
        probe = query.probe(engine, prep.placed, prep.layout, prep.options.score_dtype)
        features = token_features(prep.placed, probe, engine.score_layers, RANKER)  # (N, len(RANKER))
        stale = recomputable_passages(prep.placed)
        for passage, start, end in stale:
            signals = kvs[passage].signals
            for i in range(start, end):
                records.append(
                    {
                        "q": number,
                        "label": int(i in oracle[ex.id]),
                        "sink": int(i in sinkflow[ex.id]),
                        "features": features[i].tolist()
                        + [float(signals["entropy"][i - start]), float(signals["evolution"][i - start])],
                    }
                )
        print(number, flush=True)
    out.write_text(json.dumps(records), encoding="utf-8")


def auc(values: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive ranks above a random negative (Mann-Whitney)."""
    ranks = np.empty(len(values))
    ranks[values.argsort()] = np.arange(1, len(values) + 1)
    pos = labels.sum()
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(labels) - pos)))


def logistic(z: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 3000, lr: float = 0.5) -> np.ndarray:
    """Weights of an L2-regularised logistic regression on standardised features, by gradient descent."""
    w, b = np.zeros(z.shape[1]), 0.0
    for _ in range(steps):
        g = 1 / (1 + np.exp(-(z @ w + b))) - y
        w -= lr * (z.T @ g / len(y) + l2 * w)
        b -= lr * g.mean()
    return w


def top_overlap(values: np.ndarray, labels: np.ndarray, q: np.ndarray, questions: np.ndarray) -> float:
    """Mean share of the oracle's picks among each question's top-(oracle budget) tokens by ``values``."""
    shares = []
    for question in questions:
        at = q == question
        top = np.argsort(-values[at])[: labels[at].sum()]
        shares.append(labels[at][top].mean())
    return float(np.mean(shares))


def fit(path: Path) -> None:
    records = json.loads(path.read_text(encoding="utf-8"))
    x = np.array([r["features"] for r in records])
    y, q = np.array([r["label"] for r in records]), np.array([r["q"] for r in records])
    sink = np.array([r["sink"] for r in records], dtype=float)
    print(f"{len(y)} tokens, {y.sum()} oracle picks, {len(set(q))} questions")
    for j, name in enumerate(NAMES):
        print(f"AUC {name}: {auc(x[:, j], y):.3f}")
    print(f"AUC sinkflow membership: {auc(sink, y):.3f}")
    cols = x[:, : len(RANKER)]
    z = (cols - cols.mean(0)) / (cols.std(0) + 1e-9)
    train, test = q < TRAIN, q >= TRAIN
    w = logistic(z[train], y[train])
    test_q = np.unique(q[test])
    print(f"ranker fitted on 0-{TRAIN - 1}: AUC on {TRAIN}-44 {auc(z[test] @ w, y[test]):.3f}")
    print(
        f"top-budget overlap with the oracle on {TRAIN}-44: ranker {top_overlap(z @ w, y, q, test_q):.3f}, "
        f"sinkflow {top_overlap(sink + 1e-3 * z[:, 0], y, q, test_q):.3f}, "
        f"InfoFlow score {top_overlap(cols[:, 0], y, q, test_q):.3f}"
    )
    every = logistic(z, y) / (cols.std(0) + 1e-9)  # fitted on all 45, in raw feature units
    print(json.dumps({name: round(float(v), 4) for name, v in zip(RANKER, every, strict=True)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True, help="JSON of per-token records (written unless --fit)")
    parser.add_argument("--fit", action="store_true", help="fit and report on the records on file")
    args = parser.parse_args()
    (fit if args.fit else collect)(Path(args.features))


if __name__ == "__main__":
    main()

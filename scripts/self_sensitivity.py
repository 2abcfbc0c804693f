"""Selector study, round 10: does the cached path's own sensitivity find the effect oracle's picks? (development
questions 0-44 for the features, their labels from round 8.)

The round-8 oracle ranks tokens by <full - stale, d KL(full || cache) / d entry>: it needs full prefill. A selector
has only the stale cache. What it can differentiate is the cached path's own first-token distribution q: to second
order, moving the cache by delta moves q by KL(q || q') ~ 1/2 delta^T F delta, with F the Fisher information
E_{y~q}[g_y g_y^T], g_y = d log q(y) / d cache. Per cached token and layer this script stores

  fisher   sum over q's top-4 tokens of q(y) |g_y|^2 (the diagonal of F on the token's entries, truncated)
  top1     |g_{y1}|^2 for q's greedy token
  margin   |g_{y1} - g_{y2}|^2: how fast the greedy choice's lead over the runner-up moves
  qnll     |d NLL(question block) / d entry|^2: how much the question's own tokens read the token

and the InfoFlow score, sinkflow's picks and the oracle's labels, then reports each signal's AUC against the
oracle's picks and its top-budget overlap with them (as oracle_ranker.py does for the round-9 features).
``--kl`` runs the library's selectors and the sensitivity rankings (layers 1 on, times InfoFlow's score, with and
without sinkflow's head tokens) at 15 % on fresh development questions, teacher-forced as stale_gap.py does;
``--cost`` times the one pass a selector would add against sinkflow's scoring and recompute.

    .venv/bin/python scripts/self_sensitivity.py --features /tmp/self-sensitivity   # one backward set per question
    .venv/bin/python scripts/self_sensitivity.py --features /tmp/self-sensitivity --report
    .venv/bin/python scripts/self_sensitivity.py --kl docs/selector-study-sensitivity.jsonl --start 75 --questions 40
    .venv/bin/python scripts/self_sensitivity.py --kl docs/selector-study-sensitivity.jsonl --summary
    .venv/bin/python scripts/self_sensitivity.py --cost 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from oracle_ranker import STALE_GAP, auc  # noqa: E402
from selector_study import DEV_END, _read, append_rows  # noqa: E402
from stale_gap import COMMON, RATIO, cache_forward, load_question, variant_table  # noqa: E402

from infoflow_rag.engine import Engine, query  # noqa: E402
from infoflow_rag.engine.options import QueryOptions  # noqa: E402
from infoflow_rag.engine.placement import Layout, PlacedContext  # noqa: E402
from infoflow_rag.engine.selection import Probe, SinkFlowSelector, ratio_budget  # noqa: E402
from infoflow_rag.eval.datasets import EvalExample, load_hotpotqa  # noqa: E402
from infoflow_rag.eval.runner import DEFAULT_PROMPT  # noqa: E402

TOP = 4  # q's tokens the Fisher diagonal is summed over
SIGNALS = ("fisher", "top1", "margin", "qnll")


def sensitivity(engine: Engine, placed: PlacedContext, layout: Layout) -> dict[str, torch.Tensor]:
    """Signal name -> (L, N) squared gradient norm per layer and placed token (keys and values together), from
    one forward of the fresh tokens over the cache as placed and one backward per loss."""
    fresh_ids, fresh_pos = query.fresh_inputs(layout)
    pos = placed.positions
    with torch.enable_grad():
        keys, values = (t.detach().clone().requires_grad_() for t in (placed.prompt_keys, placed.prompt_values))
        log_q = cache_forward(engine.model, keys, values, fresh_ids, fresh_pos).double().log_softmax(-1)  # (F, vocab)
        top = log_q[-1].topk(TOP)
        losses = [log_q[-1, int(y)] for y in top.indices]
        losses.append(-log_q[:-1].gather(1, fresh_ids[1:, None]).sum())  # the question block's own NLL
        grads = []
        for i, loss in enumerate(losses):
            gk, gv = torch.autograd.grad(loss, [keys, values], retain_graph=i < len(losses) - 1)
            grads.append((gk[:, :, pos].double(), gv[:, :, pos].double()))  # (L, kv_heads, N, d)

    def norm2(gk: torch.Tensor, gv: torch.Tensor) -> torch.Tensor:
        return gk.pow(2).sum((1, 3)) + gv.pow(2).sum((1, 3))  # (L, N)

    probs = top.values.detach().exp()
    return {
        "fisher": sum(float(p) * norm2(*g) for p, g in zip(probs, grads[:TOP], strict=True)),
        "top1": norm2(*grads[0]),
        "margin": norm2(grads[0][0] - grads[1][0], grads[0][1] - grads[1][1]),
        "qnll": norm2(*grads[TOP]),
        "q_top": probs.float(),
    }


def margin_sensitivity(engine: Engine, placed: PlacedContext, layout: Layout) -> torch.Tensor:
    """(N,) what a selector would pay for: the gradient norm of q's top-1 minus top-2 logit over layers 1 on, in
    one forward and one backward (equal to the square root of ``sensitivity``'s margin summed over layers 1 on)."""
    fresh_ids, fresh_pos = query.fresh_inputs(layout)
    with torch.enable_grad():
        keys, values = (t.detach().clone().requires_grad_() for t in (placed.prompt_keys, placed.prompt_values))
        top = cache_forward(engine.model, keys, values, fresh_ids, fresh_pos)[-1].topk(2).values
        grad_k, grad_v = torch.autograd.grad(top[0] - top[1], [keys, values])
    pos = placed.positions
    return (grad_k[1:, :, pos].pow(2).sum((0, 1, 3)) + grad_v[1:, :, pos].pow(2).sum((0, 1, 3))).sqrt()


def cost(questions: int) -> None:
    """Seconds per dev question (0 on) of sinkflow's scoring pass and recompute at 15 %, and of the sensitivity
    pass a selector would add (one forward and one backward), each timed in the same process."""
    engine = Engine.load("qwen2.5-0.5b", lead_in=None)
    print("| question | context tokens | scoring s | recompute s | sensitivity s | vs scoring + recompute |")
    print("|---:|---:|---:|---:|---:|---:|")
    shares = []
    for number, ex in enumerate(load_hotpotqa("passage", start=0, limit=questions)):
        kvs = engine.prefill(ex.passages)
        prep = engine.prepare(ex.question, kvs, selector="sinkflow", ratio=RATIO, **COMMON)
        base = engine.prepare(ex.question, kvs, selector="none", **COMMON)
        t = time.perf_counter()
        margin_sensitivity(engine, base.placed, base.layout)
        seconds = time.perf_counter() - t
        paid = prep.timings.score + prep.timings.recompute
        shares.append(seconds / paid)
        print(
            f"| {number} | {prep.placed.n_passage_tokens} | {prep.timings.score:.2f} | {prep.timings.recompute:.2f} "
            f"| {seconds:.2f} | {seconds / paid:.2f} |",
            flush=True,
        )
    print(f"median share: {np.median(shares):.2f}")


def collect(out: Path) -> None:
    """One .npz per dev question 0-44: each signal (L, N), InfoFlow's score, the candidates, the labels."""
    rows = [json.loads(line) for line in STALE_GAP.read_text(encoding="utf-8").splitlines()]
    oracle = {r["id"]: r["picks"] for r in rows if r["variant"] == "patch:effect×5"}
    sinkflow = {r["id"]: r["picks"] for r in rows if r["variant"] == "sinkflow"}
    engine = Engine.load("qwen2.5-0.5b", lead_in=None)
    out.mkdir(parents=True, exist_ok=True)
    for number, ex in enumerate(load_hotpotqa("passage", start=0, limit=45)):
        path = out / f"{number:03d}.npz"
        if path.exists():
            continue
        kvs = engine.prefill(ex.passages)
        prep = engine.prepare(ex.question, kvs, selector="none", template=DEFAULT_PROMPT, max_new_tokens=32)
        probe = query.probe(engine, prep.placed, prep.layout, prep.options.score_dtype)
        signals = sensitivity(engine, prep.placed, prep.layout)
        n = prep.placed.token_ids.numel()
        label, sink = np.zeros(n, bool), np.zeros(n, bool)
        label[oracle[ex.id]], sink[sinkflow[ex.id]] = True, True
        arrays = {name: signals[name].float().numpy() for name in SIGNALS}
        part = out / f"{number:03d}.npz.part"  # renamed when whole: a kill leaves no truncated .npz to resume past
        with part.open("wb") as file:
            np.savez(
                file,
                **arrays,
                q_top=signals["q_top"].numpy(),
                score=probe.scores(engine.score_layers).float().numpy(),
                candidate=prep.placed.candidate.numpy(),
                label=label,
                sink=sink,
            )
        part.replace(path)
        print(number, flush=True)


def report(features: Path) -> None:
    """Each signal's AUC against the oracle's picks over the candidate tokens, and the mean share of the oracle's
    picks among each question's top-(oracle budget) tokens by the signal."""
    files = sorted(features.glob("*.npz"))
    if not files:
        raise SystemExit(f"no features in {features}: collect them first (--features {features}, without --report)")
    per_question = [dict(np.load(f)) for f in files]
    ranked: dict[str, list[np.ndarray]] = {}
    labels = []
    for d in per_question:
        c = d["candidate"]
        labels.append(d["label"][c])
        views = {"infoflow score": d["score"], "sinkflow membership": d["sink"] + 1e-3 * d["score"]}
        for name in SIGNALS:
            views[name] = d[name].sum(0)  # over layers
            views[f"{name}×score"] = np.sqrt(d[name].sum(0)) * d["score"]
        views["fisher[1:]×score"] = np.sqrt(d["fisher"][1:].sum(0)) * d["score"]  # as the kl run ranks
        for first in (1, 2, 3, 4, 6, 8, 10, 12, 18):  # a backward that stops at layer ``first``
            views[f"margin[{first}:]×score"] = np.sqrt(d["margin"][first:].sum(0)) * d["score"]
        per_layer = d["margin"] / d["margin"][:, c].mean(1, keepdims=True)  # every layer weighs alike
        views["margin/layer×score"] = np.sqrt(per_layer.sum(0)) * d["score"]
        views["margin/layer[1:]×score"] = np.sqrt(per_layer[1:].sum(0)) * d["score"]
        views["margin²×score"] = d["margin"].sum(0) * d["score"]
        views["margin×score²"] = np.sqrt(d["margin"].sum(0)) * d["score"] ** 2
        for name, values in views.items():
            ranked.setdefault(name, []).append(values[c])
    print(f"{len(files)} questions, {sum(map(len, labels))} candidate tokens, {sum(x.sum() for x in labels)} picks")
    print("| signal | AUC | top-budget overlap with the oracle |\n|---|---:|---:|")
    for name, values in ranked.items():
        a = auc(np.concatenate(values), np.concatenate(labels).astype(int))
        overlap = np.mean([y[np.argsort(-v)[: y.sum()]].mean() for v, y in zip(values, labels, strict=True)])
        print(f"| {name} | {a:.3f} | {overlap:.0%} |")


LIBRARY = ("infoflow", "sinkflow", "cacheblend", "epic")
SINK = 8  # sinkflow's default
RANKED = ("fisher", "margin")  # the signals the kl run ranks by
LAST_VARIANT = f"sink{SINK}+{RANKED[-1]}×score"  # written last: a question with its row on file is complete


def picks(placed: PlacedContext, values: torch.Tensor, budget: int, sink: int = 0) -> torch.Tensor:
    """(budget,) sorted: the library's sinkflow (the first ``sink`` tokens of every stale passage, then the top
    of a ranking), ranking by ``values`` instead of InfoFlow's score."""
    ranking = Probe(question_scores=lambda layers, heads: values, layer_kv=None)  # only the ranking is read
    return SinkFlowSelector(sink=sink, layers=[0]).select(placed, budget, ranking)


def kl_run(start: int, questions: int, out_path: Path) -> None:
    """kl_answer of the library's selectors and of sensitivity-ranked picks at 15 %, teacher-forced as round 8."""
    engine = Engine.load("qwen2.5-0.5b", lead_in=None)
    done = {(r["id"], r["variant"]) for r in _read(out_path)}

    def rows_for(ex: EvalExample) -> Iterator[dict]:
        if (ex.id, LAST_VARIANT) in done:
            return
        q, kvs = load_question(engine, ex)
        budget = ratio_budget(q.placed, RATIO)
        chosen = {m: engine.prepare(ex.question, kvs, selector=m, ratio=RATIO, **COMMON).chosen for m in LIBRARY}
        signals = sensitivity(engine, q.placed, q.layout)
        score = query.probe(engine, q.placed, q.layout, QueryOptions().score_dtype).scores(engine.score_layers).double()
        for name in RANKED:
            ranked = signals[name][1:].sum(0).sqrt() * score  # (N,); layer 0 is never stale: left out
            chosen[f"{name}×score"] = picks(q.placed, ranked, budget)
            chosen[f"sink{SINK}+{name}×score"] = picks(q.placed, ranked, budget, SINK)
        for name, selected in chosen.items():
            if (ex.id, name) not in done:
                yield {"id": ex.id, "variant": name} | q.forced(selected) | {"picks": selected.tolist()}

    append_rows(out_path, start, questions, rows_for)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", help="directory of per-question .npz (written unless --report)")
    parser.add_argument("--report", action="store_true", help="report on the features on file")
    parser.add_argument("--kl", help="JSON lines of kl_answer rows per (question, variant); resumed")
    parser.add_argument("--summary", action="store_true", help="with --kl: print the table of what is on file")
    parser.add_argument("--cost", type=int, metavar="N", help="time the sensitivity pass on dev questions 0..N-1")
    parser.add_argument("--start", type=int, default=45)
    parser.add_argument("--questions", type=int, default=30)
    args = parser.parse_args()
    if args.cost is not None:
        if not 1 <= args.cost <= DEV_END:
            raise SystemExit(f"--cost {args.cost}: time 1 to {DEV_END} development questions (0 on)")
        cost(args.cost)
    elif args.kl:
        if args.summary:
            print(variant_table(_read(Path(args.kl))))
        elif args.start + args.questions > DEV_END:
            raise SystemExit(f"questions {args.start}..{args.start + args.questions - 1} leave the dev slice 0-999")
        else:
            kl_run(args.start, args.questions, Path(args.kl))
    elif args.features:
        (report if args.report else collect)(Path(args.features))
    else:
        parser.error("give --features (collect, or --report), --kl (run, or --summary) or --cost")


if __name__ == "__main__":
    main()

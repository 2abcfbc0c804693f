"""Selector study, round 8: where the stale cache's gap to full prefill lives (development questions only).

Per question: the cached context placed at global positions (stale: every passage but the first was
prefilled alone) and full prefill's K/V for the same prompt (fresh). Each variant hands the recompute a
cache and a set of tokens to recompute, and is teacher-forced along full's greedy answer (kl_answer, top1):

  ``none`` / ``sinkflow``       the stale cache, nothing / sinkflow's 15 % recomputed (the library's rows again)
  ``patch:all``                 every cached entry replaced by full's (sanity: ~0)
  ``patch:layers A-B``          full's entries on layers A..B only, every token
  ``patch:passage k``           full's entries for the k-th passage in prompt order (k = 1 right after the exact
                                first passage; the last one sits next to the question), every layer
  ``patch:oracle@r``            full's entries for the r share of tokens that deviate most (summed over layers,
                                each layer's squared K/V error over its mean squared norm): what a perfect
                                staleness ranking could buy if the picked tokens came back exact
  ``patch:sinkflow``            full's entries at sinkflow's picks, nothing recomputed: sinkflow's picks made exact
  ``recompute:oracle``          the oracle's 15 % recomputed on top of the stale rest (what a selector can do)
  ``recompute:sinkflow-fresh``  sinkflow with InfoFlow's question attention measured on full's cache instead of
                                the stale one: is the stale scoring pass what misranks?
  ``patch:effect``              full's entries for the 15 % of tokens whose patch lowers the answer's KL most to
                                first order (the KL's gradient at the stale cache times full minus stale): an
                                oracle of what matters to this answer, rather than of what is stale
  ``recompute:effect``          those tokens recomputed on top of the stale rest
  ``patch:effect×5``            the effect oracle in 5 rounds of 3 %, each ranked with the earlier rounds patched

Patching needs no recompute of the picked tokens, so ``patch:`` rows are bounds, not methods. Each row also
stores ``residual``, the share of the context's deviation still stale after the recompute, and the none row the
deviation by layer and by passage. One JSON line per (question, variant), resumed like the selector study.

    .venv/bin/python scripts/stale_gap.py --questions 45 --out docs/stale-gap.jsonl
    .venv/bin/python scripts/stale_gap.py --out docs/stale-gap.jsonl --summary
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).parent))
from selector_study import (  # noqa: E402
    MAX_NEW_TOKENS,
    _full_confidence,
    _full_reference,
    _read,
    append_rows,
    by_name,
    kl_cells,
    paired_kl_cells,
    per_question_main,
)

from infoflow_rag.engine import Engine, query, recompute  # noqa: E402
from infoflow_rag.engine.cache import SlottedLayer, position_mask, stacked  # noqa: E402
from infoflow_rag.engine.options import QueryOptions  # noqa: E402
from infoflow_rag.engine.placement import Layout, PlacedContext  # noqa: E402
from infoflow_rag.engine.query import Prepared  # noqa: E402
from infoflow_rag.engine.selection import (  # noqa: E402
    SinkFlowSelector,
    ratio_budget,
    recomputable_passages,
    top_candidates,
)
from infoflow_rag.eval import fidelity  # noqa: E402
from infoflow_rag.eval.datasets import EvalExample  # noqa: E402
from infoflow_rag.eval.runner import DEFAULT_PROMPT  # noqa: E402
from infoflow_rag.eval.stats import mean_ci, shared_ids  # noqa: E402
from infoflow_rag.kv import PassageKV  # noqa: E402

RATIO = 0.15
ORACLE_RATIOS = (0.05, 0.15, 0.3)
COMMON = {"template": DEFAULT_PROMPT, "max_new_tokens": MAX_NEW_TOKENS}
EFFECT_STEPS = 5  # rounds of the iterated effect oracle
LAST_VARIANT = f"patch:effect×{EFFECT_STEPS}"  # runs last: a question with its row on file is complete
LAYER_GROUPS = 4  # layer 0 is never stale (its K/V depend on the token alone), so groups cover 1..L-1


def layer_groups(num_layers: int) -> list[tuple[int, int]]:
    """(first, last) of LAYER_GROUPS contiguous groups over layers 1..num_layers-1."""
    edges = np.linspace(1, num_layers, LAYER_GROUPS + 1).round().astype(int)
    return [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def relative_deviation(stale_k, stale_v, fresh_k, fresh_v, positions) -> torch.Tensor:
    """(L, N) per layer and cached token: squared K error over the layer's mean squared fresh key norm, plus the
    same for V. keys/values (L, kv_heads, M, d) in prompt order; positions (N,) the cached tokens' entries."""
    sk, sv, fk, fv = (t[:, :, positions].double() for t in (stale_k, stale_v, fresh_k, fresh_v))
    k_err, v_err = (sk - fk).pow(2).sum((1, 3)), (sv - fv).pow(2).sum((1, 3))  # (L, N)
    k_norm, v_norm = fk.pow(2).sum((1, 3)).mean(1, keepdim=True), fv.pow(2).sum((1, 3)).mean(1, keepdim=True)
    return k_err / k_norm + v_err / v_norm


@dataclass
class Question:
    """One question's stale (placed) and fresh (full prefill) caches, in prompt order, and full's reference."""

    engine: Engine
    ref: fidelity.Reference
    layout: Layout
    placed: PlacedContext
    fresh_k: torch.Tensor  # (L, kv_heads, M, d) full prefill's entries
    fresh_v: torch.Tensor
    stale_k: torch.Tensor  # (L, kv_heads, M, d) the placed entries (fresh positions: overwritten by every recompute)
    stale_v: torch.Tensor

    @property
    def positions(self) -> torch.Tensor:
        return self.placed.positions  # (N,) the cached tokens' entries

    @property
    def stale_passages(self) -> list[tuple[int, int, int]]:
        """(passage index, start, end) into the placed tokens of every passage that may be recomputed."""
        return recomputable_passages(self.placed)

    @functools.cached_property
    def stale_total(self) -> float:
        """The stale cache's summed relative deviation from full's: what ``residual`` is a share of."""
        return float(self.deviation().sum())

    def deviation(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> torch.Tensor:
        """(L, N) relative deviation of ``keys``/``values`` (default: the stale cache) from full's."""
        keys = self.stale_k if keys is None else keys
        values = self.stale_v if values is None else values
        return relative_deviation(keys, values, self.fresh_k, self.fresh_v, self.positions)

    def patched(self, patch_tokens=None, patch_layers=slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the stale cache with full's entries at ``patch_tokens`` (indices into the placed tokens) on
        ``patch_layers``. -> keys, values (L, kv_heads, M, d)"""
        keys, values = self.stale_k.clone(), self.stale_v.clone()
        if patch_tokens is not None:
            entries = self.positions[patch_tokens]
            keys[patch_layers, :, entries] = self.fresh_k[patch_layers, :, entries]
            values[patch_layers, :, entries] = self.fresh_v[patch_layers, :, entries]
        return keys, values

    def forced(self, selected: torch.Tensor, patch_tokens=None, patch_layers=slice(None)) -> dict:
        """Teacher-forced fidelity of the stale cache with full's entries at ``patch_tokens`` (indices into the
        placed tokens) on ``patch_layers``, after recomputing ``selected`` (indices into the placed tokens)."""
        keys, values = self.patched(patch_tokens, patch_layers)
        mixed = dataclasses.replace(self.placed, key_buffer=keys, value_buffer=values, room=0)
        model = self.engine.model
        result = recompute.recompute(model, mixed, selected, *query.fresh_inputs(self.layout))
        logits = recompute.teacher_force(model, result, torch.tensor(self.ref.answer_ids))  # (m+1, vocab)
        after = float(self.deviation(keys, values).sum())  # the recompute wrote its picks into keys/values
        row = fidelity.answer_fidelity(self.ref, logits)
        residual = after / self.stale_total if self.stale_total else 0.0
        return row | {"residual": residual, "selected": selected.numel()}

    def fresh_placed(self) -> PlacedContext:
        """The placed context with full's entries everywhere: what a scoring pass would see on an exact cache."""
        pos = self.positions
        return dataclasses.replace(
            self.placed,
            keys=self.fresh_k[:, :, pos],
            values=self.fresh_v[:, :, pos],
            key_buffer=self.fresh_k.clone(),
            value_buffer=self.fresh_v.clone(),
            room=0,
        )


def cache_forward(model, keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor):
    """(len(ids), vocab) logits of ``ids`` at ``positions`` over the cache ``keys``/``values`` (L, kv_heads, M, d),
    entry j at position j; inputs at positions from M on get slots of their own. Differentiable in keys/values,
    which are never written to."""
    m = keys.shape[2]
    room = keys.new_zeros(keys.shape[1], int(positions.max()) + 1 - m, keys.shape[3])  # (kv_heads, beyond M, d)
    cache = DynamicCache()  # per layer, a tensor of its own: autograd refuses in-place writes to unbind views
    for k, v in zip(keys, values, strict=True):
        cache.layers.append(SlottedLayer(torch.cat([k, room], 1)[None], torch.cat([v, room], 1)[None], positions))
    mask = position_mask(positions, torch.arange(m + room.shape[1]), model.dtype)  # (1, 1, Q, M + beyond)
    return model(input_ids=ids[None], position_ids=positions[None], attention_mask=mask, cache=cache).logits[0]


def answer_kl(q: Question, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Summed KL(full || cache) along full's answer, teacher-forced over the cache ``keys``/``values`` (L, kv_heads,
    M, d) with nothing recomputed: the fresh tokens and the answer in one forward. Differentiable in keys/values."""
    fresh_ids, fresh_pos = query.fresh_inputs(q.layout)
    answer = torch.tensor(q.ref.answer_ids)
    ids, in_pos = torch.cat([fresh_ids, answer]), torch.cat([fresh_pos, q.layout.length + torch.arange(answer.numel())])
    logits = cache_forward(q.engine.model, keys, values, ids, in_pos)
    log_q = logits[fresh_ids.numel() - 1 :].double().log_softmax(-1)  # (A + 1, vocab): rows as teacher_force
    return (q.ref.log_probs.exp() * (q.ref.log_probs - log_q)).sum()


def effect_attribution(q: Question, patched: torch.Tensor) -> torch.Tensor:
    """(N,) first-order change of the summed answer KL (full || cache) if a token's entries on every layer were
    replaced by full's: <fresh - cached, d KL / d entry>, at the stale cache with full's entries already at
    ``patched`` (indices into the placed tokens), nothing recomputed. Negative: the patch brings the answer
    closer to full. An oracle (it needs full's cache and answer), study only."""
    with torch.enable_grad():
        keys, values = (t.requires_grad_() for t in q.patched(patched))
        grad_k, grad_v = torch.autograd.grad(answer_kl(q, keys, values), [keys, values])
    pos = q.positions
    delta_k, delta_v = (q.fresh_k - keys.detach())[:, :, pos], (q.fresh_v - values.detach())[:, :, pos]
    delta = delta_k * grad_k[:, :, pos] + delta_v * grad_v[:, :, pos]  # (L, kv_heads, N, d)
    return delta.sum((0, 1, 3))  # (N,)


def effect_picks(q: Question, budget: int, steps: int) -> torch.Tensor:
    """(budget,) sorted: the effect oracle's picks in ``steps`` rounds, each round's attribution taken with the
    earlier rounds' picks already patched (the KL is far from linear in the cache: patching every token changes
    it by a fraction of what the first-order sum predicts)."""
    chosen = torch.empty(0, dtype=torch.long)
    for step in range(1, steps + 1):
        free = q.placed.candidate.clone()
        free[chosen] = False
        take = budget * step // steps - chosen.numel()
        chosen = torch.cat([chosen, top_candidates(-effect_attribution(q, chosen), free, take)]).sort().values
    return chosen


def stale_beside_full(
    engine: Engine, question: str, kvs: list[PassageKV], full: Prepared
) -> tuple[Prepared, torch.Tensor, torch.Tensor]:
    """The stale cache placed for ``full``'s prompt (nothing recomputed), and full prefill's K/V for it.
    -> the stale query, full's keys and values (L, kv_heads, M, d) in prompt order"""
    base = engine.prepare(question, kvs, selector="none", **COMMON)
    if not torch.equal(base.layout.token_ids(), full.layout.token_ids()):
        raise RuntimeError(f"the cached and the full prompt differ for the question {question[:60]!r}")
    fresh_k, fresh_v = (t[:, 0, :, : base.layout.length] for t in stacked(full.out.cache))  # decoding's entries cut
    return base, fresh_k, fresh_v


def load_question(engine: Engine, ex: EvalExample) -> tuple[Question, list[PassageKV]]:
    """Full's reference and K/V, and the stale cache placed for the same prompt; the passages' KV too."""
    ref, full = _full_reference(engine, ex)
    kvs = engine.prefill(ex.passages)
    base, fresh_k, fresh_v = stale_beside_full(engine, ex.question, kvs, full)
    stale_k, stale_v = base.placed.prompt_keys.clone(), base.placed.prompt_values.clone()
    return Question(engine, ref, base.layout, base.placed, fresh_k, fresh_v, stale_k, stale_v), kvs


def variants(q: Question, ex: EvalExample, kvs: list[PassageKV]) -> dict[str, tuple[dict, dict]]:
    """Name -> (``Question.forced`` arguments, extra row fields), in the order they run."""
    engine, placed = q.engine, q.placed
    nothing, every = torch.empty(0, dtype=torch.long), torch.arange(placed.token_ids.numel())
    budget = ratio_budget(placed, RATIO)
    oracle_score = q.deviation().sum(0)  # (N,)
    sinkflow = engine.prepare(ex.question, kvs, selector="sinkflow", ratio=RATIO, **COMMON).chosen
    fresh = q.fresh_placed()
    sinkflow_fresh = SinkFlowSelector(layers=engine.score_layers).select(
        fresh, budget, query.probe(engine, fresh, q.layout, QueryOptions().score_dtype)
    )
    chosen: dict[str, tuple[dict, dict]] = {
        "none": ({"selected": nothing}, {}),
        "sinkflow": ({"selected": sinkflow}, {"picks": sinkflow.tolist()}),
        "patch:all": ({"selected": nothing, "patch_tokens": every}, {}),
        "patch:sinkflow": ({"selected": nothing, "patch_tokens": sinkflow}, {}),
        "recompute:oracle": ({"selected": top_candidates(oracle_score, placed.candidate, budget)}, {}),
        "recompute:sinkflow-fresh": ({"selected": sinkflow_fresh}, {}),
    }
    for first, last in layer_groups(engine.num_layers):
        layers = slice(first, last + 1)
        arguments = {"selected": nothing, "patch_tokens": every, "patch_layers": layers}
        chosen[f"patch:layers {first}-{last}"] = (arguments, {})
    for r in ORACLE_RATIOS:
        picks = top_candidates(oracle_score, placed.candidate, ratio_budget(placed, r))
        chosen[f"patch:oracle@{r:g}"] = ({"selected": nothing, "patch_tokens": picks}, {})
    gold = set(ex.meta.get("gold_passages", []))
    stale = q.stale_passages
    for k, (passage, s, e) in enumerate(stale, start=1):
        extra = {"order": k, "of": len(stale), "gold": passage in gold, "tokens": e - s}
        chosen[f"patch:passage {k}"] = ({"selected": nothing, "patch_tokens": torch.arange(s, e)}, extra)
    effect = effect_picks(q, budget, steps=1)
    chosen["patch:effect"] = ({"selected": nothing, "patch_tokens": effect}, {})
    chosen["recompute:effect"] = ({"selected": effect}, {})
    iterated = effect_picks(q, budget, EFFECT_STEPS)
    chosen[LAST_VARIANT] = ({"selected": nothing, "patch_tokens": iterated}, {"picks": iterated.tolist()})
    return chosen


def run(engine: Engine, start: int, questions: int, out_path: Path) -> None:
    done = {(r["id"], r["variant"]) for r in _read(out_path)}

    def rows_for(ex: EvalExample) -> Iterator[dict]:
        if (ex.id, LAST_VARIANT) in done:
            return
        q, kvs = load_question(engine, ex)
        for name, (arguments, extra) in variants(q, ex, kvs).items():
            if (ex.id, name) in done:
                continue
            row = {"id": ex.id, "variant": name} | q.forced(**arguments) | extra
            if name == "none":
                dev, total = q.deviation(), q.stale_total  # (L, N), its sum
                stale = [(s, e) for _, s, e in q.stale_passages]
                row["full_p"] = _full_confidence(q.ref)
                row["dev_by_layer"] = [round(float(x) / total, 6) for x in dev.sum(1)]
                row["dev_by_passage"] = [round(float(dev[:, s:e].sum()) / total, 6) for s, e in stale]
                row["context_tokens"] = q.placed.n_passage_tokens
                row["spans"] = stale  # (start, end) of each stale passage, in the placed tokens' indices
                row["gold_spans"] = [p in ex.meta.get("gold_passages", []) for p, _, _ in q.stale_passages]
                row["n_placed"] = q.placed.token_ids.numel()
            yield row

    append_rows(out_path, start, questions, rows_for)


def summary(rows: list[dict], baseline: str = "sinkflow") -> str:
    """Markdown: :func:`variant_table`, then the passage patches and where the picks sit."""
    by = by_name(rows, key="variant")
    tables = [variant_table(rows, baseline), passage_summary(rows, by.get("none", {})), picks_summary(rows)]
    return "\n\n".join(tables)


def variant_table(rows: list[dict], baseline: str = "sinkflow") -> str:
    """Markdown: every variant with kl_answer and its CI, top1, the residual staleness, and the paired ratio
    to ``baseline``."""
    by = by_name(rows, key="variant")
    base = by.get(baseline, {})
    lines = [
        f"| variant | n | kl_answer [95% CI] | median | top1 % | stale left | Δ vs {baseline} [95% CI] "
        f"| ratio vs {baseline} (geometric) [95% CI] | closer/further |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first = [name for name in ("none", baseline) if name in by]  # the yardsticks head the table
    for name in first + [name for name in by if name not in first and not name.startswith("patch:passage")]:
        per_id = by[name]
        kl = [r["kl_answer"] for r in per_id.values()]
        cells = "— | — | —"
        ids = shared_ids(per_id, base)
        if name != baseline and ids:
            cells = paired_kl_cells([per_id[i]["kl_answer"] for i in ids], [base[i]["kl_answer"] for i in ids])
        lines.append(
            f"| {name} | {kl_cells(kl)} | "
            f"{100 * np.mean([r['top1'] for r in per_id.values()]):.1f} | "
            f"{np.mean([r['residual'] for r in per_id.values()]):.3f} | {cells} |"
        )
    return "\n".join(lines)


def passage_summary(rows: list[dict], none: dict[str, dict]) -> str:
    """Markdown: how much of none's kl_answer one passage's patch removes, by the passage's order (counted from
    the question: 1 = the passage next to it) and by gold / distractor, with that passage's share of the
    context's deviation and of its tokens."""
    groups: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        if not r["variant"].startswith("patch:passage") or r["id"] not in none:
            continue
        base = none[r["id"]]
        removed = base["kl_answer"] - r["kl_answer"]
        share_dev = base["dev_by_passage"][r["order"] - 1]
        share_tokens = r["tokens"] / base["context_tokens"]
        from_question = r["of"] - r["order"] + 1
        for key in (f"{from_question} from the question", "gold" if r["gold"] else "distractor"):
            groups.setdefault(key, []).append((removed, share_dev, share_tokens))
    lines = [
        "| passage | n | kl_answer removed [95% CI] | share of none's mean | deviation share | token share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    mean_none = np.mean([r["kl_answer"] for r in none.values()]) if none else float("nan")

    def order(key: str) -> tuple[int, str]:
        head = key.split()[0]
        return (int(head), key) if head.isdigit() else (99, key)

    for key in sorted(groups, key=order):
        removed, dev, tokens = (np.array(x) for x in zip(*groups[key], strict=True))
        est = mean_ci(removed)
        lines.append(
            f"| {key} | {removed.size} | {est.mean:+.4f} [{est.low:+.4f}, {est.high:+.4f}] | "
            f"{est.mean / mean_none:.0%} | {dev.mean():.3f} | {tokens.mean():.3f} |"
        )
    layer_share = np.mean([r["dev_by_layer"] for r in none.values()], axis=0) if none else []
    return "\n".join(lines) + "\n\nDeviation share by layer (none): " + ", ".join(f"{x:.3f}" for x in layer_share)


def picks_summary(rows: list[dict], sink: int = 8) -> str:
    """Markdown: where each stored pick set sits, per question then averaged: the share of picks among the first
    ``sink`` tokens of a stale passage, in gold passages, in the passage next to the question; the mean position
    within its passage (0 first token, 1 last) and in the placed context; the share also picked by sinkflow."""
    by = by_name(rows, key="variant")
    none = {i: r for i, r in by.get("none", {}).items() if "spans" in r}
    sinkflow = {i: set(r["picks"]) for i, r in by.get("sinkflow", {}).items() if "picks" in r}
    stats: dict[str, list[list[float]]] = {}
    for r in rows:
        base = none.get(r["id"])
        if "picks" not in r or base is None or not r["picks"]:
            continue
        owner = {}  # placed index -> (passage order, offset, length, gold)
        for k, ((s, e), gold) in enumerate(zip(base["spans"], base["gold_spans"], strict=True)):
            owner |= {i: (k, i - s, e - s, gold) for i in range(s, e)}
        where = [owner[i] for i in r["picks"]]
        last = len(base["spans"]) - 1
        gold_tokens = sum(e - s for (s, e), g in zip(base["spans"], base["gold_spans"], strict=True) if g)
        stats.setdefault(r["variant"], []).append(
            [
                np.mean([offset < sink for _, offset, _, _ in where]),
                np.mean([gold for *_, gold in where]),
                gold_tokens / base["context_tokens"],
                np.mean([k == last for k, *_ in where]),
                np.mean([offset / max(n - 1, 1) for _, offset, n, _ in where]),
                np.mean(r["picks"]) / base["n_placed"],
                np.mean([i in sinkflow.get(r["id"], set()) for i in r["picks"]]),
            ]
        )
    lines = [
        f"| picks | n | in a passage's first {sink} | in gold passages (gold token share) | next to the question "
        "| position in passage | position in context | also sinkflow's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, per_question in stats.items():
        m = np.mean(per_question, axis=0)
        lines.append(
            f"| {name} | {len(per_question)} | {m[0]:.0%} | {m[1]:.0%} ({m[2]:.0%}) | {m[3]:.0%} | {m[4]:.2f} "
            f"| {m[5]:.2f} | {m[6]:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    per_question_main(__doc__, run, summary, rows="(question, variant)")


if __name__ == "__main__":
    main()

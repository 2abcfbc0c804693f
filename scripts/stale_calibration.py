"""Selector study, round 14: is the stale cache off from full prefill's by a map one could fit once per model?

Per development question, the stale cache (passages prefilled alone, placed) and full prefill's K/V for the same
prompt; per layer, K/V head and passage-offset bucket, the sufficient statistics of an affine map full ~ a * stale
+ b (keys in the pre-RoPE frame, so one offset serves every position). The map is fitted on the first half of the
questions and its share of the squared deviation is measured on the second half; ``--fit-out`` saves the map
fitted on all of them, which ``selector_study.py``'s ``calibrated+*`` candidates apply to the stale tokens. Each
question's statistics are kept beside it (``FIT_OUT.stats``) as they come, so a cut run resumes where it stopped.

    .venv/bin/python scripts/stale_calibration.py --start 0 --questions 32 --fit-out runs/stale-calibration.pt
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from selector_study import DEV_END  # noqa: E402
from stale_gap import COMMON, stale_beside_full  # noqa: E402

from infoflow_rag.engine import Engine  # noqa: E402
from infoflow_rag.engine.placement import rotate_keys  # noqa: E402
from infoflow_rag.engine.selection import recomputable_spans  # noqa: E402
from infoflow_rag.eval.datasets import EvalExample, load_hotpotqa  # noqa: E402
from infoflow_rag.files import atomic_write  # noqa: E402

BUCKETS = ((0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, None))  # token offset within its passage: [lo, hi)


def question_stats(engine: Engine, question: str, passages: list[str]) -> dict[tuple[str, int], dict]:
    """(K or V, bucket) -> sums over the stale tokens of <x, y>, <x, x>, <y, y> (L, kv_heads), x and y (L, kv_heads,
    d), and the count; x stale, y full prefill's."""
    full = engine.prepare(question, passages, selector="full", **COMMON)
    base, full_k, full_v = stale_beside_full(engine, question, engine.prefill(passages), full)  # (L, kv_heads, M, d)
    offset = torch.full((base.placed.token_ids.numel(),), -1)
    for start, end in recomputable_spans(base.placed):
        offset[start:end] = torch.arange(end - start)
    stats = {}
    for bucket, (lo, hi) in enumerate(BUCKETS):
        entries = base.placed.positions[(offset >= lo) & (offset < (hi or offset.max() + 1))]
        for part, stale, fresh in (("k", base.placed.prompt_keys, full_k), ("v", base.placed.prompt_values, full_v)):
            x, y = stale[:, :, entries].double(), fresh[:, :, entries].double()  # (L, kv_heads, S, d)
            if part == "k":  # RoPE undone: R(-p) k, so that an offset b means R(p) b at every position p
                x, y = (rotate_keys(t, -entries, engine.inv_freq.double()) for t in (x, y))
            stats[part, bucket] = sufficient_stats(x, y)
    return stats


def sufficient_stats(x: torch.Tensor, y: torch.Tensor) -> dict:
    """What the fit and its residual need of x, y (L, kv_heads, S, d): <x, y>, <x, x>, <y, y> summed over tokens
    (L, kv_heads), x and y summed (L, kv_heads, d), and the token count."""
    return {
        "Sxy": (x * y).sum((2, 3)),
        "Sxx": (x * x).sum((2, 3)),
        "Syy": (y * y).sum((2, 3)),
        "sx": x.sum(2),
        "sy": y.sum(2),
        "n": x.shape[2],
    }


def pooled(per_question: list[dict], keys: list[tuple[str, int]]) -> dict:
    """The statistics of ``keys`` ((K or V, bucket) pairs) summed over the questions."""
    fields = per_question[0][keys[0]]
    return {f: sum(q[k][f] for q in per_question for k in keys) for f in fields}


def fit(s: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares y ~ a x + b per layer and K/V head: a (L, kv_heads), b (L, kv_heads, d)."""
    n = s["n"]
    a = (s["Sxy"] - (s["sx"] * s["sy"]).sum(-1) / n) / (s["Sxx"] - (s["sx"] * s["sx"]).sum(-1) / n)
    return a, (s["sy"] - a[..., None] * s["sx"]) / n


def explained(s: dict, a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of sum ||y - x||^2 that the map removes: 1 - sum ||y - a x - b||^2 / sum ||y - x||^2."""
    residual = (
        s["Syy"]
        - 2 * a * s["Sxy"]
        - 2 * (b * s["sy"]).sum(-1)
        + a * a * s["Sxx"]
        + 2 * a * (b * s["sx"]).sum(-1)
        + s["n"] * (b * b).sum(-1)
    )
    return float(1 - residual.sum() / (s["Syy"] - 2 * s["Sxy"] + s["Sxx"]).sum())


def report(per_question: list[dict]) -> str:
    half = len(per_question) // 2
    train, test = per_question[:half], per_question[half:]
    lines = [
        "| part | offset | stale tokens (test) | own-bucket map | one map for all offsets | a (mean) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for part in ("k", "v"):
        every = [(part, b) for b in range(len(BUCKETS))]
        a_all, b_all = fit(pooled(train, every))
        for bucket, (lo, hi) in enumerate(BUCKETS):
            a, b = fit(pooled(train, [(part, bucket)]))
            s = pooled(test, [(part, bucket)])
            label = f"{lo}+" if hi is None else f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}"
            lines.append(
                f"| {part.upper()} | {label} | {s['n']} | {explained(s, a, b):.1%} | {explained(s, a_all, b_all):.1%} "
                f"| {float(a[1:].mean()):.3f} |"
            )
    return "\n".join(lines)


def collect(engine: Engine, examples: list[EvalExample], stats_path: Path) -> list[dict]:
    """Each example's :func:`question_stats`, in order. Saved to ``stats_path`` (by question id) after every
    question, and read back from it, so a cut run resumes where it stopped."""
    done = torch.load(stats_path) if stats_path.exists() else {}
    for number, ex in enumerate(examples, start=1):
        if ex.id not in done:
            done[ex.id] = question_stats(engine, ex.question, ex.passages)
            save_atomically(done, stats_path)
        print(f"{number}/{len(examples)} {ex.id}", flush=True)
    return [done[ex.id] for ex in examples]


def save_atomically(obj, path: Path) -> None:
    """torch.save, written with the library's atomic_write: a crash mid-write leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getbuffer())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--fit-out", type=Path, required=True, help="where to save the map fitted on every question")
    args = parser.parse_args()
    if args.start + args.questions > DEV_END:
        parser.error(f"development questions only: start + questions must be <= {DEV_END}")
    engine = Engine.load(args.model, check=False, lead_in=None)
    examples = load_hotpotqa("passage", start=args.start, limit=args.questions)
    per_question = collect(engine, examples, args.fit_out.with_name(args.fit_out.name + ".stats"))
    print(report(per_question))
    every = list(range(len(BUCKETS)))
    fitted = {part: tuple(t.float() for t in fit(pooled(per_question, [(part, b) for b in every]))) for part in "kv"}
    save_atomically(fitted, args.fit_out)
    print(f"saved the map fitted on {len(per_question)} questions to {args.fit_out}")


if __name__ == "__main__":
    main()

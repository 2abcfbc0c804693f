"""A flat, JSON-able summary of one infoflow-rag answer, for framework response metadata."""

from __future__ import annotations

from typing import Any

from infoflow_rag.pipeline import PipelineAnswer


def answer_stats(answer: PipelineAnswer) -> dict[str, Any]:
    """Selector, TTFT, recompute fraction, token counts and the pipeline's KV reuse counters."""
    result = answer.result
    reuse = answer.reuse.to_dict() if answer.reuse is not None else {}
    return {
        "selector": result.selector,
        "ratio": result.ratio,
        "ttft": result.timings.ttft,
        "recompute_fraction": result.recompute_fraction,
        "context_tokens": result.context_tokens,
        "generated_tokens": result.generated_tokens,
        **reuse,
        "prompt_tokens": result.prompt_tokens,
        **answer.extra,
        "timings": result.timings.to_dict(),
    }

"""Refuse, at load time, every model whose cached keys this engine could not place exactly."""

from __future__ import annotations

from transformers import PretrainedConfig

from .errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# Position-independent frequency tables: a delta rotation is exact for these.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_WHY_NOT = {
    "dynamic": "dynamic-NTK RoPE changes its frequencies with the sequence length, so a key cached at one "
    "length cannot be re-rotated exactly for another",
    "longrope": "LongRoPE switches between short and long factors by sequence length, which makes cached "
    "keys length-dependent",
}


def check_supported(config: PretrainedConfig) -> None:
    """Raise :class:`UnsupportedModelError` naming what is unsupported and why; return if the model is fine."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(RoPE decoder-only models whose cached keys can be re-rotated exactly)"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if "rope_type" not in rope:  # one table per layer type (e.g. sliding vs full) — not placed by this engine
        raise UnsupportedModelError(f"per-layer-type RoPE parameters {sorted(rope)} are not supported")
    rope_type = rope["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        why = _WHY_NOT.get(rope_type, "this engine has no exact delta rotation for it")
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported: {why}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UnsupportedModelError(
            f"partial_rotary_factor={partial} is not supported: only fully rotary heads are re-rotated"
        )
    layer_types = getattr(config, "layer_types", None) or []
    sliding = sorted({t for t in layer_types if t != "full_attention"})
    if sliding:
        raise UnsupportedModelError(
            f"layer types {sliding} are not supported: a sliding-window layer sees a different context "
            "than the cached prefill did"
        )
    uses_window = getattr(config, "use_sliding_window", model_type == "mistral")
    if uses_window and getattr(config, "sliding_window", None) is not None:
        raise UnsupportedModelError(
            f"sliding_window={config.sliding_window} is not supported: windowed attention sees a different "
            "context than the cached prefill did; set config.sliding_window = None if your prompts fit in it"
        )

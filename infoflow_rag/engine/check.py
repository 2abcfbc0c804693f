"""The per-model correctness gate.

A model whose cached keys could not be placed exactly is refused by its config (:func:`check_supported`, at
construction); at load (``Engine.load(..., check=True)``), re-rotated keys must equal keys computed at the global
positions, and 100 % recompute must reproduce full-prefill logits. A failure refuses the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, PretrainedConfig

from ..errors import UnsupportedModelError
from .cache import position_mask, stacked
from .placement import rotate_keys
from .prompt import encode

if TYPE_CHECKING:
    from .facade import Engine

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


KEY_TOLERANCE = 1e-3  # max |rotated - direct| relative to max |direct|; a wrong scale or frequency is >= 1e-2
LOGIT_TOLERANCE = 1e-3  # max abs first-token logit difference, fp32

_TEXT = (
    "The lighthouse on Skerry Point was built in 1871 by the engineer Alan Brodie. "
    "Its lamp burned whale oil until 1902, when paraffin replaced it. "
    "Keepers rowed to the mainland every second Sunday for supplies and letters. "
    "In 1987 the light was automated and the last keeper, Morag Ellis, retired to Oban."
)


@dataclass
class CheckReport:
    model: str
    key_rotation_error: float
    rotation_delta: int
    logit_diff: float
    same_first_token: bool
    ok: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise UnsupportedModelError(
                f"correctness gate failed for {self.model}: key re-rotation error {self.key_rotation_error:.2e} "
                f"(tolerance {KEY_TOLERANCE:.0e}), 100 % recompute logit difference {self.logit_diff:.2e} "
                f"(tolerance {LOGIT_TOLERANCE:.0e}); cached keys cannot be placed exactly for this model"
            )


@torch.inference_mode()
def keys_at(engine: Engine, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Keys of ``ids`` prefilled alone at positions start .. start+n-1: (layers, kv_heads, n, head_dim)."""
    pos = start + torch.arange(ids.numel())
    cache = DynamicCache()
    engine.model(
        input_ids=ids[None],
        position_ids=pos[None],
        attention_mask=position_mask(pos, pos, engine.model.dtype),
        cache=cache,
        logits_to_keep=1,
    )
    return stacked(cache)[0][:, 0]


def rotation_error(engine: Engine, n_tokens: int, delta: int) -> float:
    """Relative max error of keys moved by ``delta`` against keys computed there, over every layer.

    Attention with RoPE depends only on relative positions, so shifting a whole sequence must change
    its keys by exactly the rotation R(delta) — at every layer, not only the first.
    """
    ids = torch.tensor(encode(engine.tokenizer, _TEXT)[:n_tokens])
    local = keys_at(engine, ids, 0)
    direct = keys_at(engine, ids, delta)
    moved = rotate_keys(local, torch.full((ids.numel(),), delta), engine.inv_freq)
    return float((moved - direct).abs().max() / direct.abs().max())


def recompute_logit_diff(engine: Engine) -> tuple[float, bool]:
    """Max abs difference of first-token logits: every passage token recomputed vs plain full prefill."""
    sentences = [s.strip() + "." for s in _TEXT.split(".") if s.strip()]
    question = "Who was the last keeper of the Skerry Point light?"
    passages = engine.prefill(sentences)
    # ratio 1.0 recomputes every passage but the exact first one, through the same path InfoFlow uses.
    prepared = engine.prepare(question, passages, selector="infoflow", ratio=1.0)
    _, reference = engine.full_prefill_answer(question, sentences, max_new_tokens=1)
    diff = float((prepared.out.logits - reference).abs().max())
    return diff, int(prepared.out.logits.argmax()) == int(reference.argmax())


def run_check(engine: Engine, thorough: bool = True) -> CheckReport:
    """Quick version at load (short text, small shift); thorough for ``infoflow-rag check``."""
    n_tokens = 64 if thorough else 16
    delta = min(engine.max_positions - n_tokens, 4096 if thorough else 512)
    key_err = rotation_error(engine, n_tokens, delta)
    logit_diff, same = recompute_logit_diff(engine)
    ok = key_err <= KEY_TOLERANCE and logit_diff <= LOGIT_TOLERANCE and same
    return CheckReport(engine.loaded.name, key_err, delta, logit_diff, same, ok)

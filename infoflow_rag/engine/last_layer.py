"""The last decoder layer, doing only what its forward's caller reads. Its keys and values are always computed for
every row: the cache keeps them. What comes after them is wanted
- for the last row alone in full prefill and the recompute (:func:`last_row_only`: the first token's logits,
  ``logits_to_keep=1``): its attention, output projection and MLP run for that row only;
- for no row in a prefill that records no signals (:func:`keys_values_only`): the forward stops right after the
  layer's keys and values (:class:`.attention.StopForward`).

The attention function (:mod:`.attention`) asks :func:`wanted` on every layer. For the last row only, two hooks on
the last layer keep that row at its output projection and its post-attention norm, and the residual adds between them
broadcast it over the others, which nothing reads; only decoder layers whose forward is known to have that shape
(:data:`LAYERS`) are hooked, any other runs whole.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from enum import Enum

import torch
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

# Decoder layers computing h = x + attn(norm(x)), then h + mlp(post_attention_layernorm(h)), the attention ending in
# o_proj: the last-row hooks rely on that shape (transformers 5's modeling code; tests/test_last_layer.py checks it).
LAYERS = (LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer)


class Wanted(Enum):
    """What a forward's caller reads of a layer's output rows."""

    LAST_ROW = "last row"  # the last row's output
    KEYS_VALUES = "keys and values"  # no row's output: only the K/V the layer put in the cache


_wanted: ContextVar[tuple[int, Wanted] | None] = ContextVar("infoflow_last_layer", default=None)
_install_lock = threading.Lock()
_HOOKED = "_infoflow_last_row_hooks"  # attribute marking a model whose last layer is hooked (False: not hookable)


def install(model: PreTrainedModel) -> None:
    """Hook the last decoder layer once, if it is one of :data:`LAYERS`. The hooks do nothing outside
    :func:`last_row_only`. Call this before the model is shared between threads (the Engine does, at construction)."""
    with _install_lock:
        if hasattr(model, _HOOKED):
            return
        last = model.get_decoder().layers[_last_index(model)]  # the layer _setting names, the last one a forward runs
        hookable = isinstance(last, LAYERS)
        if hookable:
            last.self_attn.o_proj.register_forward_pre_hook(_keep_last_row)
            last.post_attention_layernorm.register_forward_pre_hook(_keep_last_row)
        setattr(model, _HOOKED, hookable)


@contextlib.contextmanager
def last_row_only(model: PreTrainedModel) -> Iterator[None]:
    """Within: this thread's forwards of ``model`` compute the last layer's output for their last row only (where its
    layer is hooked; else whole)."""
    with _setting(model, Wanted.LAST_ROW if getattr(model, _HOOKED, False) else None):
        yield


@contextlib.contextmanager
def keys_values_only(model: PreTrainedModel) -> Iterator[None]:
    """Within: this thread's forwards of ``model`` raise :class:`.attention.StopForward` once the last layer's keys
    and values are in the cache; the caller catches it."""
    with _setting(model, Wanted.KEYS_VALUES):
        yield


def wanted(layer: int | None) -> Wanted | None:
    """What the running forward wants of ``layer``'s output rows; None: every row."""
    got = _wanted.get()
    return None if got is None or got[0] != layer else got[1]


@contextlib.contextmanager
def _setting(model: PreTrainedModel, want: Wanted | None) -> Iterator[None]:
    token = _wanted.set(None if want is None else (_last_index(model), want))
    try:
        yield
    finally:
        _wanted.reset(token)


def _last_index(model: PreTrainedModel) -> int:
    """The last layer a forward runs: transformers runs ``layers[: num_hidden_layers]``."""
    return model.config.num_hidden_layers - 1


def _keep_last_row(module, args: tuple) -> tuple | None:
    got = _wanted.get()
    if got is None or got[1] is not Wanted.LAST_ROW:
        return None
    hidden: torch.Tensor = args[0]  # (B, rows, hidden)
    return (hidden[:, -1:], *args[1:])

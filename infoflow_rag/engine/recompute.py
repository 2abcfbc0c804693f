"""Recompute: selected cached tokens and the fresh prompt tokens run through every layer at their global
positions, on top of the mixed cache; and teacher forcing along given answer tokens on the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from . import last_layer
from .attention import SparseQueries, sparse_queries
from .cache import position_mask, slotted_cache, truncate
from .placement import PlacedContext


@dataclass
class Recomputed:
    logits: torch.Tensor  # (vocab,) float32: next-token logits after the last prompt token
    cache: DynamicCache  # every prompt position in prompt order, then what decoding appended
    next_position: int  # position of the first generated token
    positions: torch.Tensor  # (M,) prompt position of each cache entry, in cache order


@torch.inference_mode()
def recompute(
    model: PreTrainedModel,
    placed: PlacedContext,
    selected: torch.Tensor,
    fresh_ids: torch.Tensor,
    fresh_positions: torch.Tensor,
) -> Recomputed:
    """Run selected cached tokens + fresh tokens through every layer at their global positions (the last layer's
    output for the last row only, :mod:`.last_layer`: the first token's logits are all that is read).

    selected: (s,) indices into the placed tokens. The cache holds every prompt position in prompt order: the
    cached tokens at theirs, and slots for the inputs, which the forward fills with fresh K/V; the inputs
    attend under pos_k <= pos_q. Unselected tokens are never forwarded. ``placed``'s buffers become the cache,
    so its keys/values hold the recomputed entries afterwards; running this again gives the same result (each
    layer writes every input entry before its attention reads them, and the other entries are never written).
    """
    inputs = torch.cat([placed.token_ids[selected], fresh_ids])
    in_pos = torch.cat([placed.positions[selected], fresh_positions])
    order = in_pos.argsort()
    inputs, in_pos = inputs[order], in_pos[order]
    length = placed.token_ids.numel() + fresh_ids.numel()
    if int(in_pos.max()) + 1 != length or length != placed.prompt_keys.shape[2]:
        raise RuntimeError(f"the placed and fresh tokens do not tile prompt positions 0..{length - 1}")
    positions = torch.arange(length)
    # The placed prompt-order buffers become the cache: the forward overwrites the input entries in place, and
    # decoding appends into their room.
    cache = slotted_cache(placed.key_buffer, placed.value_buffer, in_pos, placed.room)  # (L, kv_heads, M + room, d)
    with sparse_queries(SparseQueries(in_pos)), last_layer.last_row_only(model):
        out = model(
            input_ids=inputs[None],
            position_ids=in_pos[None],
            cache=cache,  # no mask: the plan's positions say what each input sees (attention.infoflow_mask)
            logits_to_keep=1,
        )
    return Recomputed(out.logits[0, -1].float(), cache, length, positions)


@torch.inference_mode()
def teacher_force(model: PreTrainedModel, out: Recomputed, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token logits along ``tokens`` fed after the prompt in ``out``'s cache, in one forward. -> (n+1, vocab)

    Row 0 is the prompt's own next-token logits (``out.logits``); row i+1 follows ``tokens[: i + 1]``. The
    cache is cut back to its prompt entries before (decoding may have appended to it) and after, so the
    caller's cache holds exactly the prompt again.
    """
    if len(tokens) == 0:
        return out.logits[None]
    prompt_entries = out.positions.numel()
    truncate(out.cache, prompt_entries)
    positions = out.next_position + torch.arange(len(tokens))
    mask = position_mask(positions, torch.cat([out.positions, positions]), model.dtype)
    try:
        logits = model(
            input_ids=tokens[None],
            position_ids=positions[None],
            attention_mask=mask,
            cache=out.cache,
        ).logits[0]  # (n, vocab)
    finally:
        truncate(out.cache, prompt_entries)
    return torch.cat([out.logits[None], logits.float()])

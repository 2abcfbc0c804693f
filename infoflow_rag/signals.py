"""Per-token signals that do not depend on the question, recorded during a passage's prefill.

InfoKV ranks tokens partly by how uncertain the model was at them and how much their representation
moved through the layers. Both come for free from the forward that builds the passage's KV, and would
cost a second forward at query time, so they are recorded then and stored with the KV:

- ``entropy``: predictive entropy (nats) of the next-token distribution at the token;
- ``evolution``: mean over decoder layers of 1 - cos(layer input, layer output) of the token's hidden state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

SIGNALS = ("entropy", "evolution")
ENTROPY_CHUNK = 256  # token rows per lm_head block: bounds the (rows, vocab) logits in memory


@dataclass
class SignalRecorder:
    """What the hooks saw during one forward."""

    evolution_sum: torch.Tensor | None = None  # (B, n) sum over layers of 1 - cos(in, out)
    layers: int = 0
    final_hidden: torch.Tensor | None = None  # (B, n, hidden): the final norm's output, the lm_head input
    _handles: list = field(default_factory=list)

    def signals(self, model: PreTrainedModel) -> dict[str, torch.Tensor]:
        """name -> (B, n) float32."""
        if self.final_hidden is None or self.evolution_sum is None:
            raise RuntimeError("no forward ran while recording signals")
        return {"entropy": predictive_entropy(model, self.final_hidden), "evolution": self.evolution_sum / self.layers}


def predictive_entropy(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """hidden (B, n, d) final-normed states -> (B, n) entropy of softmax(lm_head(hidden)), in blocks of rows."""
    head = model.get_output_embeddings()
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32)
    for start in range(0, flat.shape[0], ENTROPY_CHUNK):
        logp = head(flat[start : start + ENTROPY_CHUNK]).float().log_softmax(-1)  # (rows, vocab)
        out[start : start + ENTROPY_CHUNK] = -(logp.exp() * logp).sum(-1)
    return out.reshape(hidden.shape[:-1])


@contextlib.contextmanager
def recording(model: PreTrainedModel) -> Iterator[SignalRecorder]:
    """Within: forwards of ``model`` record the per-token signals (hooks on the decoder layers and final norm)."""
    rec = SignalRecorder()
    decoder = model.get_decoder()

    def on_layer(module, args, kwargs, output):
        before = args[0] if args else kwargs["hidden_states"]
        after = output[0] if isinstance(output, tuple) else output
        change = 1.0 - torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)  # (B, n)
        rec.evolution_sum = change if rec.evolution_sum is None else rec.evolution_sum + change
        rec.layers += 1

    def on_norm(module, args, output):
        rec.final_hidden = output

    rec._handles = [layer.register_forward_hook(on_layer, with_kwargs=True) for layer in decoder.layers]
    rec._handles.append(decoder.norm.register_forward_hook(on_norm))
    try:
        yield rec
    finally:
        for handle in rec._handles:
            handle.remove()

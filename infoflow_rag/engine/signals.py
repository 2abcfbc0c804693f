"""Per-token signals that do not depend on the question, recorded during a passage's prefill.

InfoKV ranks tokens partly by how uncertain the model was at them and how much their representation
moved through the layers. Both come for free from the forward that builds the passage's KV, and would
cost a second forward at query time, so they are recorded then and stored with the KV:

- ``entropy``: predictive entropy (nats) of the next-token distribution at the token;
- ``evolution``: mean over decoder layers of 1 - cos(layer input, layer output) of the token's hidden state.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

SIGNALS = ("entropy", "evolution")
ENTROPY_CHUNK = 256  # token rows per lm_head block: bounds the (rows, vocab) logits in memory


@dataclass
class SignalRecorder:
    """What the hooks saw during one forward (of the thread that started recording)."""

    evolution_sum: torch.Tensor | None = None  # (B, n) sum over layers of 1 - cos(in, out)
    layers: int = 0
    final_hidden: torch.Tensor | None = None  # (B, n, hidden): the final norm's output, the lm_head input

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


_recorder: ContextVar[SignalRecorder | None] = ContextVar("infoflow_signal_recorder", default=None)
_install_lock = threading.Lock()
_HOOKED = "_infoflow_signal_hooks"  # attribute marking a model whose hooks are installed


def install_hooks(model: PreTrainedModel) -> None:
    """Hook the decoder layers and final norm once; the hooks feed only the recorder of their own forward.

    The hooks stay for the model's lifetime and do nothing outside :func:`recording`. The recorder is found
    through a context variable, so concurrent forwards in other threads never feed each other's recorders,
    and no hook is added or removed while another thread may be iterating the hooks of a forward.
    Call this before the model is shared between threads (the Engine does, at construction).
    """
    with _install_lock:
        if getattr(model, _HOOKED, False):
            return
        decoder = model.get_decoder()
        for layer in decoder.layers:
            layer.register_forward_hook(_on_layer, with_kwargs=True)
        decoder.norm.register_forward_hook(_on_norm)
        setattr(model, _HOOKED, True)


def _on_layer(module, args, kwargs, output) -> None:
    rec = _recorder.get()
    if rec is None:
        return
    before = args[0] if args else kwargs["hidden_states"]
    after = output[0] if isinstance(output, tuple) else output
    change = 1.0 - torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)  # (B, n)
    rec.evolution_sum = change if rec.evolution_sum is None else rec.evolution_sum + change
    rec.layers += 1


def _on_norm(module, args, output) -> None:
    rec = _recorder.get()
    if rec is not None:
        rec.final_hidden = output


@contextlib.contextmanager
def recording(model: PreTrainedModel) -> Iterator[SignalRecorder]:
    """Within: forwards of ``model`` run by this thread (context) record the per-token signals."""
    install_hooks(model)
    rec = SignalRecorder()
    token = _recorder.set(rec)
    try:
        yield rec
    finally:
        _recorder.reset(token)

"""What an engine is, written down where caches and results must not mix across engines: the identity a passage
KV depends on (its hash keys the store) and the model description a results file's header carries."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from .signals import SIGNALS

if TYPE_CHECKING:
    from .facade import Engine


def kv_identity(engine: Engine) -> dict:
    """Everything a passage KV depends on: weights identity, config, dtype, prefix and separator tokens."""
    config = {
        k: v
        for k, v in engine.model.config.to_dict().items()
        if not k.startswith("_") and k not in ("transformers_version",)
    }
    return {
        "model": engine.loaded.name,
        "sha256": engine.weights_sha256,
        "config": config,
        "dtype": str(engine.model.dtype),
        "prefix": engine.prefix.token_ids.tolist(),
        "separator": engine.format.separator,
        # KV stored without signals must not be served to an engine that records them
        "signals": list(SIGNALS) if engine.record_signals else [],
        # only with a lead-in, so that stores written without one keep their keys
        **({"lead_in": engine.passage_context.token_ids.tolist()} if engine.lead_in is not None else {}),
    }


def identity_hash(identity: dict) -> str:
    """A short stable hash of an identity dict (the store key prefix)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def results_model_info(engine: Engine) -> dict:
    """The model and prompt settings a results file records: resuming under others is refused."""
    cfg = engine.model.config
    return {
        "name": engine.loaded.name,
        "sha256": engine.loaded.sha256,
        "model_type": cfg.model_type,
        "layers": engine.num_layers,
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "score_layers": engine.score_layers,
        "max_positions": engine.max_positions,
        "prompt_head": engine.format.head,
        "prompt_tail": engine.format.tail,
        # only with a lead-in, so that results written without one still resume
        **({"lead_in": engine.lead_in} if engine.lead_in is not None else {}),
    }

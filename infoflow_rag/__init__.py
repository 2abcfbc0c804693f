"""infoflow-rag: passage KV reuse with InfoFlow selective recompute for fast retrieval-augmented generation."""

from .allocator import keep_freed_memory
from .engine import NEUTRAL_LEAD_IN, AnswerStream, Engine, InvalidOptionError, QueryOptions
from .engine.options import OptionFields
from .engine.result import AnswerResult, StageTimings
from .errors import InfoFlowError, ModelIntegrityError, UnsupportedModelError
from .kv import PassageKV
from .models import DEFAULT_MODEL, load_model

__all__ = [
    "DEFAULT_MODEL",
    "NEUTRAL_LEAD_IN",
    "AnswerResult",
    "AnswerStream",
    "Engine",
    "InfoFlowError",
    "InvalidOptionError",
    "ModelIntegrityError",
    "OptionFields",
    "PassageKV",
    "QueryOptions",
    "StageTimings",
    "UnsupportedModelError",
    "keep_freed_memory",
    "load_model",
]

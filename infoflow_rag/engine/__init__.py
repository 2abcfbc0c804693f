"""The engine: answer a question over passages by reusing their KV caches and recomputing a few tokens.

One module per stage, in the order a query runs them:

    prompt       the chat-template prefix, passage and question encodings
    prefill      passages alone behind the prefix (their KV and, with signals, InfoKV's per-token signals)
    lead_in      the neutral text an engine may prefill every passage behind, after the prefix (closer stale caches)
    placement    each cached passage at its global offset: RoPE re-rotation of its keys
    scoring      the model passes selectors read (question attention, fresh K/V at one layer)
    selection    which cached tokens to recompute: the selector registry (infoflow, cacheblend, epic, ...)
    reorder      the optional densest-passage-last ordering
    recompute    selected + fresh tokens through every layer, on the mixed cache
    compression  KV eviction after the first token (snapkv, infokv)
    decoding     token generation and the answer stream
    query        the stages up to the first token, in order, for one query
    facade       :class:`Engine`, which runs them; ``Engine.load`` also runs the correctness gate (``check``)

:class:`QueryOptions` (``options``) is what every stage reads its settings from.
"""

from .decoding import AnswerStream
from .facade import Engine
from .lead_in import NEUTRAL_LEAD_IN
from .options import InvalidOptionError, QueryOptions
from .query import Prepared

__all__ = ["NEUTRAL_LEAD_IN", "AnswerStream", "Engine", "InvalidOptionError", "Prepared", "QueryOptions"]

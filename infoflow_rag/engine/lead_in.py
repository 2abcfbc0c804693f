"""The neutral lead-in an engine prefills every passage behind by default, after the prompt head (study round 15).

Prefilled alone behind the prompt head, a passage's K/V are those of a document's opening: its first tokens
become the attention sinks of the rest, and each token mixes over a short past. In the prompt, every passage but
the first is read in the middle of a long context. Prefilled behind a few paragraphs of unrelated text, the
passage is already "in the middle", and its cache lies closer to full prefill's: on development questions,
sinkflow's kl_answer to full prefill fell to 0.54x per question with every passage behind this lead-in (0.36x when
the first passage keeps its exact cache; docs/selector-study.md, round 15). Longer lead-ins came closer (one
sentence did nothing); this one (261 tokens on Qwen2.5's tokenizer) costs that much more attention per passage at
store time and nothing at query time.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..kv import PassageKV
from .prefill import prefill_prefix
from .prompt import PromptFormat, encode_passage

# Four encyclopedia paragraphs written for the study, about nothing a question is likely to ask (not HotpotQA text).
NEUTRAL_LEAD_IN = "\n\n".join(
    (
        "Geography of the Alps: The Alps are the highest and most extensive mountain range system that lies entirely "
        "in Europe, stretching approximately 1,200 kilometres across eight Alpine countries. The mountains were formed "
        "over tens of millions of years as the African and Eurasian tectonic plates collided.",
        "History of printing: Printing is a process for mass reproducing text and images using a master form or "
        "template. The earliest non-paper products involving printing include cylinder seals and objects such as the "
        "Cyrus Cylinder. Johannes Gutenberg introduced movable-type printing to Europe around 1440, and the printing "
        "press spread to over two hundred cities within decades.",
        "Photosynthesis: Photosynthesis is a process used by plants and other organisms to convert light energy into "
        "chemical energy that, through cellular respiration, can later be released to fuel the organism's activities. "
        "Most plants, algae and cyanobacteria perform photosynthesis; such organisms are called photoautotrophs.",
        "Jazz: Jazz is a music genre that originated in the African-American communities of New Orleans, Louisiana, in "
        "the late 19th and early 20th centuries, with its roots in blues and ragtime. Since the 1920s Jazz Age, it has "
        "been recognized as a major form of musical expression in traditional and popular music.",
    )
)
# What an engine prefills passages behind unless told otherwise (None: right behind the head, the published setup):
# sinkflow over these caches was closer to full prefill than InfoFlow, CacheBlend and EPIC on held-out questions
# (docs/selector-study.md, "Held-out check 2").
DEFAULT_LEAD_IN: str | None = NEUTRAL_LEAD_IN


def check_lead_in(lead_in: object) -> None:
    """Refuse what cannot be a lead-in (None is none), before a model is loaded for it."""
    if lead_in is not None and not isinstance(lead_in, str):
        raise ValueError(f"lead_in must be a text or None, got {lead_in!r}; pass e.g. NEUTRAL_LEAD_IN")
    if lead_in is not None and not lead_in.strip():
        raise ValueError("lead_in is empty; pass None for no lead-in, or a text such as NEUTRAL_LEAD_IN")


def passage_context(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    prefix: PassageKV,
    lead_in: str | None,
) -> PassageKV:
    """What every passage is prefilled behind: ``prefix``, then ``lead_in`` laid out as a passage (None: ``prefix``)."""
    if lead_in is None:
        return prefix
    return prefill_prefix(model, prefix.token_ids.tolist() + encode_passage(tokenizer, fmt, lead_in))

"""The neutral lead-in an engine may prefill every passage behind, after the prompt head (study round 15).

Prefilled alone behind the prompt head, a passage's K/V are those of a document's opening: its first tokens
become the attention sinks of the rest, and each token mixes over a short past. In the prompt, every passage but
the first is read in the middle of a long context. Prefilled behind a few paragraphs of unrelated text, the
passage is already "in the middle", and its cache lies closer to full prefill's: on development questions,
sinkflow's kl_answer to full prefill fell to 0.36x per question (docs/selector-study.md, round 15). Longer lead-ins
came closer (one sentence did nothing); this one costs 261 tokens of attention per passage at store time and
nothing at query time.
"""

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

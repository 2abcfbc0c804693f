"""A model-free engine for eval tests: the runner's protocol (prepare, decode, teacher_force), canned answers.

Subclasses say what a call answers (``respond``). Teacher-forced logits lean towards one token per selector
(LEAN), so the fidelity measures have known values: full vs itself KL 0 and top-1 1, a method leaning
elsewhere top-1 0.
"""

from dataclasses import dataclass, field

import torch

VOCAB = 4
LEAN = {"full": 0, "infoflow": 0, "cacheblend": 0, "epic": 0, "random": 0, "none": 1}
LEAN_LOGIT = {"full": 3.0, "none": 3.0}  # others lean less strongly: a small KL, same top-1
OTHER_LOGIT = 2.0


def fake_logits(selector: str, rows: int) -> torch.Tensor:
    logits = torch.zeros(rows, VOCAB)
    logits[:, LEAN[selector]] = LEAN_LOGIT.get(selector, OTHER_LOGIT)
    return logits


@dataclass
class FakeEngineBase:
    """``calls`` holds each decoded call's options (question, passages, selector, ...), in order."""

    model_info: dict
    calls: list = field(default_factory=list)
    forced: list = field(default_factory=list)  # (selector, tokens) of every teacher-forced forward

    def prepare(self, question, passages, options, **settings):
        """The call as a flat dict: question, passages, every option (from the QueryOptions) and the settings."""
        return {"question": question, "passages": passages, **dict(options), **settings}

    def decode(self, prep, max_new_tokens):
        answer = self.respond(prep)
        self.calls.append(prep)
        return answer

    def respond(self, call):
        raise NotImplementedError

    def answer_token_ids(self, text):
        return [3] * len(text.split())

    def teacher_force(self, prep, tokens):
        self.forced.append((prep["selector"], list(tokens)))
        return fake_logits(prep["selector"], len(tokens) + 1)

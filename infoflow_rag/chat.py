"""Chat messages -> the prompt pieces a pipeline answers, through the model's own chat template.

The one renderer of conversations: the server's chat route and both framework adapters answer through it.

The engine's prompt is its cached head (the chat template up to the first user content), the pieces,
then its tail (the end of the user turn and the assistant header). A conversation rendered by the same
template is exactly ``head + body + tail``, so its body (earlier turns included, with their role markers)
becomes the pieces, and the passages inside any user turn are found by their text (leading system messages
are joined into one, a paragraph each). A system message
changes the head, and with it every passage's KV: such conversations are answered by an engine built for
that system prompt on the same loaded model, with its own store entries (kept for the few most recent
system prompts).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, TypedDict

from jinja2 import TemplateError

from .engine import Engine
from .engine.prompt import PASSAGE_SEPARATOR
from .matching import KnownPassage

if TYPE_CHECKING:
    from .pipeline import Pipeline

Piece = str | KnownPassage
ROLES = ("system", "user", "assistant")
_LAST_USER = "\x00INFOFLOW_LAST_USER_CONTENT\x00"


class Turn(TypedDict):
    role: str  # system, user or assistant ("developer" is read as system)
    content: str


def passage_pieces(passages: Sequence[str]) -> list[Piece]:
    """Passages sent apart from the prompt, each followed by the separator prefill puts behind it."""
    return [piece for text in passages for piece in (KnownPassage(text), PASSAGE_SEPARATOR)]


class Conversations:
    """Picks the pipeline whose prompt head fits a conversation, and cuts the conversation into pieces."""

    def __init__(self, pipeline: Pipeline, capacity: int = 4):
        self.pipeline = pipeline
        self.capacity = capacity  # system prompts with an engine of their own
        self._by_system: OrderedDict[str, Pipeline] = OrderedDict()
        self._lock = threading.Lock()  # adapters answer from several threads

    def pieces(
        self, turns: Sequence[Turn], passages: Sequence[str] = (), known: Sequence[str] = ()
    ) -> tuple[Pipeline, list[Piece]]:
        """The pipeline and pieces for ``turns``; ``passages`` go first in the last user turn, ``known`` are more
        passages the turns may quote."""
        turns = _one_system(_checked(turn) for turn in turns)
        if not turns or turns[-1]["role"] != "user":
            got = repr(turns[-1]["role"]) if turns else "no message"
            raise ValueError(f"the last message must be the user's, got {got}; end the list with the message to answer")
        if not turns[-1]["content"].strip():
            raise ValueError("the last user message is empty; send the question to answer as its content")
        pipeline = self._pipeline_for(turns)
        before, after = self._body(pipeline.engine, turns).split(_LAST_USER)
        last = turns[-1]["content"]
        return pipeline, [
            *pipeline.split_prompt(before, known),
            *passage_pieces(passages),
            *pipeline.split_prompt(last + after, known),
        ]

    def _pipeline_for(self, turns: list[Turn]) -> Pipeline:
        if self._fits(self.pipeline.engine, turns) or turns[0]["role"] != "system":
            return self.pipeline
        system = turns[0]["content"]
        with self._lock:
            if system not in self._by_system:
                if len(self._by_system) >= self.capacity:
                    self._by_system.popitem(last=False)
                base = self.pipeline.engine
                engine = base.replace(system_prompt=system)
                # Same store, index and passage matcher; only the prompt head (and so the store keys) differ.
                pipeline = copy.copy(self.pipeline)
                pipeline.engine = engine
                self._by_system[system] = pipeline
            self._by_system.move_to_end(system)
            return self._by_system[system]

    @staticmethod
    def _fits(engine: Engine, turns: list[Turn]) -> bool:
        rendered = render(engine, turns)
        return rendered.startswith(engine.format.head) and rendered.endswith(engine.format.tail)

    @staticmethod
    def _body(engine: Engine, turns: list[Turn]) -> str:
        """The rendered conversation between the engine's head and tail, the last user content marked."""
        marked = [*turns[:-1], Turn(role="user", content=_LAST_USER)]
        rendered = render(engine, marked)
        head, tail = engine.format.head, engine.format.tail
        if not rendered.startswith(head) or not rendered.endswith(tail) or rendered.count(_LAST_USER) != 1:
            raise ValueError(
                f"the chat template of {engine.loaded.name} renders these messages (roles "
                f"{[t['role'] for t in turns]}) other than as its prompt head + turns + assistant header; "
                "send alternating user/assistant turns after at most one leading system message"
            )
        return rendered[len(head) : len(rendered) - len(tail)]


def _one_system(turns: Iterable[Turn]) -> list[Turn]:
    """Leading system messages joined into one (a paragraph each): the engine's head holds one system prompt."""
    turns = list(turns)
    n = next((i for i, turn in enumerate(turns) if turn["role"] != "system"), len(turns))
    if n < 2:
        return turns
    return [Turn(role="system", content="\n\n".join(t["content"] for t in turns[:n])), *turns[n:]]


def _checked(turn: Turn) -> Turn:
    role = "system" if turn["role"] == "developer" else turn["role"]
    if role not in ROLES:
        raise ValueError(f"unsupported message role {turn['role']!r}: send system, user and assistant messages")
    if not isinstance(turn["content"], str):
        raise ValueError(f"message content must be text, got {type(turn['content']).__name__}")
    return Turn(role=role, content=turn["content"])


def render(engine: Engine, turns: Sequence[Turn]) -> str:
    """``turns`` as the model's chat template writes them, ending with the assistant header."""
    if not getattr(engine.tokenizer, "chat_template", None):
        raise ValueError(f"model {engine.loaded.name} has no chat template: send the prompt as a completion instead")
    try:
        return engine.tokenizer.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=True)
    except TemplateError as err:  # templates raise on conversations they do not accept (e.g. role order)
        raise ValueError(f"the chat template of {engine.loaded.name} refuses these messages: {err}") from None

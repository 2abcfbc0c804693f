"""How a RAG prompt is laid out in tokens: fixed prefix, passages, then the question block.

Every piece is tokenized on its own and the prompt is the concatenation of the pieces' ids, so the
full-prefill reference and the cached path see exactly the same token sequence — no separator string
ever needs to be found again after tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from ..text import check_str, check_text

_SENTINEL = "\x00INFOFLOW_USER_CONTENT\x00"
PASSAGE_SEPARATOR = "\n\n"
DEFAULT_QUESTION_TEMPLATE = (
    "Answer the question using the passages above. Reply with the answer only, in a few words.\nQuestion: {question}"
)
# Which tokens of the question block score the context: the raw question (published), or the whole block
# (instruction, question and the end of the chat turn: every token the first answer token is computed from).
SCORE_ROWS = ("question", "block")


@dataclass(frozen=True)
class QuestionBlock:
    """The fresh (never cached) tail of a prompt; ``question`` is the span of raw question tokens in it."""

    token_ids: list[int]
    question: slice


@dataclass(frozen=True)
class PromptFormat:
    """Text around the passages, fixed for a model: ``head`` precedes the first passage, ``tail`` ends the turn."""

    head: str  # e.g. the chat template up to the user content; its tokens are the cached prefix
    tail: str  # e.g. "<|im_end|>\n<|im_start|>assistant\n"
    separator: str = PASSAGE_SEPARATOR  # appended to every passage before tokenization

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None) -> PromptFormat:
        """Use the model's chat template when it has one, else BOS + plain text."""
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": _SENTINEL}]
            if system_prompt is not None:
                messages.insert(0, {"role": "system", "content": system_prompt})
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            head, tail = rendered.split(_SENTINEL)
            return cls(head=head, tail=tail)
        bos = tokenizer.bos_token or ""
        system = f"{system_prompt}\n\n" if system_prompt else ""
        return cls(head=bos + system, tail="\nAnswer:")


def encode(tokenizer: PreTrainedTokenizerBase, text: str, what: str = "the text") -> list[int]:
    """Token ids of ``text`` (``what`` it is, for the error on text no encoding can write) with no BOS/EOS added
    (special tokens written in the text are kept)."""
    check_text(text, what)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_answer(tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, text: str) -> list[int]:
    """Token ids of ``text`` as the model would write it right after the prompt's ``tail``."""
    joined = text if not fmt.tail or fmt.tail[-1].isspace() else " " + text  # "Answer:" is followed by a space
    return encode(tokenizer, joined)


def encode_passage(tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, text: str) -> list[int]:
    check_str(text, "a passage")
    if not text.strip():
        raise ValueError("empty passage: every passage must contain text; drop empty strings before answering")
    return encode(tokenizer, text + fmt.separator, "a passage")


def encode_question(
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    question: str,
    template: str = DEFAULT_QUESTION_TEMPLATE,
) -> QuestionBlock:
    check_str(question, "the question")
    check_str(template, "the question template")
    if not question.strip():
        raise ValueError("empty question: pass the question text to answer")
    if template.count("{question}") != 1:
        raise ValueError(f"question template must contain '{{question}}' exactly once, got {template!r}")
    before, after = template.split("{question}")
    head = encode(tokenizer, before) if before else []
    raw = encode(tokenizer, question, "the question")
    rest = encode(tokenizer, after + fmt.tail)
    return QuestionBlock(head + raw + rest, slice(len(head), len(head) + len(raw)))

"""The embedded SmolLM2-135M, end to end (marked: run with -m real_model)."""

import pytest

from infoflow_rag.engine import Engine
from infoflow_rag.engine.check import run_check

pytestmark = pytest.mark.real_model

FACTS = [
    (
        "The Eiffel Tower is located in Paris and was completed in 1889.",
        "When was the Eiffel Tower completed?",
        "1889",
    ),
    (
        "Mount Kilimanjaro is the highest mountain in Africa, in Tanzania.",
        "In which country is Mount Kilimanjaro?",
        "Tanzania",
    ),
    (
        "The inventor of the telephone was Alexander Graham Bell, born in Edinburgh.",
        "Who invented the telephone?",
        "Bell",
    ),
]


@pytest.fixture(scope="module")
def smollm() -> Engine:
    return Engine.load("smollm2-135m")


def test_gate_passes_on_the_embedded_model(smollm):
    report = run_check(smollm, thorough=True)
    assert report.ok and report.key_rotation_error <= 1e-3
    # 100 % recompute equals full prefill bit for bit: the same attention kernel with the same limits, MKL's
    # products (the same for a row whatever the number of rows), and prefills kept off the few-row kernel.
    assert report.logit_diff == 0.0 and report.same_first_token


def facts_away_from_the_head(target: int) -> tuple[list[str], str, str]:
    """The passages with the asked-about one away from the head (so it is one the selector must repair), the
    question and the fact its answer must name."""
    passages = [text for text, _, _ in FACTS]
    _, question, fact = FACTS[target]
    return passages[target + 1 :] + passages[: target + 1], question, fact


# Measured: full prefill names all three facts, and so does the default (sinkflow at 15 % over caches prefilled
# behind the neutral lead-in, 7 of 48 tokens).
@pytest.mark.parametrize("target", [0, 1, 2])
def test_the_default_names_the_fact_full_prefill_names(smollm, target):
    passages, question, fact = facts_away_from_the_head(target)
    full = smollm.answer(question, passages, selector="full", max_new_tokens=24).answer
    cached = smollm.answer(question, smollm.prefill(passages), max_new_tokens=24)
    assert fact in full, f"full prefill should know this: {full!r}"
    assert fact in cached.answer, f"the default lost the fact full prefill names: {cached.answer!r} vs {full!r}"
    assert cached.options.selector == "sinkflow" and 0 < cached.recompute_fraction <= 0.15


# Measured: the published InfoFlow at 15 % over plain caches names 1889 and Bell but answers the Kilimanjaro
# question about the Eiffel Tower, so that case is not asserted.
@pytest.mark.parametrize("target", [0, 2])
def test_infoflow_on_plain_caches_names_the_fact_full_prefill_names(smollm, target):
    plain = smollm.replace(lead_in=None)
    passages, question, fact = facts_away_from_the_head(target)
    full = plain.answer(question, passages, selector="full", max_new_tokens=24).answer
    infoflow = plain.answer(question, plain.prefill(passages), selector="infoflow", ratio=0.15, max_new_tokens=24)
    assert fact in full, f"full prefill should know this: {full!r}"
    assert fact in infoflow.answer, f"infoflow lost the fact full prefill names: {infoflow.answer!r} vs {full!r}"
    assert 0 < infoflow.recompute_fraction <= 0.15


def test_ingest_a_real_corpus_and_ask(smollm, tmp_path):
    """HotpotQA paragraphs -> index + KV store -> a question whose answer sits in one passage."""
    from infoflow_rag.demo import write_corpus
    from infoflow_rag.ingest import ingest
    from infoflow_rag.pipeline import Pipeline

    write_corpus(tmp_path / "corpus.jsonl", n_items=3)
    with Pipeline.open(tmp_path / "index", model=smollm, create=True) as pipeline:
        summary = ingest(pipeline, tmp_path / "corpus.jsonl", progress=False)
        assert summary.passages == summary.kv_computed == len(pipeline.index) >= 30
        question = "Scott Derrickson is a director of what nationality?"
        for selector in ("sinkflow", "infoflow", "full"):  # the default first
            answer = pipeline.ask(question, top_k=3, selector=selector, max_new_tokens=16)
            assert any("Scott Derrickson" in hit.text for hit in answer.sources)
            assert "American" in answer.answer or "United States" in answer.answer, (selector, answer.answer)
